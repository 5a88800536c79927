"""learner/store.py: immutable, atomically written adapter versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thumbtune.core.contract import MANIFEST, AdapterManifest
from thumbtune.core.object_store import FsspecAdapterStore
from thumbtune.core.store import LocalAdapterStore, VersionExists, make_adapter_store, sha256_file


def manifest(version: str, parent: str | None = "v0") -> AdapterManifest:
    return AdapterManifest(
        version=version,
        parent=parent,
        base_model="tiny",
        base_fingerprint="f" * 32,
        created_at=1.0,
        event_count=2,
        event_ids=["a", "b"],
        diagnostics={"kl_ref": 0.5},
    )


def writer(payload: bytes = b"weights"):
    def write(tmp: Path) -> None:
        (tmp / "adapter_model.safetensors").write_bytes(payload)
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "nested.txt").write_text("x")

    return write


def test_write_version_hashes_every_file_and_writes_the_manifest_last(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path / "adapters")
    path = store.write_version("v1", writer(), manifest("v1"))

    assert path == tmp_path / "adapters" / "v1"
    written = store.read_manifest("v1")
    assert set(written.sha256) == {"adapter_model.safetensors", "adapter_config.json", "sub/nested.txt"}
    assert written.sha256["adapter_model.safetensors"] == sha256_file(path / "adapter_model.safetensors")
    assert written.event_ids == ["a", "b"] and written.diagnostics == {"kl_ref": 0.5}
    assert json.loads((path / MANIFEST).read_text())["version"] == "v1"
    assert [p.name for p in store.root.iterdir()] == ["v1"]  # no temp directory left behind
    assert store.verify("v1") == []


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path)
    store.write_version("v1", writer(b"first"), manifest("v1"))
    with pytest.raises(VersionExists, match="immutable"):
        store.write_version("v1", writer(b"second"), manifest("v1"))
    assert (tmp_path / "v1" / "adapter_model.safetensors").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_a_version_appearing_during_the_write_is_not_replaced(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path)

    def racing_writer(tmp: Path) -> None:
        writer(b"mine")(tmp)
        (tmp_path / "v1").mkdir()  # another learner renames its v1 into place meanwhile
        (tmp_path / "v1" / "adapter_model.safetensors").write_bytes(b"theirs")

    with pytest.raises(VersionExists, match="during the write"):
        store.write_version("v1", racing_writer, manifest("v1"))
    assert (tmp_path / "v1" / "adapter_model.safetensors").read_bytes() == b"theirs"


def test_a_failed_write_leaves_no_version_and_no_temp_dir(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path)

    def failing(tmp: Path) -> None:
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_version("v1", failing, manifest("v1"))
    assert list(tmp_path.iterdir()) == []
    assert store.versions() == [] and store.latest() is None and store.next_version() == "v1"


def test_versions_sort_numerically_and_ignore_temp_and_incomplete_dirs(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path)
    for version in ("v2", "v10", "v1"):
        store.write_version(version, writer(), manifest(version))
    crashed = tmp_path / ".tmp-v11-abc"  # a writer died after writing everything but the rename
    crashed.mkdir()
    (crashed / MANIFEST).write_text(manifest("v11").model_dump_json())
    (tmp_path / "v4").mkdir()  # no manifest: not a version
    (tmp_path / "vx").mkdir()
    (tmp_path / "notes.txt").write_text("hi")

    assert store.versions() == ["v1", "v2", "v10"]
    assert store.latest() == "v10"
    assert store.next_version() == "v11"


def test_verify_reports_changed_missing_and_unlisted_files(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path)
    path = store.write_version("v1", writer(), manifest("v1"))
    (path / "adapter_model.safetensors").write_bytes(b"tampered")
    (path / "sub" / "nested.txt").unlink()
    (path / "extra.bin").write_bytes(b"?")

    assert store.verify("v1") == [
        "adapter_model.safetensors: sha256 mismatch",
        "sub/nested.txt: missing",
        "extra.bin: not in the manifest",
    ]


def test_manifest_must_name_the_version_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest is for v2"):
        LocalAdapterStore(tmp_path).write_version("v1", writer(), manifest("v2"))


def test_version_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an adapter version name"):
        LocalAdapterStore(tmp_path).path("../etc")


def test_store_urls(tmp_path: Path) -> None:
    assert make_adapter_store(str(tmp_path)).root == tmp_path
    assert make_adapter_store(f"file://{tmp_path}").root == tmp_path
    assert isinstance(make_adapter_store(f"memory://{tmp_path.name}", tmp_path), FsspecAdapterStore)
    with pytest.raises(ValueError, match="THUMBTUNE_ADAPTER_STORE=nosuch://x"):
        make_adapter_store("nosuch://x", tmp_path)
