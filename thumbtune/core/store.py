"""The adapter store: one immutable directory per version, ``<root>/v<N>/``, written atomically.

The learner writes versions, the servers read and verify them. A version holds the files the contract
names (thumbtune/core/contract.py: the PEFT adapter, the value head, the learner state) and its
`MANIFEST` (`AdapterManifest`, with the sha256 of every other file).
A writer fills a ``.tmp-*`` directory beside the versions, fsyncs every file, writes the manifest
last and renames the directory to ``v<N>``: a reader sees a whole version or none, a crash leaves
only a ``.tmp-*`` directory that `versions` ignores, and a rename never replaces an existing
version (the target would be a non-empty directory), so versions are never overwritten.

That is the directory store (a path or ``file://`` URL, the default). Object storage (``s3://``,
``gs://``, ...) has no rename: thumbtune/core/object_store.py publishes there by writing the manifest last.
`make_adapter_store` is the one place that maps a URL to a store; `AdapterStore` is what both offer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from thumbtune.core.contract import MANIFEST, AdapterManifest, dumps, version_number

TEMP_PREFIX = ".tmp-"
_VERSION_DIR = re.compile(r"^v\d+$")


class VersionExists(FileExistsError):
    """The version is already in the store; versions are immutable, pick `next_version()`."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def relative_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, as paths relative to it, sorted."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def check_files(directory: Path, expected: dict[str, str]) -> list[str]:
    """Problems with the files under ``directory`` against a manifest's sha256 (name -> digest): missing,
    mismatched, or not in the manifest; [] when intact. Every store's `verify`."""
    problems = []
    for name, digest in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 mismatch")
    for rel in relative_files(directory):
        name = rel.as_posix()
        if name != MANIFEST and name not in expected:
            problems.append(f"{name}: not in the manifest")
    return problems


class LocalAdapterStore:
    """Adapter versions as directories under ``root`` (created on first use)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalAdapterStore({str(self.root)!r})"

    def _version_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name)]

    def versions(self) -> list[str]:
        """Complete versions (a ``v<N>`` directory with a manifest), oldest first: v2 before v10."""
        complete = [v for v in self._version_dirs() if (self.root / v / MANIFEST).is_file()]
        return sorted(complete, key=version_number)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def next_version(self) -> str:
        """One past the highest ``v<N>`` directory present (v1 on an empty store: v0 is the empty adapter)."""
        numbers = [version_number(v) for v in self._version_dirs()]
        return f"v{max(numbers, default=0) + 1}"

    def path(self, version: str) -> Path:
        version_number(version)  # refuse anything that is not a version name (no path tricks)
        return self.root / version

    def directory(self, version: str) -> Path:
        """The version's files on local disk: here, where they are stored."""
        return self.path(version)

    def read_manifest(self, version: str) -> AdapterManifest:
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"adapter version {version} has no manifest at {path}; the store has {self.versions()}"
            )
        return AdapterManifest.model_validate_json(path.read_text())

    def write_version(
        self, version: str, files_writer: Callable[[Path], None], manifest: AdapterManifest
    ) -> Path:
        """Write a new version atomically and return its directory.

        ``files_writer(tmpdir)`` writes the version's files; then every file is fsynced and hashed into
        ``manifest.sha256``, manifest.json is written last, and the directory is renamed into place.
        Raises `VersionExists` if ``version`` is already there (before or during the write).
        """
        if manifest.version != version:
            raise ValueError(f"manifest is for {manifest.version} but the version being written is {version}")
        target = self.path(version)
        if target.exists():
            raise VersionExists(f"adapter {version} already exists at {target}; versions are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{version}-", dir=self.root))
        try:
            files_writer(tmp)
            if (tmp / MANIFEST).exists():
                raise ValueError(f"files_writer must not write {MANIFEST}; the store writes it last")
            hashes = {}
            for rel in relative_files(tmp):
                _fsync(tmp / rel)
                hashes[rel.as_posix()] = sha256_file(tmp / rel)
            (tmp / MANIFEST).write_text(dumps(manifest.model_copy(update={"sha256": hashes})))
            _fsync(tmp / MANIFEST)
            for sub in sorted({p.parent for p in relative_files(tmp)}, key=lambda p: -len(p.parts)):
                _fsync(tmp / sub)
            try:
                os.rename(tmp, target)  # fails on an existing non-empty target: no overwrite
            except OSError as exc:
                raise VersionExists(f"adapter {version} appeared at {target} during the write") from exc
            _fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def verify(self, version: str) -> list[str]:
        """Problems with a version's files against its manifest's sha256; [] when intact."""
        return check_files(self.path(version), self.read_manifest(version).sha256)


class AdapterStore(Protocol):
    """What the learner and the servers use of a store: `LocalAdapterStore` or
    `thumbtune.core.object_store.FsspecAdapterStore`."""

    def versions(self) -> list[str]: ...
    def latest(self) -> str | None: ...
    def next_version(self) -> str: ...
    def read_manifest(self, version: str) -> AdapterManifest: ...
    def write_version(
        self, version: str, files_writer: Callable[[Path], None], manifest: AdapterManifest
    ) -> Path | str: ...
    def verify(self, version: str) -> list[str]: ...
    def directory(self, version: str) -> Path: ...


def make_adapter_store(uri: str, cache_dir: str | Path | None = None) -> AdapterStore:
    """The store THUMBTUNE_ADAPTER_STORE names: a directory path or ``file://`` URL, else an fsspec URL
    (``s3://bucket/prefix``, ``gs://...``) whose versions are downloaded into ``cache_dir`` to be read
    (default: ~/.cache/thumbtune/adapter-cache)."""
    if not uri:
        raise ValueError("adapter store URL is empty; give a directory (Settings.adapter_store_path has one)")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {uri!r} names host {parsed.netloc!r}; use file:///absolute/path")
        return LocalAdapterStore(parsed.path)
    if parsed.scheme == "":
        return LocalAdapterStore(uri)
    # lazy: fsspec's filesystems load only for an object-store URL (object_store builds on this module)
    from thumbtune.core.object_store import FsspecAdapterStore

    return FsspecAdapterStore(uri, cache_dir or Path("~/.cache/thumbtune/adapter-cache").expanduser())
