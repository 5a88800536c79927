"""A benchmark's system under test: `thumbtune broker` and `thumbtune serve` as child processes on free
ports (no learner: the benchmark publishes versions into the store and announces them, as the learner
does). `bench canary` and `bench soak` run on it."""

from __future__ import annotations

import os
import shutil
import sys
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
