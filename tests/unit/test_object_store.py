"""The adapter store on object storage (thumbtune/core/object_store.py), on fsspec's in-memory filesystem:
publication without rename (the manifest last), the same checks as the directory store, the reader's cache.
tests/integration/test_object_store_s3.py runs the learner and two servers against an S3 server."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from tests.unit.test_adapter_store import manifest, writer
from thumbtune.core.contract import MANIFEST
from thumbtune.core.object_store import FsspecAdapterStore
from thumbtune.core.store import VersionExists, make_adapter_store


@pytest.fixture
def url() -> str:
    return f"memory://thumbtune-{uuid.uuid4().hex}/adapters"


@pytest.fixture
def store(url: str, tmp_path: Path) -> FsspecAdapterStore:
    made = make_adapter_store(url, tmp_path / "reader-cache")
    assert isinstance(made, FsspecAdapterStore)
    return made


def test_a_version_is_its_files_then_its_manifest(store: FsspecAdapterStore, url: str) -> None:
    assert store.versions() == [] and store.latest() is None and store.next_version() == "v1"
    assert store.write_version("v1", writer(), manifest("v1")) == f"{url}/v1"
    fs = fsspec.filesystem("memory")
    keys = sorted(k.split("/v1/", 1)[1] for k in fs.find(f"{store.root}/v1"))
    assert keys == ["adapter_config.json", "adapter_model.safetensors", MANIFEST, "sub/nested.txt"]
    written = store.read_manifest("v1")
    assert set(written.sha256) == {"adapter_model.safetensors", "adapter_config.json", "sub/nested.txt"}
    assert store.versions() == ["v1"] and store.next_version() == "v2"
    assert store.verify("v1") == []
    local = store.directory("v1")
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (local / "sub" / "nested.txt").read_text() == "x"


def test_files_without_a_manifest_are_no_version_and_the_next_write_replaces_them(
    store: FsspecAdapterStore,
) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{store.root}/v1/adapter_model.safetensors", b"half a crashed write")
    fs.pipe_file(f"{store.root}/v1/leftover.bin", b"x")
    assert store.versions() == [] and store.next_version() == "v1"
    with pytest.raises(FileNotFoundError, match="no manifest"):
        store.read_manifest("v1")
    store.write_version("v1", writer(b"whole"), manifest("v1"))
    assert store.verify("v1") == []  # the leftover is gone, not "not in the manifest"
    assert (store.directory("v1") / "adapter_model.safetensors").read_bytes() == b"whole"


def test_a_published_version_is_never_overwritten(store: FsspecAdapterStore) -> None:
    store.write_version("v1", writer(b"first"), manifest("v1"))
    with pytest.raises(VersionExists, match="immutable"):
        store.write_version("v1", writer(b"second"), manifest("v1"))
    assert (store.directory("v1") / "adapter_model.safetensors").read_bytes() == b"first"


def test_a_manifest_appearing_during_the_write_wins(store: FsspecAdapterStore) -> None:
    fs = fsspec.filesystem("memory")

    def racing_writer(tmp: Path) -> None:
        writer()(tmp)
        fs.pipe_file(f"{store.root}/v1/{MANIFEST}", b"{}")  # another writer published v1 meanwhile

    with pytest.raises(VersionExists, match="during the write"):
        store.write_version("v1", racing_writer, manifest("v1"))
    assert fs.cat_file(f"{store.root}/v1/{MANIFEST}") == b"{}"


def test_tampered_objects_are_reported_and_a_damaged_cache_is_fetched_again(
    store: FsspecAdapterStore,
) -> None:
    store.write_version("v1", writer(), manifest("v1"))
    local = store.directory("v1")
    (local / "adapter_model.safetensors").write_bytes(b"bit rot on the reader's disk")
    assert store.verify("v1") == []  # downloaded again: the stored version is intact
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{store.root}/v1/adapter_model.safetensors", b"tampered")
    fs.pipe_file(f"{store.root}/v1/extra.bin", b"x")
    fs.rm(f"{store.root}/v1/adapter_config.json")
    (store.directory("v1") / "adapter_model.safetensors").write_bytes(b"stale")
    assert store.verify("v1") == [
        "adapter_config.json: missing",
        "adapter_model.safetensors: sha256 mismatch",
        "extra.bin: not in the manifest",
    ]


def test_versions_sort_by_number_and_names_are_checked(store: FsspecAdapterStore) -> None:
    for v in ("v2", "v10", "v1"):
        store.write_version(v, writer(), manifest(v))
    assert store.versions() == ["v1", "v2", "v10"] and store.latest() == "v10"
    with pytest.raises(ValueError, match="not an adapter version name"):
        store.directory("../etc")


def test_a_second_reader_sees_new_versions(url: str, tmp_path: Path) -> None:
    writer_store = FsspecAdapterStore(url, tmp_path / "a")
    reader = FsspecAdapterStore(url, tmp_path / "b")
    assert reader.versions() == []
    writer_store.write_version("v1", writer(), manifest("v1"))
    assert reader.versions() == ["v1"] and reader.verify("v1") == []


def test_a_local_path_url_is_refused_and_a_missing_package_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local path"):
        FsspecAdapterStore(f"local://{tmp_path}", tmp_path)
    with pytest.raises(ValueError, match="Protocol not known|nosuch"):
        FsspecAdapterStore("nosuch://bucket/x", tmp_path)
