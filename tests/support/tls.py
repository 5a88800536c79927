"""Kafka over TLS for tests: a CA made on the spot (openssl), and the embedded broker behind a TLS
terminator (socat) that requires a client certificate from that CA, all on 127.0.0.1.

    client --TLS (mutual)--> socat :tls_port --plaintext--> Tansu :port (advertises :tls_port)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.core.kafka import ensure_topics, topic_partitions
from thumbtune.core.settings import Settings

TOOLS = ("openssl", "socat")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA ``name``.crt / .key (P-256) in ``directory``."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=thumbtune test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt"


def issue(directory: Path, ca: str, name: str, usage: str) -> tuple[Path, Path]:
    """A certificate ``name`` signed by CA ``ca`` for 127.0.0.1 / localhost (usage: serverAuth or
    clientAuth)."""
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=IP:127.0.0.1,DNS:localhost\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@dataclass
class TLSKafka:
    bootstrap: str
    ca: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path
    plaintext_bootstrap: str

    def settings(self, **overrides: object) -> dict:
        """Settings fields for a client of this broker (mutual TLS)."""
        return {
            "kafka_bootstrap_servers": self.bootstrap,
            "kafka_security_protocol": "SSL",
            "kafka_ssl_cafile": self.ca,
            "kafka_ssl_certfile": self.client_cert,
            "kafka_ssl_keyfile": self.client_key,
        } | overrides


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextmanager
def tls_kafka(directory: Path) -> Iterator[TLSKafka]:
    """The embedded broker behind socat (mutual TLS, certificates from a fresh CA), thumbtune's topics
    created through TLS. Also made: a second CA that signed nothing the broker uses."""
    make_ca(directory, "ca")
    server_cert, server_key = issue(directory, "ca", "broker", "serverAuth")
    client_cert, client_key = issue(directory, "ca", "client", "clientAuth")
    wrong_ca = make_ca(directory, "wrong-ca")
    port, tls_port = free_port(), free_port()
    socat = ChildProcess(
        "the TLS terminator (socat)",
        [
            "socat",
            f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={server_cert},key={server_key},"
            f"cafile={directory / 'ca.crt'},verify=1",
            f"TCP:127.0.0.1:{port}",
        ],
        log=directory / "socat.log",
    ).start()
    try:
        socat.wait_for(lambda: _listening(tls_port), f"socat listening on {tls_port}", 10)
        found = TLSKafka(
            f"127.0.0.1:{tls_port}",
            directory / "ca.crt",
            client_cert,
            client_key,
            wrong_ca,
            f"127.0.0.1:{port}",
        )
        client = Settings(**found.settings())
        broker = EmbeddedBroker(
            port=port, log_file=directory / "tansu.log", advertised_port=tls_port, client_settings=client
        )
        with broker:
            ensure_topics(found.bootstrap, topic_partitions(client), settings=client)
            yield found
    finally:
        socat.stop(2)
