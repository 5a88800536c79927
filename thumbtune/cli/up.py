"""`thumbtune up`: the whole system as child processes, with prefixed logs and a clean stop.

Starts the embedded broker (unless THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS names another broker), with
THUMBTUNE_ENGINE=vllm a vLLM server (unless THUMBTUNE_VLLM_URL names one; thumbtune/cli/vllm.py),
the server and the learner, waits until each is ready, prints where to reach them, and on Ctrl-C or
SIGTERM stops them in reverse order (SIGTERM, then SIGKILL after a grace period), leaving no
process behind. Each child also gets SIGTERM if this process dies without cleaning up
(thumbtune/cli/process.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from learner.config import LearnerSettings
from thumbtune.cli.process import ChildExited, ChildProcess
from thumbtune.cli.vllm import VLLMNotInstalled, vllm_command, vllm_python, vllm_url
from thumbtune.core.settings import Settings

GRACE_S = 20.0
BROKER_READY_LINE = "thumbtune broker: Kafka protocol on"
"""What `thumbtune broker` prints once its topics exist (thumbtune/cli/broker.py)."""


def _echo(name: str) -> Callable[[str], None]:
    def echo(line: str) -> None:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()

    return echo


def _child(name: str, *command: str, env: dict[str, str]) -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-m", "thumbtune.cli", *command], env=env, on_line=_echo(name))


def canaries(share: str) -> str:
    if float(share) == 0:
        return "off: new versions go live at once (THUMBTUNE_CANARY_SHARE=0.1 tries them on 10% of users)"
    return f"{float(share):.0%} of users get each new version until it is promoted or refused"


def up(settings: Settings) -> int:
    """Run until a signal or a child's death; returns the exit code."""
    learner_settings = LearnerSettings()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "THUMBTUNE_CANARY_SHARE" not in env:  # one replica tried by one person: a canary would never be judged
        env["THUMBTUNE_CANARY_SHARE"] = "0"
    local_bootstrap = f"{settings.broker_host}:{settings.broker_port}"
    embedded = settings.kafka_bootstrap_servers in (local_bootstrap, f"localhost:{settings.broker_port}")
    children: list[ChildProcess] = []
    code = 0
    try:
        if embedded:
            broker = _child("broker", "broker", env=env)
            children.append(broker.start())
            broker.wait_line(BROKER_READY_LINE, 60)
        else:
            print(f"[up] using the Kafka at {settings.kafka_bootstrap_servers}", flush=True)
        engine = "embedded (thumbtune's own)"
        if settings.engine == "vllm":
            if settings.vllm_url is None:  # start one; the server generates through it
                argv, vllm_env = vllm_command(settings, vllm_python(settings))
                vllm = ChildProcess("vllm", argv, env=dict(vllm_env, **env), on_line=_echo("vllm"))
                children.append(vllm.start())
                env["THUMBTUNE_VLLM_URL"] = vllm_url(settings)
                vllm.wait_http(f"{env['THUMBTUNE_VLLM_URL']}/v1/models", 900)
            engine = f"vllm at {env.get('THUMBTUNE_VLLM_URL', settings.vllm_url)}"
        server = _child("server", "serve", env=env)
        children.append(server.start())
        base = f"http://{settings.host}:{settings.port}"
        server.wait_http(f"{base}/readyz", 600)
        learner = _child("learner", "learn", env=env)
        children.append(learner.start())
        learner_metrics = "(off: THUMBTUNE_LEARNER_METRICS_PORT=0)"
        if learner_settings.metrics_port:
            learner_metrics = (
                f"http://{learner_settings.metrics_host}:{learner_settings.metrics_port}/metrics"
            )
            learner.wait_http(learner_metrics, 600)
        print(
            f"\n[up] thumbtune is ready.\n"
            f"[up]   API base:  {base}/v1   (OpenAI-compatible; model 'thumbtune')\n"
            f"[up]   Feedback:  POST {base}/v1/feedback\n"
            f"[up]   Metrics:   {base}/metrics (server), {learner_metrics} (learner)\n"
            f"[up]   Adapters:  {settings.adapter_store_path}\n"
            f"[up]   Kafka:     {settings.kafka_bootstrap_servers}\n"
            f"[up]   Engine:    {engine}\n"
            f"[up]   Canaries:  {canaries(env['THUMBTUNE_CANARY_SHARE'])}\n"
            f"[up] Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if not c.alive]
            if dead:
                print(f"[up] {dead[0].name} exited with code {dead[0].returncode}; stopping", flush=True)
                code = 1
                break
    except (ChildExited, TimeoutError, VLLMNotInstalled) as exc:
        print(f"[up] {exc}; stopping", flush=True)
        code = 1
    finally:
        deadline = time.monotonic() + GRACE_S
        # learner, then server (it flushes feedback to the broker), then broker
        for child in reversed(children):
            child.stop(grace=max(0.1, deadline - time.monotonic()))
        print("[up] stopped", flush=True)
    return code
