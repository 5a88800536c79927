"""What `thumbtune learn` shows while it runs: a live table on a terminal, plain log lines otherwise.

The table holds what someone watching a learner wants at a glance: the version in memory, how full the
next batch is, the consumer lag, and the last update's PPO diagnostics. Off a terminal (a pod's log, a
pipe) nothing extra is printed: `Learner.train` already logs one line per version.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

SHOWN = (
    "mean_reward",
    "policy_loss",
    "value_loss",
    "approx_kl",
    "clipfrac",
    "kl_ref",
    "beta",
    "entropy",
    "explained_variance",
    "is_ess",
    "response_length_drift",
    "update_s",
)


class Progress:
    def __init__(self, batch_size: int, tty: bool | None = None) -> None:
        self.batch_size = batch_size
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._status: dict[str, str] = {}
        self._last: dict[str, float] = {}
        self._last_version = "-"
        self._live: Live | None = None
        self._swapped: list[tuple[logging.StreamHandler, object]] = []

    def __enter__(self) -> Self:
        if self.tty:
            self._live = Live(self._table(), console=Console(), refresh_per_second=2, transient=False)
            self._live.start()
            # Log lines go through Live's stderr proxy, above the table, instead of through it.
            for handler in logging.getLogger().handlers:
                if (
                    isinstance(handler, logging.StreamHandler)
                    and handler.stream is sys.__stderr__
                    and sys.stderr is not sys.__stderr__
                ):
                    self._swapped.append((handler, handler.setStream(sys.stderr)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped.clear()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, version: str, buffered: int, consumed: int, lag: int | None, dropped: int) -> None:
        """The state between updates (cheap: redrawn at most twice a second)."""
        self._status = {
            "version": version,
            "next batch": f"{buffered}/{self.batch_size}",
            "consumed": str(consumed),
            "dropped": str(dropped),
            "lag": "?" if lag is None else str(lag),
        }
        if self._live is not None:
            self._live.update(self._table())

    def trained(self, version: str, diagnostics: Mapping[str, float]) -> None:
        self._last_version = version
        self._last = {k: diagnostics[k] for k in SHOWN if k in diagnostics}
        if self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        table = Table(title="thumbtune learner", show_header=False, min_width=40)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in self._status.items():
            table.add_row(name, value)
        table.add_section()
        table.add_row("last update", self._last_version)
        for name, value in self._last.items():
            table.add_row(name, f"{value:.4g}")
        return table
