"""Helpers for the operator artefacts' tests (helm/, deploy/): paths, settings names, metric names, promtool.

The alert rules and the Grafana dashboard name metrics in PromQL; `referenced_metrics` pulls those names out,
`defined_metrics` lists what service/metrics.py and learner/metrics.py export, with the suffixes Prometheus
sees (``_total`` of counters, ``_bucket`` / ``_sum`` / ``_count`` of histograms).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import learner.metrics
import service.metrics
from learner.config import LearnerSettings
from tests.support import ROOT
from thumbtune.core.settings import Settings

CHART = ROOT / "helm" / "thumbtune"
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "thumbtune.json"

_METRIC = re.compile(r"\b(thumbtune_[a-z0-9_]+)\b")
# Grafana's own variables, as a dashboard query would have them substituted.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def setting_names() -> set[str]:
    """Every variable the code reads: Settings (THUMBTUNE_*) and LearnerSettings (THUMBTUNE_LEARNER_*)."""
    names = {f"THUMBTUNE_{name.upper()}" for name in Settings.model_fields}
    return names | {f"THUMBTUNE_LEARNER_{name.upper()}" for name in LearnerSettings.model_fields}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries() -> list[str]:
    """Every panel's PromQL with Grafana's variables substituted, ready for Prometheus."""
    queries = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(expr)
    return queries


def referenced_metrics(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def alert_and_dashboard_metrics() -> set[str]:
    return referenced_metrics([rule["expr"] for rule in alert_rules()] + dashboard_queries())


def defined_metrics() -> set[str]:
    """Series names the server and the learner export, as Prometheus stores them."""
    registries = (service.metrics.REGISTRY, learner.metrics.REGISTRY)
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "summary": ["_sum", "_count", ""],
        "info": ["_info"],
    }
    names = set()
    for family in (f for registry in registries for f in registry.collect()):
        if family.name.startswith("thumbtune_"):
            names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


def debian_binary(name: str) -> str:
    """Path of Debian's prometheus package's `name` (promtool, prometheus), or a loud skip."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        pytest.skip(
            f"!!! {name} is missing: `make test` installs Debian's prometheus package as root "
            f"(apt-get install prometheus); without it this test is SKIPPED !!!"
        )
    return path
