"""Kafka security settings: what each client is given, and the mistakes refused when settings load."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from thumbtune.core.kafka import connection_config
from thumbtune.core.settings import Settings


def test_plaintext_is_the_default_and_carries_no_secrets() -> None:
    assert connection_config(Settings(kafka_bootstrap_servers="a:9092, b:9093")) == {
        "bootstrap_servers": ["a:9092", "b:9093"],
        "security_protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_gives_every_client_tls_and_the_credentials(mechanism: str) -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="thumbtune",
        kafka_sasl_password="s3cret",
    )
    config = connection_config(settings)
    assert config["security_protocol"] == "SASL_SSL"
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == (
        mechanism,
        "thumbtune",
        "s3cret",
    )
    ctx = config["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert "s3cret" not in repr(settings)  # a SecretStr: never in logs or error messages


def test_sasl_plaintext_has_no_tls() -> None:
    config = connection_config(
        Settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="u",
            kafka_sasl_password="p",
        )
    )
    assert "ssl_context" not in config and config["sasl_mechanism"] == "PLAIN"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs THUMBTUNE_KAFKA_SASL_MECHANISM"),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "PLAIN",
                "kafka_sasl_username": "u",
            },
            "THUMBTUNE_KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_mechanism": "PLAIN"}, "use SASL_SSL"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"}, "no such file"),
        ({"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ],
)
def test_incomplete_security_settings_are_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


def test_tls_files_need_a_tls_protocol_and_a_key_needs_its_certificate(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("not read until a client connects")
    with pytest.raises(ValidationError, match="THUMBTUNE_KAFKA_SSL_CAFILE set but .* is PLAINTEXT"):
        Settings(kafka_ssl_cafile=pem)
    with pytest.raises(ValidationError, match="KEYFILE is set without THUMBTUNE_KAFKA_SSL_CERTFILE"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_keyfile=pem)
