"""The Helm chart (helm/thumbtune) renders, lints clean, validates against Kubernetes' schemas, and wires
only real settings, real routes and the ports the code listens on.

Rendered with Helm's own Go SDK (helm-python-sdk bundles it; no helm binary, no cluster) and validated with
kubernetes-validate's bundled schemas for KUBE_VERSION (strict: unknown fields are errors).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from learner.config import LearnerSettings
from tests.support.deploy import CHART, setting_names
from thumbtune.cli.process import free_port
from thumbtune.core.settings import Settings

KUBE_VERSION = "1.33.0"
KAFKA = "kafka-0.kafka.svc:9092,kafka-1.kafka.svc:9092"

MINIMAL = {"settings": {"THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": KAFKA}}
"""The defaults plus the one required value."""

PRODUCTION = {
    "settings": {
        "THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
        "THUMBTUNE_MODEL": "/var/cache/thumbtune/models/mine",
    },
    "learnerSettings": {"THUMBTUNE_LEARNER_DEVICE": "cuda", "THUMBTUNE_LEARNER_BATCH_SIZE": 64},
    "secrets": {"existingSecret": "thumbtune-credentials"},
    "learner": {
        "gpu": 1,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "chat.example.com",
        "tls": [{"secretName": "chat-tls", "hosts": ["chat.example.com"]}],
    },
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "modelCache": {"type": "persistentVolumeClaim", "storageClass": "nfs"},
    "adapterStore": {"storageClass": "nfs"},
}
"""GPU learner, ingress with TLS, an existing Secret, autoscaling, ServiceMonitors, a shared model cache."""

DATA_PARALLEL = PRODUCTION | {"learner": PRODUCTION["learner"] | {"gpu": 4, "processes": 4}}
"""The production values with a learner of four data-parallel ranks on four GPUs."""

VALUE_SETS = {"minimal": MINIMAL, "production": PRODUCTION, "data-parallel": DATA_PARALLEL}
Release = tuple[str, list[dict], str]
"""(values set name, rendered manifests, NOTES.txt)"""
OWNED = {  # set by the chart from other values (or kept in the Secret): refused under settings
    "settings": [
        "THUMBTUNE_HOST",
        "THUMBTUNE_PORT",
        "THUMBTUNE_CACHE_DIR",
        "THUMBTUNE_SPOOL_DIR",
        "THUMBTUNE_ADAPTER_STORE",
        "THUMBTUNE_API_KEYS",
        "THUMBTUNE_ADMIN_TOKEN",
        "THUMBTUNE_REDIS_URL",
        "THUMBTUNE_KAFKA_SASL_PASSWORD",
        "THUMBTUNE_KAFKA_SSL_PASSWORD",
        "THUMBTUNE_VLLM_API_KEY",
        "THUMBTUNE_KAFKA_SSL_CAFILE",
        "THUMBTUNE_KAFKA_SSL_CERTFILE",
        "THUMBTUNE_KAFKA_SSL_KEYFILE",
    ],
    "learnerSettings": ["THUMBTUNE_LEARNER_METRICS_HOST", "THUMBTUNE_LEARNER_METRICS_PORT"],
}


def render(values: dict) -> tuple[list[dict], str]:
    """(the manifests as dicts, NOTES.txt) for a release "tt" in namespace "thumbtune"."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="tt", namespace="thumbtune", is_install=True)
    notes = rendered.pop("thumbtune/templates/NOTES.txt", "")
    docs = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    return docs, notes


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def release(request: pytest.FixtureRequest) -> Iterator[Release]:
    docs, notes = render(VALUE_SETS[request.param])
    yield request.param, docs, notes


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(docs: list[dict], deployment: str) -> dict:
    (only,) = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    return only


def environment(docs: list[dict], deployment: str) -> dict[str, str | None]:
    """A container's THUMBTUNE_* variables: its ConfigMaps' data, then its env (None = from a Secret)."""
    c = container(docs, deployment)
    config_maps = by_kind(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]["data"]
    for var in c.get("env", []):
        env[var["name"]] = var.get("value")
    return {k: v for k, v in env.items() if k.startswith("THUMBTUNE_")}


def test_chart_without_kafka_fails_with_a_clear_error() -> None:
    with pytest.raises(helm.HelmRenderError, match="THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS is required"):
        render({})


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # warnings and errors


def test_every_manifest_validates_against_the_kubernetes_schemas(release: Release) -> None:
    name, docs, _ = release
    expected = {
        "ConfigMap": 2,
        "Deployment": 2,
        "Service": 2,
        "PersistentVolumeClaim": 1,
        "ServiceAccount": 1,
        "PodDisruptionBudget": 1,
        "Secret": 1,
    }
    if name != "minimal":  # existingSecret, a model-cache claim, ingress, HPA, two ServiceMonitors
        expected |= {
            "Secret": 0,
            "PersistentVolumeClaim": 2,
            "Ingress": 1,
            "HorizontalPodAutoscaler": 1,
            "ServiceMonitor": 2,
        }
    kinds = [d["kind"] for d in docs]
    assert {k: kinds.count(k) for k in expected} == expected
    assert set(kinds) <= set(expected)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: checked against the Services below
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["name"].startswith("tt-thumbtune")


def test_service_monitors_select_the_services_and_their_metrics_ports() -> None:
    docs, _ = render(PRODUCTION)
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    assert sorted(monitors) == ["tt-thumbtune-learner", "tt-thumbtune-server"]
    for monitor in monitors.values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [
            (next(iter(port_names)), "/metrics")
        ]


def test_every_thumbtune_variable_the_chart_sets_is_a_real_setting(release: Release) -> None:
    _, docs, _ = release
    real = setting_names()
    chart_vars = set()
    for cm in by_kind(docs, "ConfigMap").values():
        chart_vars |= set(cm["data"])
    for secret in by_kind(docs, "Secret").values():
        chart_vars |= set(secret.get("stringData") or {})
    for deployment in by_kind(docs, "Deployment"):
        chart_vars |= {
            v["name"]
            for v in container(docs, deployment).get("env", [])
            if v["name"].startswith("THUMBTUNE_")
        }
        for ref in container(docs, deployment).get("env", []):
            if "valueFrom" in ref:  # a Secret's key is the variable's own name
                assert ref["valueFrom"]["secretKeyRef"]["key"] == ref["name"]
    assert chart_vars - real == set(), "the chart sets variables no settings class reads"
    assert not any(k.startswith("THUMBTUNE_LEARNER_") for k in environment(docs, "tt-thumbtune-server"))


def test_rendered_environment_parses_as_the_settings_it_names(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, docs, _ = release
    for deployment, classes in (
        ("tt-thumbtune-server", [Settings]),
        ("tt-thumbtune-learner", [Settings, LearnerSettings]),
    ):
        env = environment(docs, deployment)
        for key, value in env.items():
            if value is not None:
                monkeypatch.setenv(key, value)
        parsed = [cls() for cls in classes]  # raises on a value the code cannot read
        settings = parsed[0]
        assert settings.kafka_bootstrap_servers == KAFKA
        for key in env:
            monkeypatch.delenv(key, raising=False)


def test_every_setting_can_be_set_through_values() -> None:
    owned = {k for keys in OWNED.values() for k in keys}
    shared = {f"THUMBTUNE_{n.upper()}": "1" for n in Settings.model_fields} | {
        "THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": KAFKA
    }
    learner = {f"THUMBTUNE_LEARNER_{n.upper()}": "1" for n in LearnerSettings.model_fields}
    docs, _ = render(
        {
            "settings": {k: v for k, v in shared.items() if k not in owned},
            "learnerSettings": {k: v for k, v in learner.items() if k not in owned},
            "kafkaTLS": {"secret": "kafka-client-tls", "clientCertificate": True},  # its files' settings
        }
    )
    server, learner_env = environment(docs, "tt-thumbtune-server"), environment(docs, "tt-thumbtune-learner")
    assert set(server) == set(shared)  # every shared setting reaches the server...
    server_only = {
        "THUMBTUNE_HOST",
        "THUMBTUNE_PORT",
        "THUMBTUNE_SPOOL_DIR",
        "THUMBTUNE_API_KEYS",
        "THUMBTUNE_ADMIN_TOKEN",
        "THUMBTUNE_REDIS_URL",
        "THUMBTUNE_VLLM_API_KEY",
    }
    assert set(learner_env) == setting_names() - server_only  # ...and every other one the learner


@pytest.mark.parametrize("section,key", [(s, k) for s, keys in OWNED.items() for k in keys])
def test_settings_the_chart_owns_are_refused_with_the_value_to_use(section: str, key: str) -> None:
    values = {"settings": {"THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": KAFKA}}
    values.setdefault(section, {})[key] = "x"
    with pytest.raises(helm.HelmRenderError, match=f"{section}.{key} is set by the chart: "):
        render(values)


def test_unknown_setting_names_are_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="learner settings start with THUMBTUNE_LEARNER_"):
        render(MINIMAL | {"learnerSettings": {"THUMBTUNE_MODEL": "x"}})
    with pytest.raises(helm.HelmRenderError, match="settings are THUMBTUNE_"):
        render({"settings": {"THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA": "x"}})


def test_server_probes_and_ports_point_at_real_routes(release: Release) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    _, docs, _ = release
    app = TestClient(create_app(Settings()))  # no lifespan: routes answer, the model is not loaded
    server = container(docs, "tt-thumbtune-server")
    env = environment(docs, "tt-thumbtune-server")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": int(env["THUMBTUNE_PORT"])}
    assert env["THUMBTUNE_HOST"] == "0.0.0.0"
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["path"] for p in probes.values()} == {"/healthz", "/readyz"}
    for probe in probes.values():
        assert probe["port"] in ports
        assert app.get(probe["path"]).status_code in (200, 503), probe  # 503: /readyz before the model loads
    assert app.get("/healthz").status_code == 200 and app.get("/not-a-route").status_code == 404
    assert probes["readinessProbe"]["path"] == "/readyz"
    (service_port,) = by_kind(docs, "Service")["tt-thumbtune"]["spec"]["ports"]
    assert service_port["targetPort"] in ports
    for ingress in by_kind(docs, "Ingress").values():
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert (backend["name"], backend["port"]["name"]) == ("tt-thumbtune", service_port["name"])


def test_learner_probe_and_metrics_port_are_what_the_learner_serves(release: Release) -> None:
    from learner.metrics import start_metrics_server

    _, docs, _ = release
    learner = container(docs, "tt-thumbtune-learner")
    env = environment(docs, "tt-thumbtune-learner")
    ports = {p["name"]: p["containerPort"] for p in learner["ports"]}
    assert ports == {"metrics": int(env["THUMBTUNE_LEARNER_METRICS_PORT"])}
    assert env["THUMBTUNE_LEARNER_METRICS_HOST"] == "0.0.0.0"  # reachable from the kubelet and Prometheus
    (service_port,) = by_kind(docs, "Service")["tt-thumbtune-learner-metrics"]["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    probe = learner["livenessProbe"]["httpGet"]
    assert probe["port"] == "metrics"
    port = free_port()  # the learner's own metrics server answers the probe's path
    server = start_metrics_server("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=5) as resp:
            assert resp.status == 200 and b"thumbtune_learner_events_consumed_total" in resp.read()
    finally:
        server.shutdown()


def test_pods_run_non_root_read_only_and_write_only_to_volumes(release: Release) -> None:
    _, docs, _ = release
    for name, deployment in by_kind(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        env = environment(docs, name)
        writable = [env["THUMBTUNE_CACHE_DIR"], "/tmp"]
        writable += [env["THUMBTUNE_SPOOL_DIR"]] if "server" in name else [env["THUMBTUNE_ADAPTER_STORE"]]
        for path in writable:
            assert path in mounts and not mounts[path].get("readOnly"), (name, path)
        volumes = {v["name"]: v for v in pod["volumes"]}
        adapters = volumes[mounts[env["THUMBTUNE_ADAPTER_STORE"]]["name"]]
        assert adapters["persistentVolumeClaim"]["claimName"] == "tt-thumbtune-adapters"
    claim = by_kind(docs, "PersistentVolumeClaim")["tt-thumbtune-adapters"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the learner writes, every server reads


def test_production_values_put_the_learner_on_a_gpu_node_and_scale_servers() -> None:
    docs, notes = render(PRODUCTION)
    learner = by_kind(docs, "Deployment")["tt-thumbtune-learner"]
    pod = learner["spec"]["template"]["spec"]
    assert learner["spec"]["replicas"] == 1 and learner["spec"]["strategy"]["type"] == "Recreate"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == PRODUCTION["learner"]["nodeSelector"]
    assert pod["tolerations"] == PRODUCTION["learner"]["tolerations"]
    server = by_kind(docs, "Deployment")["tt-thumbtune-server"]
    assert "replicas" not in server["spec"]  # the HPA owns it
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["tt-thumbtune-server"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tt-thumbtune-server"
    env = container(docs, "tt-thumbtune-server")["env"]
    secret_refs = {v["valueFrom"]["secretKeyRef"]["name"] for v in env if "valueFrom" in v}
    assert secret_refs == {"thumbtune-credentials"}
    assert "https://chat.example.com/v1" in notes and "tt-thumbtune-learner-metrics" in notes


def test_default_values_keep_the_learner_on_cpu_and_say_how_to_reach_everything() -> None:
    docs, notes = render(MINIMAL)
    resources = container(docs, "tt-thumbtune-learner")["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert by_kind(docs, "Deployment")["tt-thumbtune-server"]["spec"]["replicas"] == 2
    for text in (
        "port-forward service/tt-thumbtune",
        "http://tt-thumbtune.thumbtune.svc:8000/metrics",
        "http://tt-thumbtune-learner-metrics.thumbtune.svc:9100/metrics",
        "learner.gpu=1",
    ):
        assert text in notes


def test_a_data_parallel_learner_runs_one_rank_per_gpu_under_torchrun_with_shared_memory() -> None:
    docs, _ = render(DATA_PARALLEL)
    pod = by_kind(docs, "Deployment")["tt-thumbtune-learner"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in c["command"] and c["command"][-2:] == ["-m", "thumbtune.cli"]
    assert c["args"] == ["learn"] and c["resources"]["limits"]["nvidia.com/gpu"] == 4
    shm = {v["name"]: v for v in pod["volumes"]}["shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    single = container(render(PRODUCTION)[0], "tt-thumbtune-learner")
    assert "command" not in single and "shm" not in {m["name"] for m in single["volumeMounts"]}


@pytest.mark.parametrize(
    ("learner", "message"),
    [
        ({"gpu": 2, "processes": 4}, "learner.processes (4) cannot exceed learner.gpu (2)"),
        ({"processes": 0}, "learner.processes must be at least 1"),
    ],
)
def test_impossible_learner_process_counts_are_refused(learner: dict, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(MINIMAL | {"learner": learner})
