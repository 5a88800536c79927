"""Child processes that never outlive their parent: the one way thumbtune starts a process and stops it.

`thumbtune up` (broker, server, learner), the embedded broker (Tansu), the benchmarks' servers and the
tests' learners all run as a `ChildProcess`:

* in a session of its own, so a Ctrl-C meant for the parent does not reach it half-way through;
* with a parent-death signal (Linux): SIGTERM when the thread that started it dies, so a parent killed
  with SIGKILL leaves nothing behind holding a port;
* its output either pumped line by line to a callback (``on_line``, for `up`'s prefixed logs) or written
  to a file (``log``, or an unlinked temporary file), and its tail at hand for error messages;
* stopped with SIGTERM to its whole process group, then SIGKILL after a grace period, and always reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

import httpx

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it; racy, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child get SIGTERM when the spawning thread dies (Linux).

    prctl is looked up here, in the parent, so the forked child only makes one foreign call before exec.
    Only from the main thread: PDEATHSIG fires when the spawning *thread* exits.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return hook


class ChildExited(RuntimeError):
    """The child exited while the parent waited for it."""


class ChildProcess:
    """One child process; see the module docstring. ``start`` runs it, ``stop`` ends it (idempotent)."""

    RECENT_LINES = 50

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log_path = log
        self.on_line = on_line
        self.recent: deque[str] = deque(maxlen=self.RECENT_LINES)
        """The last lines a pumped child printed (``on_line`` mode)."""
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def start(self) -> Self:
        pumped = self.on_line is not None
        if not pumped:
            if self.log_path is None:  # unlinked: nothing to clean up, even after a SIGKILL
                self._log = tempfile.TemporaryFile(prefix=f"thumbtune-{self.name}-")  # noqa: SIM115 - closed in stop()
            else:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "a+b")  # noqa: SIM115 - closed in stop(); readable for output()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pumped else self._log,
            stderr=subprocess.STDOUT,
            text=pumped,
            bufsize=1 if pumped else -1,
            start_new_session=True,
            preexec_fn=parent_death_hook(),  # noqa: PLW1509 - one prctl call, resolved before fork
        )
        if pumped:
            self._pump = threading.Thread(target=self._pump_lines, name=f"{self.name}-output", daemon=True)
            self._pump.start()
        return self

    def _pump_lines(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.on_line is not None
        for line in self.proc.stdout:
            self.recent.append(line)
            self.on_line(line)

    def output(self, max_bytes: int | None = 4000) -> str:
        """The last ``max_bytes`` (None: all) of what the child printed, ANSI colours removed."""
        if self._log is not None:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            start = 0 if max_bytes is None else max(0, size - max_bytes)
            # pread: the child shares this file's offset, which a seek would move under it
            text = os.pread(fd, size - start, start).decode(errors="replace")
        elif self.log_path is not None and self.log_path.is_file():  # stopped: its log is closed
            text = self.log_path.read_bytes()[-(max_bytes or 0) :].decode(errors="replace")
        else:
            text = "".join(self.recent)[-(max_bytes or 0) :]
        return _ANSI.sub("", text).strip() or "(no output)"

    # --- waiting ------------------------------------------------------------------------------------

    def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float, poll: float = 0.1
    ) -> object:
        """Poll ``condition`` until it returns something truthy (returned); raise ChildExited if the child
        exits first, TimeoutError after ``timeout`` seconds. Errors carry the output's tail unless it was
        pumped (then whoever watched it has seen it)."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            tail = "" if self.on_line is not None else f". Its output:\n{self.output()}"
            if not self.alive:
                raise ChildExited(f"{self.name} exited (status {self.returncode}) before {what}{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} within {timeout:.0f} s{tail}")
            time.sleep(poll)

    def wait_line(self, text: str, timeout: float) -> None:
        """Wait for a line containing ``text`` among the recent ones (``on_line`` mode)."""
        self.wait_for(lambda: any(text in line for line in self.recent), f"{text!r}", timeout)

    def wait_http(self, url: str, timeout: float) -> None:
        """Wait until GET ``url`` answers 200."""

        def ok() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(ok, f"200 from {url}", timeout, poll=0.3)

    # --- stopping -------------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 10.0, first: int = signal.SIGTERM) -> int | None:
        """``first`` (SIGTERM) to the group, SIGKILL after ``grace`` seconds; reap. Returns the exit code."""
        proc = self.proc
        if proc is not None:
            for sig, wait_s in ((first, grace), (signal.SIGKILL, None)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._pump is not None:
            self._pump.join(2)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode if proc is not None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
