"""The adapter store in S3, against moto's S3 server on 127.0.0.1: the learner publishes versions into a
bucket, two servers load and serve them from there, with the same sha256 checks as the directory store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner.config import LearnerSettings
from learner.policy import Policy
from learner.replay import run_from_file
from tests.support.api import USER
from tests.support.learner import make_prompts, sample_events, tiny_base
from tests.unit.test_adapter_store import manifest, writer
from thumbtune.cli.process import free_port
from thumbtune.core.contract import MANIFEST
from thumbtune.core.settings import Settings
from thumbtune.core.store import VersionExists, make_adapter_store

moto_server = pytest.importorskip("moto.server", reason="NO MOTO: the S3 adapter store is untested here")
s3fs = pytest.importorskip("s3fs", reason="NO S3FS: the S3 adapter store is untested here")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 server of the module's own, credentials and endpoint in the environment as a pod would have
    them; yields a bucket."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"thumbtune-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        try:
            yield bucket
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def test_publication_and_checks_on_s3(s3: str, tmp_path: Path) -> None:
    store = make_adapter_store(f"s3://{s3}/checks", tmp_path / "cache")
    store.write_version("v1", writer(), manifest("v1"))
    assert store.versions() == ["v1"] and store.verify("v1") == []
    with pytest.raises(VersionExists):
        store.write_version("v1", writer(b"again"), manifest("v1"))
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3}/checks/v2/adapter_model.safetensors", b"no manifest: not a version")
    assert store.versions() == ["v1"]
    fs.pipe_file(f"{s3}/checks/v1/adapter_model.safetensors", b"tampered in the bucket")
    assert store.verify("v1") == []  # this reader serves the copy it downloaded and checked
    fresh = make_adapter_store(f"s3://{s3}/checks", tmp_path / "another-reader")
    assert fresh.verify("v1") == ["adapter_model.safetensors: sha256 mismatch"]
    assert (store.directory("v1") / MANIFEST).is_file()


def test_the_learner_publishes_into_a_bucket_and_two_servers_serve_it(
    s3: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    client_factory,  # noqa: ANN001
) -> None:
    url = f"s3://{s3}/adapters-{uuid.uuid4().hex[:6]}"
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "learner-cache", adapter_store=url)
    base = tiny_base(tiny_model_dir, tmp_path)
    policy = Policy.fresh(base.model, settings, torch.device("cpu"))
    prompts = make_prompts(4, 4, seed=0)
    events = sample_events(
        policy, base, prompts, 4, 4, lambda r: 1.0 if r[0] % 2 else -1.0, torch.Generator()
    )
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(e.model_dump_json() for e in events) + "\n")
    learner_settings = LearnerSettings(batch_size=8, min_batch=4, epochs=1, minibatch_size=8)

    versions = run_from_file(settings, learner_settings, path, once=True)
    assert versions == ["v1", "v2"]
    assert run_from_file(settings, learner_settings, path, once=True) == []  # resumed from the bucket

    servers = [
        client_factory(adapter_store=url, adapter_follow=False, cache_dir=tmp_path / f"server-{i}")
        for i in range(2)
    ]
    for client in servers:
        assert client.app.state.runtime.adapters.live == "v2"
        answer = client.post(
            "/v1/chat/completions", json={"model": "thumbtune", "messages": USER, "max_tokens": 2}
        )
        assert answer.status_code == 200 and answer.headers["x-thumbtune-adapter-version"] == "v2"
    assert (tmp_path / "server-0" / "adapter-cache").is_dir()  # each server read its own copy
