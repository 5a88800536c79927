"""The systems under test the benchmarks start, as child processes on free ports:

`EmbeddedSystem`  `thumbtune up`: broker, server and learner, the whole loop (`bench loop`, `bench poison`).
`System`          `thumbtune broker` and `thumbtune serve`, no learner: the benchmark publishes versions into
                  the store and announces them, as the learner does (`bench canary`, `bench soak`)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from learner.announce import Announcer, announcement_for
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.cli.up import BROKER_READY_LINE
from thumbtune.core.contract import MANIFEST
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

ADMIN_TOKEN = "bench-system"
READY_LINE = "thumbtune is ready"


class EmbeddedSystem:
    """`thumbtune up` as a child process on free ports, its adapter store and spool under `root`; its output
    goes to ``log_path``, and the lines worth watching (`up`'s, new versions, refusals) to stdout too.
    ``env`` adds to (and wins over) this process's environment, e.g. a learner setting."""

    def __init__(self, root: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.store = root / "adapters"
        if self.store.exists() and any(self.store.iterdir()):
            raise ValueError(f"{self.store} already holds adapter versions: give bench loop a new --out")
        self.port, broker_port, metrics_port = free_port(), free_port(), free_port()
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            THUMBTUNE_HOST="127.0.0.1",
            THUMBTUNE_PORT=str(self.port),
            THUMBTUNE_BROKER_HOST="127.0.0.1",
            THUMBTUNE_BROKER_PORT=str(broker_port),
            THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{broker_port}",
            THUMBTUNE_ADAPTER_STORE=str(self.store),
            THUMBTUNE_SPOOL_DIR=str(root / "spool"),
            THUMBTUNE_LEARNER_METRICS_HOST="127.0.0.1",
            THUMBTUNE_LEARNER_METRICS_PORT=str(metrics_port),
            **(env or {}),
        )
        self.log_path = log_path
        self.child: ChildProcess | None = None
        self._sigterm_before: object = None
        self._sigterm_installed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _line(self, line: str) -> None:
        self.log.write(line)
        self.log.flush()
        if "[up]" in line or " version v" in line or "refused" in line or "training on " in line:
            print(line.rstrip(), flush=True)

    def __enter__(self) -> EmbeddedSystem:
        self.log = self.log_path.open("w", encoding="utf-8")
        # `up` stops everything if bench loop dies without cleaning up (ChildProcess: parent-death signal)
        self.child = ChildProcess(
            "thumbtune up", [sys.executable, "-m", "thumbtune.cli", "up"], env=self.env, on_line=self._line
        ).start()
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (e.g. `timeout`, a CI runner) unwinds through __exit__ like Ctrl-C, stopping the system
            self._sigterm_before = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self._sigterm_installed = True
        try:
            self.child.wait_line(READY_LINE, 900)
        except BaseException as exc:  # not ready, Ctrl-C or SIGTERM: `with` will not call __exit__ for us
            self.__exit__(None, None, None)
            if isinstance(exc, Exception):
                raise RuntimeError(f"thumbtune up did not become ready ({exc}); see {self.log_path}") from exc
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, self._sigterm_before or signal.SIG_DFL)
            self._sigterm_installed = False
        if self.child is not None:
            self.child.stop(grace=60)
        self.log.close()


class System:
    """The embedded broker and one server (no learner) on free ports, store and spool under ``root``;
    ``settings`` (THUMBTUNE_* names) on top of the product's defaults. Children's output goes to
    ROOT/system.log."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root, self.store = root, root / "adapters"
        self.port, broker_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{broker_port}"
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            THUMBTUNE_HOST="127.0.0.1",
            THUMBTUNE_PORT=str(self.port),
            THUMBTUNE_BROKER_HOST="127.0.0.1",
            THUMBTUNE_BROKER_PORT=str(broker_port),
            THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            THUMBTUNE_ADAPTER_STORE=str(self.store),
            THUMBTUNE_SPOOL_DIR=str(root / "spool"),
            THUMBTUNE_ADMIN_TOKEN=ADMIN_TOKEN,
            **(settings or {}),
        )
        self.children: list[ChildProcess] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> System:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = (self.root / "system.log").open("w", encoding="utf-8")
        try:
            for name, ready in (("broker", BROKER_READY_LINE), ("serve", "/readyz")):
                argv = [sys.executable, "-m", "thumbtune.cli", name]
                child = ChildProcess(name, argv, env=self.env, on_line=self._line(name)).start()
                self.children.append(child)
                if ready.startswith("/"):
                    child.wait_http(self.url + ready, 600)
                else:
                    child.wait_line(ready, 60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _line(self, name: str) -> Callable[[str], None]:
        def write(line: str) -> None:
            self.log.write(f"[{name}] {line}")
            self.log.flush()

        return write

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.stop(grace=30)
        self.log.close()

    def publish(self, source: Path, version: str, source_version: str | None = None) -> None:
        """Copy ``source_version`` (default: the newest) of the store at ``source`` into the store as
        ``version`` and announce it, as the learner does (its manifest names the live version as its
        parent: what a learner would have trained on)."""
        origin = LocalAdapterStore(source)
        trained = origin.path(source_version or origin.latest() or "")
        store = LocalAdapterStore(self.store)
        live = self.adapters()["live"]
        manifest = origin.read_manifest(trained.name).model_copy(
            update={"version": version, "parent": live, "created_at": time.time()}
        )

        def copy(tmp: Path) -> None:
            for path in trained.iterdir():
                if path.is_file() and path.name != MANIFEST:
                    shutil.copy2(path, tmp / path.name)

        store.write_version(version, copy, manifest)
        announcer = Announcer(Settings(kafka_bootstrap_servers=self.bootstrap))
        try:
            announcer.announce(announcement_for(store, version))
        finally:
            announcer.close()

    def adapters(self) -> dict:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        resp = httpx.get(f"{self.url}/admin/adapters", headers=headers, timeout=30)
        resp.raise_for_status()
        return resp.json()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
