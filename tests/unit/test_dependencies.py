"""Every runtime dependency has an upper bound, and what is installed (what the suite tests) is inside it."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
RUNTIME = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]


@pytest.mark.parametrize("req", RUNTIME, ids=lambda r: r.name)
def test_runtime_dependency_is_bounded_above_and_installed_inside(req: Requirement) -> None:
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
        f"{req} has no upper bound: bound it by the newest release the suite passed on"
    )
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed: run `make install-test`")
    assert req.specifier.contains(installed, prereleases=True), (
        f"installed {req.name} {installed} is outside {req.specifier}: the suite is testing another release "
        "than the one pyproject.toml promises"
    )
