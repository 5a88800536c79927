"""deploy/prometheus passes promtool: the config and the alert rules parse, and the rules' unit tests
(alerts_test.yml: synthetic series in, expected alerts out) pass. Also, offline: every metric the rules
and the Grafana dashboard name is one the code exports, and they cover what an operator needs.

promtool is Debian's (package prometheus, installed by `make test` when it can); without it the promtool
tests are skipped with a loud reason.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.deploy import (
    ALERTS,
    DEPLOY,
    PROMETHEUS_CONFIG,
    alert_and_dashboard_metrics,
    alert_rules,
    dashboard,
    dashboard_panels,
    debian_binary,
    defined_metrics,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [debian_binary("promtool"), *args],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.prometheus
def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.prometheus
def test_promtool_accepts_the_prometheus_config_and_its_rule_file() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@pytest.mark.prometheus
def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_name_only_metrics_the_code_exports() -> None:
    referenced = alert_and_dashboard_metrics()
    assert len(referenced) > 30
    assert referenced - defined_metrics() == set()


def test_alert_rules_cover_the_loop_and_say_what_to_do() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "ThumbtuneHighErrorRate",
        "ThumbtuneChatLatencyP99High",
        "ThumbtuneTimeToFirstTokenP99High",
        "ThumbtuneFeedbackSpoolGrowing",
        "ThumbtuneKafkaUnreachable",
        "ThumbtuneFeedbackRefused",
        "ThumbtuneApprovalDropped",
        "ThumbtuneAdapterRefused",
        "ThumbtuneAdapterRolledBack",
        "ThumbtuneControlDecisionFailed",
        "ThumbtuneControlUnreachable",
        "ThumbtuneLearnerLagGrowing",
        "ThumbtuneLearnerNotProducingVersions",
        "ThumbtuneLearnerDown",
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    readme = (DEPLOY.parent / "README.md").read_text()
    operating = readme[readme.index("## Operating thumbtune") :]
    for name in rules:  # the README says what each alert means and what to do
        assert f"`{name}`" in operating, name


def test_dashboard_shows_the_loop_at_a_glance() -> None:
    board = dashboard()
    assert board["uid"] == "thumbtune"
    assert board["templating"]["list"][0] == {
        **board["templating"]["list"][0],
        "type": "datasource",
        "query": "prometheus",
        "name": "datasource",
    }
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    text = "\n".join(t["expr"] for p in panels for t in p["targets"])
    wanted = {  # what the issue asks the dashboard to show -> a metric that shows it
        "request rate and errors": "thumbtune_http_requests_total",
        "latency p50/p99": "thumbtune_http_request_duration_seconds_bucket",
        "time to first token": "thumbtune_time_to_first_token_seconds_bucket",
        "tokens/s": "thumbtune_generated_tokens_total",
        "batch size": "thumbtune_batch_size_bucket",
        "feedback rate": "thumbtune_feedback_total",
        "approval by adapter version": "thumbtune_feedback_approvals_total",
        "learner reward": "thumbtune_learner_mean_reward",
        "KL to base": "thumbtune_learner_kl_ref_nats",
        "beta": "thumbtune_learner_beta",
        "clip fraction": "thumbtune_learner_clip_fraction",
        "lag": "thumbtune_learner_consumer_lag",
        "swaps": "thumbtune_adapter_swaps_total",
        "refusals": "thumbtune_adapter_refused_total",
        "the canary's test": "thumbtune_canary_approval_difference",
        "approval per version, every replica's": "thumbtune_version_approval_rate",
        "Elo per version": "thumbtune_version_elo",
        "control decisions": "thumbtune_control_decisions_total",
    }
    assert [what for what, metric in wanted.items() if metric not in text] == []
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text
