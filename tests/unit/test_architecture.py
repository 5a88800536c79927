"""The shape of the code base stays what docs/ARCHITECTURE.md says. The layers themselves are import-linter's
contracts (pyproject.toml), which `make test` checks before the suite runs; these are the house rules
beside them."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from setuptools import find_packages

from tests.support import ROOT

PRODUCT = ("thumbtune", "service", "learner")
TOP_LEVEL_FOLDERS = ("thumbtune", "service", "learner", "benchmarks", "tests", "docs", "deploy", "helm")
MAX_LINES = 400


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_no_product_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules(*PRODUCT)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by concept: {long}"


def test_every_function_local_import_says_why() -> None:
    """A function-local import is a smell unless its comment says why (``# lazy: <why>``): start-up time, an
    optional extra. Never to dodge a layer: import-linter sees these imports too."""
    silent = []
    for path in modules(*PRODUCT, "benchmarks"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    said = lines[inner.lineno - 1] + lines[inner.lineno - 2]
                    if "# lazy:" not in said:
                        silent.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert silent == [], "function-local imports without a '# lazy: <why>' comment"


def test_the_wheel_and_the_images_ship_the_product_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {name.split(".")[0] for name in find_packages(str(ROOT), include=include)}
    assert shipped == set(PRODUCT)
    dockerfiles = [p for p in sorted((ROOT / "deploy").glob("Dockerfile.*")) if p.suffix != ".dockerignore"]
    assert dockerfiles
    for dockerfile in dockerfiles:
        copied = re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), flags=re.M)
        sources = {s.rstrip("/") for line in copied for s in line.split()}
        assert sources <= {"pyproject.toml", "README.md", *PRODUCT}, (dockerfile.name, sources)


def test_every_top_level_folder_says_what_lives_there() -> None:
    for folder in TOP_LEVEL_FOLDERS:
        readme = ROOT / folder / "README.md"
        assert readme.is_file() and len(readme.read_text().split()) > 20, f"{folder}/ has no README.md"
