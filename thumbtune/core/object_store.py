"""The adapter store in object storage (``s3://``, ``gs://``, ``az://``, ... through fsspec): the same
versions, manifests and sha256 checks as the directory store, without rename.

Layout: ``<url>/v<N>/<file>`` for each file of a version and ``<url>/v<N>/manifest.json``. Object stores
cannot rename a directory into place, so publication is ordered instead:

    1. delete whatever a crashed earlier write of v<N> left (objects without a manifest are nobody's)
    2. upload every file of the version
    3. upload manifest.json last, only if it is absent (a conditional write where the store has one:
       S3's If-None-Match, GCS's generation match; else after a check, safe with one writer)

A version exists exactly when its manifest does: `versions` and `read_manifest` see a whole version or
none, a crash between 2 and 3 leaves files that nothing reads and the next write of that version
replaces, and a published version is never overwritten. The manifest holds every file's sha256, as in
the directory store.

Readers (servers, the learner resuming) need files on disk for peft and safetensors: `directory`
downloads a version once into a local cache (versions are immutable), manifest last, so a cached copy
with a manifest is complete; `verify` hashes that copy against the stored manifest, and downloads it
again once if the copy is damaged. Credentials and endpoints come from the environment as the
filesystem reads them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or
FSSPEC_S3_ENDPOINT_URL, or the pod's IAM role).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from thumbtune.core.contract import MANIFEST, AdapterManifest, dumps, version_number
from thumbtune.core.store import VersionExists, check_files, relative_files, sha256_file

INSTALL_HINTS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class FsspecAdapterStore:
    """Adapter versions under an fsspec URL; see the module docstring for how publication stays atomic."""

    def __init__(self, url: str, cache_dir: str | Path) -> None:
        self.url = url.rstrip("/")
        scheme = self.url.split("://", 1)[0]
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            package = INSTALL_HINTS.get(scheme, f"the fsspec implementation of {scheme}://")
            raise ValueError(
                f"THUMBTUNE_ADAPTER_STORE={url}: {scheme}:// needs {package} (pip install {package}): {exc}"
            ) from exc
        except ValueError as exc:
            raise ValueError(f"THUMBTUNE_ADAPTER_STORE={url}: {exc}") from exc
        if isinstance(self.fs, LocalFileSystem):
            raise ValueError(f"{url} is a local path: use the directory store (make_adapter_store)")
        self.cache = Path(cache_dir).expanduser() / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FsspecAdapterStore({self.url!r})"

    def _key(self, version: str, name: str = "") -> str:
        version_number(version)  # refuse anything that is not a version name (no path tricks)
        return f"{self.root}/{version}/{name}" if name else f"{self.root}/{version}"

    def versions(self) -> list[str]:
        """Published versions (those with a manifest), oldest first. Listings are read afresh each time:
        new versions appear while a reader runs."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.glob(f"{self.root}/v*/{MANIFEST}")
        except FileNotFoundError:
            return []
        names = {p.rstrip("/").split("/")[-2] for p in found}
        valid = [v for v in names if v[1:].isdigit()]
        return sorted(valid, key=version_number)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def next_version(self) -> str:
        """One past the highest published version (v1 on an empty store: v0 is the empty adapter)."""
        return f"v{max((version_number(v) for v in self.versions()), default=0) + 1}"

    def read_manifest(self, version: str) -> AdapterManifest:
        key = self._key(version, MANIFEST)
        try:
            data = self.fs.cat_file(key)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"adapter version {version} has no manifest at {self.url}/{version}/{MANIFEST}; the store "
                f"has {self.versions()}"
            ) from None
        return AdapterManifest.model_validate_json(data)

    def write_version(
        self, version: str, files_writer: Callable[[Path], None], manifest: AdapterManifest
    ) -> str:
        """Publish a new version (files, then the manifest) and return its URL; `VersionExists` if it is
        already published, before or during the write."""
        if manifest.version != version:
            raise ValueError(f"manifest is for {manifest.version} but the version being written is {version}")
        manifest_key = self._key(version, MANIFEST)
        if self.fs.exists(manifest_key):
            raise VersionExists(f"adapter {version} already exists at {self.url}; versions are immutable")
        if self.fs.exists(self._key(version)):
            self.fs.rm(self._key(version), recursive=True)  # a crashed write's leftovers
        with tempfile.TemporaryDirectory(prefix=f"thumbtune-{version}-") as tmp:
            files_writer(Path(tmp))
            if (Path(tmp) / MANIFEST).exists():
                raise ValueError(f"files_writer must not write {MANIFEST}; the store writes it last")
            hashes = {}
            for rel in relative_files(Path(tmp)):
                hashes[rel.as_posix()] = sha256_file(Path(tmp) / rel)
                self.fs.put_file(str(Path(tmp) / rel), self._key(version, rel.as_posix()))
        body = dumps(manifest.model_copy(update={"sha256": hashes})).encode()
        try:
            with self.fs.open(manifest_key, "xb") as f:  # only if absent
                f.write(body)
        except FileExistsError as exc:
            raise VersionExists(f"adapter {version} appeared at {self.url} during the write") from exc
        except (NotImplementedError, ValueError):  # no conditional writes here: one writer, checked above
            if self.fs.exists(manifest_key):
                raise VersionExists(f"adapter {version} appeared at {self.url} during the write") from None
            self.fs.pipe_file(manifest_key, body)
        self.fs.invalidate_cache(self.root)
        return f"{self.url}/{version}"

    def directory(self, version: str) -> Path:
        """The version's files on local disk (downloaded into the cache on first use, manifest last)."""
        version_number(version)  # before any path is made of it
        local = self.cache / version
        if (local / MANIFEST).is_file():
            return local
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.cache))
        try:
            prefix = self._key(version) + "/"
            self.fs.invalidate_cache(self._key(version))
            keys = [k for k in self.fs.find(prefix) if k.startswith(prefix)]
            if prefix + MANIFEST not in keys:
                raise FileNotFoundError(f"adapter version {version} is not published in {self.url}")
            for key in sorted(keys, key=lambda k: k == prefix + MANIFEST):  # the manifest last
                target = tmp / key[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(key, str(target))
            try:
                os.rename(tmp, local)
            except OSError:
                if not (local / MANIFEST).is_file():  # not a concurrent download that won: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def verify(self, version: str) -> list[str]:
        """Problems with a version's files against its stored manifest; [] when intact. A damaged cached
        copy is downloaded again once before anything is reported."""
        expected = self.read_manifest(version).sha256
        problems: list[str] = []
        for attempt in range(2):
            directory = self.directory(version)
            problems = check_files(directory, expected)
            if not problems or attempt == 1:
                break
            shutil.rmtree(directory, ignore_errors=True)
        return problems
