"""The Helm chart against external services: Kafka over TLS and SASL (certificates and passwords from
Secrets) and the adapter store in a bucket. Rendering helpers: tests/deploy/test_helm_chart.py."""

from __future__ import annotations

import helm_python as helm

from tests.deploy.test_helm_chart import CHART, KUBE_VERSION, MINIMAL, by_kind, container, environment, render

KAFKA_SECURITY = MINIMAL | {
    "settings": MINIMAL["settings"]
    | {
        "THUMBTUNE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "THUMBTUNE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "THUMBTUNE_KAFKA_SASL_USERNAME": "thumbtune",
    },
    "secrets": {"THUMBTUNE_KAFKA_SASL_PASSWORD": "s3cret"},
    "kafkaTLS": {"secret": "kafka-client-tls", "clientCertificate": True},
}
"""Managed Kafka: TLS with a client certificate from a Secret, SCRAM with the password in the chart's
Secret."""


def test_kafka_tls_and_sasl_reach_every_pod_from_secrets() -> None:
    report = helm.lint(CHART, KAFKA_SECURITY, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    docs, _ = render(KAFKA_SECURITY)
    (secret,) = by_kind(docs, "Secret").values()
    assert secret["stringData"]["THUMBTUNE_KAFKA_SASL_PASSWORD"] == "s3cret"
    for deployment in ("tt-thumbtune-server", "tt-thumbtune-learner"):
        env = environment(docs, deployment)
        assert env["THUMBTUNE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["THUMBTUNE_KAFKA_SASL_PASSWORD"] is None  # from the Secret, never in a ConfigMap
        assert (env["THUMBTUNE_KAFKA_SSL_CAFILE"], env["THUMBTUNE_KAFKA_SSL_CERTFILE"]) == (
            "/etc/thumbtune/kafka-tls/ca.crt",
            "/etc/thumbtune/kafka-tls/tls.crt",
        )
        mounts = {m["name"]: m for m in container(docs, deployment)["volumeMounts"]}
        assert mounts["kafka-tls"] == {
            "name": "kafka-tls",
            "mountPath": "/etc/thumbtune/kafka-tls",
            "readOnly": True,
        }
        volumes = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "kafka-tls", "secret": {"secretName": "kafka-client-tls"}} in volumes
    assert "kafka-tls" not in {
        m["name"] for m in container(render(MINIMAL)[0], "tt-thumbtune-server")["volumeMounts"]
    }


def test_an_adapter_store_in_a_bucket_needs_no_volume() -> None:
    values = MINIMAL | {"adapterStore": {"url": "s3://bucket/thumbtune", "env": {"AWS_REGION": "eu-west-1"}}}
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    docs, _ = render(values)
    assert by_kind(docs, "PersistentVolumeClaim") == {}
    for deployment in ("tt-thumbtune-server", "tt-thumbtune-learner"):
        assert environment(docs, deployment)["THUMBTUNE_ADAPTER_STORE"] == "s3://bucket/thumbtune"
        env = {v["name"]: v for v in container(docs, deployment)["env"]}
        assert env["AWS_REGION"]["value"] == "eu-west-1"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert "adapters" not in {m["name"] for m in container(docs, deployment)["volumeMounts"]}
