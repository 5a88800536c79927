"""`thumbtune up` starts broker, server and learner, serves, and leaves no process behind after SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT
from thumbtune.cli.process import free_port

pytestmark = pytest.mark.broker


def processes_with(marker: str) -> list[int]:
    """Pids whose environment carries the marker: every descendant of `up` inherits it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_up_serves_and_stops_everything_on_sigterm(tiny_model_dir, tmp_path) -> None:  # noqa: ANN001
    marker = f"THUMBTUNE_TEST_MARKER={uuid.uuid4().hex}"
    broker_port, port = free_port(), free_port()
    env = dict(
        os.environ,
        THUMBTUNE_MODEL=str(tiny_model_dir),
        THUMBTUNE_CACHE_DIR=str(tmp_path),
        THUMBTUNE_BROKER_PORT=str(broker_port),
        THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{broker_port}",
        THUMBTUNE_PORT=str(port),
        THUMBTUNE_MAX_CONTEXT="512",
        THUMBTUNE_LEARNER_METRICS_PORT=str(free_port()),
    )
    env[marker.split("=")[0]] = marker.split("=")[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "thumbtune.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "is ready" in line:
                break
        assert any("is ready" in line for line in lines), "".join(lines)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=30,
            json={"model": "thumbtune", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert resp.status_code == 200
        assert len(processes_with(marker)) >= 4  # up, broker (+ tansu), server, learner
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []


EMBEDDED_SYSTEM = """
import sys, time
from pathlib import Path
from benchmarks.system import EmbeddedSystem

root = Path(sys.argv[1])
root.mkdir(parents=True)
with EmbeddedSystem(root, root / "system.log"):
    print("system ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_bench_loops_system_stops_when_bench_loop_is_terminated_or_killed(
    tiny_model_dir,  # noqa: ANN001
    tmp_path,  # noqa: ANN001
    sig: signal.Signals,
) -> None:
    """`thumbtune bench loop` runs `up` in its own session: SIGTERM unwinds through its clean stop, and if
    bench loop is SIGKILLed, `up` gets SIGTERM from the kernel (parent-death signal) and stops everything."""
    marker = f"THUMBTUNE_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(
        os.environ,
        THUMBTUNE_MODEL=str(tiny_model_dir),
        THUMBTUNE_CACHE_DIR=str(tmp_path / "cache"),
        THUMBTUNE_MAX_CONTEXT="512",
    )
    env[marker.split("=")[0]] = marker.split("=")[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_SYSTEM, str(tmp_path / "out")],
        cwd=ROOT,  # benchmarks/ runs from a checkout
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "system ready" in line:
                break
        assert any("system ready" in line for line in lines), "".join(lines)
        assert len(processes_with(marker)) >= 5  # this script, up, broker (+ tansu), server, learner
        proc.send_signal(sig)
        code = proc.wait(timeout=90)
        assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 40
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = processes_with(marker)
    for pid in leftover:  # a failing run must not leave its system running for the rest of the suite
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftover == []
