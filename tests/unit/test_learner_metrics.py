"""The learner's /metrics exports the learner's series only, whatever else its process has imported."""

from __future__ import annotations

import re
import urllib.request

import service.metrics  # noqa: F401 - the server's metrics, registered in this process as a server's are
from learner.metrics import start_metrics_server
from thumbtune.cli.process import free_port


def test_the_learners_metrics_have_no_server_series() -> None:
    port = free_port()
    server = start_metrics_server("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    ours = {name for name in families if name.startswith("thumbtune_")}
    assert "thumbtune_learner_events_consumed_total" in ours or "thumbtune_learner_events_consumed" in ours
    assert {name for name in ours if not name.startswith("thumbtune_learner_")} == set()
    assert "process_resident_memory_bytes" in families  # the process's own series stay
