"""A real Prometheus scrapes a real server and a real learner, and finds every metric that the alert rules and
the Grafana dashboard name; every dashboard query runs.

The loop runs once end to end, so that labelled series exist: chat answers, a thumb up and a thumb down, the
learner (a `thumbtune learn` process on the tiny model, batches of 2) trains v1 from them and announces it,
the server checks it and swaps to it. Prometheus (Debian's, on a free 127.0.0.1 port, a temporary config and
storage) scrapes both every second and loads deploy/prometheus/alerts.yml. It starts with the loop (its
first scrape comes ~5 s after it starts: the discovery manager's update interval) and is asked only once
its newest scrape of both processes is from after v1 went live.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import exited, wait_for
from tests.support.deploy import (
    ALERTS,
    ROOT,
    alert_and_dashboard_metrics,
    alert_rules,
    dashboard_queries,
    debian_binary,
)
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import ChildProcess, free_port

pytestmark = [pytest.mark.broker, pytest.mark.prometheus]


def test_prometheus_scrapes_every_metric_the_alerts_and_dashboard_use(
    live_server_factory,
    tiny_model_dir: Path,
    kafka: EmbeddedBroker,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    prometheus_bin = debian_binary("prometheus")
    store = tmp_path / "adapters"
    learner_port, prometheus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THUMBTUNE_")} | {
        "THUMBTUNE_MODEL": str(tiny_model_dir),
        "THUMBTUNE_CACHE_DIR": str(tmp_path / "learner-cache"),
        "THUMBTUNE_ADAPTER_STORE": str(store),
        "THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "THUMBTUNE_LEARNER_METRICS_HOST": "127.0.0.1",
        "THUMBTUNE_LEARNER_METRICS_PORT": str(learner_port),
        "THUMBTUNE_LEARNER_BATCH_SIZE": "2",
        "THUMBTUNE_LEARNER_MIN_BATCH": "2",
        "THUMBTUNE_LEARNER_EPOCHS": "1",
        "THUMBTUNE_LEARNER_MINIBATCH_SIZE": "2",
        "THUMBTUNE_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "thumbtune.cli", "learn"]
    learner = ChildProcess("the learner", argv, env=env, cwd=ROOT, log=tmp_path / "learner.log").start()
    prometheus: ChildProcess | None = None
    try:
        server = live_server_factory(kafka_bootstrap_servers=kafka.bootstrap, adapter_store=str(store))
        client = httpx.Client(base_url=server.url, timeout=60)
        alive = exited(learner)

        def chat() -> dict:
            resp = client.post(
                "/v1/chat/completions",
                json={
                    "model": "thumbtune",
                    "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 4,
                },
            )
            assert resp.status_code == 200, resp.text
            return resp.json()

        jobs = {"thumbtune-server": server.port, "thumbtune-learner": learner_port}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in jobs.items()
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = ChildProcess(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            cwd=ROOT,
            log=tmp_path / "prometheus.log",
        ).start()
        answers = [chat(), chat()]
        unknown = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert unknown.status_code in (400, 404)
        for answer, thumb in zip(answers, ("up", "down"), strict=True):
            rated = client.post("/v1/feedback", json={"response_id": answer["id"], "thumb": thumb})
            assert rated.status_code == 202, rated.text
        # the learner trains v1 from the two ratings, announces it, and the server makes it live
        wait_for(lambda: chat()["adapter_version"] == "v1", 180, "the server to answer with v1", alive, 0.5)

        live_at = time.time()
        api = httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=10)

        alive_both = exited(learner, prometheus)

        def get(path: str, **params: str) -> dict | None:
            try:
                resp = api.get(path, params=params)
            except httpx.TransportError:
                return None
            return resp.json() if resp.status_code == 200 else None

        def scraped() -> bool:
            targets = (get("/api/v1/targets") or {}).get("data", {}).get("activeTargets", [])
            return len(targets) == 2 and all(t["health"] == "up" for t in targets)

        def scraped_since_v1_live() -> bool:  # the queries below then see the state after the swap
            newest = get("/api/v1/query", query="min(timestamp(up == 1)) and count(up == 1) == 2")
            result = (newest or {}).get("data", {}).get("result", [])
            return bool(result) and float(result[0]["value"][1]) > live_at

        wait_for(scraped, 60, "both targets scraped", alive_both, 0.5)
        wait_for(scraped_since_v1_live, 60, "both scraped since v1 went live", alive_both, 0.5)
        # each metric from the process that owns it: the names are asked for per job
        wanted = alert_and_dashboard_metrics()
        expected = {"thumbtune-learner": {n for n in wanted if n.startswith("thumbtune_learner_")}}
        expected["thumbtune-server"] = wanted - expected["thumbtune-learner"]

        def missing() -> dict[str, list[str]]:
            result = {}
            for job, names in expected.items():
                got = get("/api/v1/label/__name__/values", **{"match[]": f'{{job="{job}"}}'}) or {}
                result[job] = sorted(names - set(got.get("data") or []))
            return result

        try:
            wait_for(lambda: not any(missing().values()), 30, "every metric in Prometheus", alive_both, 0.5)
        except AssertionError:
            raise AssertionError(f"not in Prometheus: {missing()}") from None

        # the loop as Prometheus saw it: v1 live on the server, one version written by the learner (the
        # server's registry is this process's: earlier tests' servers may have left other versions at 1)
        live = get("/api/v1/query", query='thumbtune_active_adapter_info{job="thumbtune-server"} == 1')
        assert "v1" in {r["metric"]["adapter_version"] for r in live["data"]["result"]}
        versions = get("/api/v1/query", query='thumbtune_learner_versions_total{job="thumbtune-learner"}')
        assert [float(r["value"][1]) for r in versions["data"]["result"]] == [1.0]
        # Prometheus parses and runs every dashboard query, and loaded every alert rule
        for query in dashboard_queries():
            result = get("/api/v1/query", query=query)
            assert result is not None and result["status"] == "success", query
        groups = get("/api/v1/rules")["data"]["groups"]
        assert {r["name"] for g in groups for r in g["rules"]} == {r["alert"] for r in alert_rules()}
    finally:
        for process in (prometheus, learner):
            if process is not None:
                process.stop(grace=20)
