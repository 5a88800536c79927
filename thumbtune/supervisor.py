"""`thumbtune up`: the whole system as child processes, with prefixed logs and a clean stop.

Starts the embedded broker (unless THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS names another broker),
the server and the learner, waits until each is ready, prints where to reach them, and on Ctrl-C or
SIGTERM stops them in reverse order (SIGTERM, then SIGKILL after a grace period), leaving no
process behind. Each child also gets SIGTERM if this process dies without cleaning up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from thumbtune.broker import parent_death_hook
from thumbtune.settings import Settings

GRACE_S = 20.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    """Recent output lines (bounded), so `up` can wait for a readiness line."""

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=parent_death_hook(),
        )
        t = threading.Thread(target=self._pump, daemon=True)
        t.start()
        self.threads.append(t)

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.seen = [*self.seen[-50:], line]
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for t in self.threads:
            t.join(2)


def _wait_line(child: Child, text: str, timeout: float) -> None:
    """Wait for a line the child prints once it is ready (the broker prints it after creating the topics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in child.seen):
            return
        if not child.alive:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} was not ready within {timeout:.0f} s")


def _wait_http(url: str, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{child.name} was not ready at {url} within {timeout:.0f} s")


def up(settings: Settings) -> int:
    """Run until a signal or a child's death; returns the exit code."""
    from learner.config import LearnerSettings

    learner_settings = LearnerSettings()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    exe = [sys.executable, "-m", "thumbtune.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    local_bootstrap = f"{settings.broker_host}:{settings.broker_port}"
    embedded = settings.kafka_bootstrap_servers in (local_bootstrap, f"localhost:{settings.broker_port}")
    children: list[Child] = []
    code = 0
    try:
        if embedded:
            broker = Child("broker", [*exe, "broker"])
            children.append(broker)
            broker.start(env)
            _wait_line(broker, "thumbtune broker: Kafka protocol on", 60)
        else:
            print(f"[up] using the Kafka at {settings.kafka_bootstrap_servers}", flush=True)
        server = Child("server", [*exe, "serve"])
        children.append(server)
        server.start(env)
        base = f"http://{settings.host}:{settings.port}"
        _wait_http(f"{base}/readyz", server, 600)
        learner = Child("learner", [*exe, "learn"])
        children.append(learner)
        learner.start(env)
        learner_metrics = "(off: THUMBTUNE_LEARNER_METRICS_PORT=0)"
        if learner_settings.metrics_port:
            learner_metrics = (
                f"http://{learner_settings.metrics_host}:{learner_settings.metrics_port}/metrics"
            )
            _wait_http(learner_metrics, learner, 600)
        print(
            f"\n[up] thumbtune is ready.\n"
            f"[up]   API base:  {base}/v1   (OpenAI-compatible; model 'thumbtune')\n"
            f"[up]   Feedback:  POST {base}/v1/feedback\n"
            f"[up]   Metrics:   {base}/metrics (server), {learner_metrics} (learner)\n"
            f"[up]   Adapters:  {settings.adapter_store_path}\n"
            f"[up]   Kafka:     {settings.kafka_bootstrap_servers}\n"
            f"[up] Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if not c.alive]
            if dead:
                print(f"[up] {dead[0].name} exited with code {dead[0].proc.returncode}; stopping", flush=True)
                code = 1
                break
    except RuntimeError as exc:
        print(f"[up] {exc}; stopping", flush=True)
        code = 1
    finally:
        deadline = time.monotonic() + GRACE_S
        # learner, then server (it flushes feedback to the broker), then broker
        for child in reversed(children):
            child.terminate()
            child.wait_or_kill(deadline)
        print("[up] stopped", flush=True)
    return code
