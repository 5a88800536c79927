"""What every benchmark's report prints the same way: the targets table, and the warning that the machine
was not idle (others' CPU is noise in a benchmark's figures)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

Check = tuple[str, str, str, bool | None]
"""(what, measured, target, passed); None when it could not be measured."""
NOISY_CORES = 0.15
"""Past this many cores busy with other processes, a report says its figures are noisy."""


def print_targets(console: Console, checks: list[Check]) -> dict[str, dict]:
    """Print the targets table (PASS / MISS / n/a); return it as the results' ``targets``."""
    table = Table(title="targets")
    for col in ("check", "measured", "target", ""):
        table.add_column(col)
    for name, measured, target, ok in checks:
        verdict = "[dim]n/a[/]" if ok is None else "[green]PASS[/]" if ok else "[red]MISS[/]"
        table.add_row(name, measured, target, verdict)
    console.print(table)
    return {name: {"measured": m, "target": t, "pass": ok} for name, m, t, ok in checks}


def warn_if_noisy(console: Console, other_cores: float) -> None:
    """Say so when other processes kept more than `NOISY_CORES` busy during some runs."""
    if other_cores > NOISY_CORES:
        console.print(
            f"[yellow]warning: other processes kept up to {other_cores:.2f} of this machine's "
            f"{os.cpu_count()} cores busy during some runs (column 'other CPU'): those figures are "
            "noisy; rerun when the machine is idle"
        )
