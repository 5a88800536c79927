"""Which adapter version is live, and why: checks, swaps, pins, rollbacks, refusals.

One `AdapterManager` per server. Everything that changes the live version goes through it, one
change at a time (a lock): the follower's announcements, start-up, and the admin routes.

Going live (`_try`):
  1. `check_files` in the calling thread (fingerprint, sha256, shapes, finite; CPU only),
  2. one ``engine.call``: insert the LoRA modules and weights, staged (not servable yet),
  3. the KL probe: one ``engine.call`` per (probe prompt, adapter), so decode steps go on in between;
     the live version's and the base's log-probs are cached, so usually only the new rows run,
  4. publish (``thumbtune@vN`` resolves) and flip the live pointer. Sequences bind to a version at
     admission and keep it; the old version is unloaded by the engine once nothing uses it.
A version that fails is refused for good (reason, message, metric, log) and serving stays on the
live one; only "not in the store yet" is retried when the version is offered again.

Which checks apply: automatic steps (announcements, catch-up) enforce both KL bounds; operator
actions (pin, unpin, rollback) and start-up enforce KL(new || base) only, because moving away
from the live version is their point (at start-up the live version is v0, i.e. the base).
Rollback goes to the newest version below the live one that passes its checks (v0 at the
bottom) and pins it; unpin follows the newest version above the live one that passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, TypeVar

import torch

from service import metrics
from service.adapters.checks import (
    REASONS,
    Refused,
    build_probes,
    check_files,
    mean_kl,
    module_shapes,
    probe_logprobs,
)
from service.engine.engine import Engine
from service.engine.registry import BASE, AdapterRegistry, UnknownAdapter
from service.protocol import AdaptersView, AdapterVersionView, FollowerView, KLBounds, Refusal
from thumbtune.core.base_model import LoadedBase
from thumbtune.core.contract import BASE_VERSION, AdapterAnnouncement, version_number
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore, make_adapter_store

# Every refusal reason starts at 0, so an alert on increase() sees the first refusal too.
for _reason in REASONS:
    metrics.ADAPTER_REFUSED.labels(_reason)

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMAND_TIMEOUT_S = 120.0


class EngineUnavailable(RuntimeError):
    """The engine is stopping (or stopped): nothing can be loaded now."""


class UnknownVersion(LookupError):
    """No such version in the adapter store."""


class VersionConflict(Exception):
    """The version cannot be made live (refused, or nothing to roll back to)."""


@dataclass
class VersionStatus:
    state: Literal["good", "refused"]
    """'good' (passed its checks) or 'refused'."""
    reason: str | None = None
    message: str | None = None
    retry: bool = False
    kl_live: float | None = None
    kl_base: float | None = None
    checked_at: float | None = None


class AdapterManager:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: AdapterRegistry,
        base: LoadedBase,
        store: AdapterStore | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.model_id, self.fingerprint = base.model_id, base.fingerprint
        self.store = store or make_adapter_store(settings.adapter_store_path)
        self.pinned: str | None = None
        self.status = {BASE_VERSION: VersionStatus("good", kl_live=0.0, kl_base=0.0)}
        self._lock = threading.RLock()
        self._shapes = module_shapes(registry.model)
        self._probes = build_probes(base.tokenizer, settings.adapter_probe_prompts)
        self._probe_cache: dict[str, torch.Tensor] = {}
        """Probe log-probs [positions, vocab] of 'base' and of the live version (written under self._lock)."""

    @property
    def live(self) -> str:
        return self.registry.live

    # --- triggers ---------------------------------------------------------------------------------------

    def start_up(self) -> str:
        """Make the newest version in the store that passes its checks live (older ones are tried in turn)."""
        return self._follow_newest("startup", enforce_kl_live=False)

    def catch_up(self) -> str:
        """Go to the newest good version above the live one unless pinned (the follower calls this whenever
        it is assigned the topic: announcements sent before that are not delivered, the store has them)."""
        with self._lock:
            if self.pinned is not None:
                return self.live
            return self._follow_newest("catchup", enforce_kl_live=True)

    def on_announcement(self, announcement: AdapterAnnouncement, received_at: float) -> None:
        """An announcement from thumbtune.adapters; repeats and older versions are no-ops."""
        version = announcement.version
        try:
            number = version_number(version)
        except ValueError:
            log.warning("ignoring an announcement of %r: not a version name", version)
            return
        with self._lock:
            if version == self.live or self._refused(version):
                return
            if self.pinned is not None:
                log.info(
                    "%s announced; pinned to %s, so it waits (POST /admin/adapters/unpin to follow)",
                    version,
                    self.pinned,
                )
                return
            if number <= version_number(self.live):
                log.info("%s announced but %s is live and newer: ignored", version, self.live)
                return
            if self._try(version, "announcement", announcement=announcement, enforce_kl_live=True):
                metrics.ADAPTER_SWAP_LATENCY.observe(time.monotonic() - received_at)

    def pin(self, version: str) -> str:
        """Make ``version`` live and keep it live until unpin or rollback."""
        with self._lock:
            self._require_known(version)
            if self._refused(version):
                known = self.status[version]
                raise VersionConflict(
                    f"{version} was refused ({known.reason}: {known.message}); it cannot be pinned"
                )
            if not self._try(version, "pin", enforce_kl_live=False):
                refused = self.status[version]
                raise VersionConflict(f"{version} failed its checks ({refused.reason}: {refused.message})")
            self.pinned = version
            return version

    def unpin(self) -> str:
        """Follow the newest good version again; returns the live version."""
        with self._lock:
            self.pinned = None
            return self._follow_newest("unpin", enforce_kl_live=False)

    def rollback(self) -> str:
        """Back to the newest good version below the live one, pinned; returns it."""
        with self._lock:
            live_number = version_number(self.live)
            older = [v for v in reversed(self.store.versions()) if version_number(v) < live_number]
            for version in [*older, BASE_VERSION] if live_number > 0 else []:
                if self._refused(version):
                    continue
                if self._try(version, "rollback", enforce_kl_live=False):
                    self.pinned = version
                    return version
            raise VersionConflict(f"no good version before {self.live} to roll back to")

    # --- checking and swapping ------------------------------------------------------------------------------

    def _follow_newest(self, trigger: str, enforce_kl_live: bool) -> str:
        with self._lock:
            live_number = version_number(self.live)
            for version in reversed(self.store.versions()):
                if version_number(version) <= live_number:
                    break
                if self._refused(version):
                    continue
                if self._try(version, trigger, enforce_kl_live=enforce_kl_live):
                    break
            return self.live

    def _try(
        self,
        version: str,
        trigger: str,
        *,
        enforce_kl_live: bool,
        announcement: AdapterAnnouncement | None = None,
    ) -> bool:
        """Check, load and make ``version`` live; on failure refuse it and keep the live one. True if live."""
        started = time.perf_counter()
        try:
            self._admit_version(version, announcement, enforce_kl_live)
        except Refused as refusal:
            self._forget_probes()
            self.status[version] = VersionStatus(
                "refused", refusal.reason, refusal.message, refusal.retry, checked_at=time.time()
            )
            metrics.ADAPTER_REFUSED.labels(refusal.reason).inc()
            log.warning(
                "refused adapter %s (%s): %s; %s stays live",
                version,
                refusal.reason,
                refusal.message,
                self.live,
            )
            return False
        previous = self.registry.set_live(version)
        self._forget_probes()
        if previous != version:
            metrics.ADAPTER_SWAPS.labels(trigger).inc()
            log.info(
                "adapter %s is live (was %s; %s; checks and load took %.0f ms)",
                version,
                previous,
                trigger,
                1000 * (time.perf_counter() - started),
            )
        return True

    def _admit_version(
        self, version: str, announcement: AdapterAnnouncement | None, enforce_kl_live: bool
    ) -> None:
        """Checks + load + KL probe; leaves the version published (servable) or raises `Refused`."""
        if version == BASE_VERSION:
            return  # the empty adapter, always loaded
        try:
            self.registry.resolve(version)  # still loaded: it passed its checks; resolving keeps it a while
            return
        except UnknownAdapter:
            pass
        checked = check_files(self.store, version, self.fingerprint, self._shapes, announcement)
        self._call(
            lambda: self.registry.load(version, checked.directory, checked.weights), "peft could not load it"
        )
        kl_live = kl_base = None
        try:
            if self._probes:
                kl_live, kl_base = self._kl(version)
                metrics.ADAPTER_PROBE_KL.labels("live").set(kl_live)
                metrics.ADAPTER_PROBE_KL.labels("base").set(kl_base)
                s = self.settings
                if enforce_kl_live and kl_live > s.adapter_max_kl_live:
                    raise Refused(
                        "kl_live",
                        f"KL(new || live {self.live}) = {kl_live:.4f} nats/token on the "
                        f"probe prompts > THUMBTUNE_ADAPTER_MAX_KL_LIVE = "
                        f"{s.adapter_max_kl_live}",
                    )
                if kl_base > s.adapter_max_kl_base:
                    raise Refused(
                        "kl_base",
                        f"KL(new || base) = {kl_base:.4f} nats/token on the probe "
                        f"prompts > THUMBTUNE_ADAPTER_MAX_KL_BASE = "
                        f"{s.adapter_max_kl_base}",
                    )
            self.registry.publish(version)
        finally:
            self.registry.unstage(version)  # refused: the engine unloads it at its next step
        self.status[version] = VersionStatus("good", kl_live=kl_live, kl_base=kl_base, checked_at=time.time())

    def _kl(self, version: str) -> tuple[float, float]:
        """KL(new || live) and KL(new || base) on the probe prompts, mean per token.

        Each (prompt, adapter) forward is its own engine command, so decode steps go on in between;
        the live version's and the base's log-probs are cached, so a check usually runs only the new rows.
        """
        live = BASE if self.live == BASE_VERSION else self.live  # v0's LoRA B is zero: it *is* the base
        for name in dict.fromkeys((version, live, BASE)):
            if name not in self._probe_cache or name == version:
                rows = [
                    self._call(
                        lambda row=row, name=name: probe_logprobs(self.registry, row, name),
                        "the KL probe failed",
                    )
                    for row in self._probes
                ]
                self._probe_cache[name] = torch.cat(rows)
        new = self._probe_cache[version]
        return mean_kl(new, self._probe_cache[live]), mean_kl(new, self._probe_cache[BASE])

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on the engine thread; its failure refuses the version (load_error)."""
        try:
            future = self.engine.call(fn)
        except RuntimeError as exc:
            raise EngineUnavailable(str(exc)) from exc
        try:
            return future.result(timeout=COMMAND_TIMEOUT_S)
        except TimeoutError:
            future.cancel()  # if it has not started, it never will
            raise
        except Exception as exc:
            raise Refused("load_error", f"{what}: {exc!r}") from exc

    def _forget_probes(self) -> None:
        """Keep the cached probe log-probs of the base and the live version only."""
        self._probe_cache = {k: v for k, v in self._probe_cache.items() if k in (BASE, self.live)}

    def _refused(self, version: str) -> bool:
        """Refused for good (a version that was not in the store yet is tried again)."""
        known = self.status.get(version)
        return known is not None and known.state == "refused" and not known.retry

    def _require_known(self, version: str) -> None:
        try:
            version_number(version)
        except ValueError as exc:
            raise UnknownVersion(str(exc)) from None
        if version != BASE_VERSION and version not in self.store.versions():
            raise UnknownVersion(
                f"no adapter version {version} in the store {self.store}; it has "
                f"{self.store.versions() or 'no versions'}"
            )

    # --- what /admin/adapters shows -----------------------------------------------------------------------

    def describe(self, follower: FollowerView | None = None) -> AdaptersView:
        """A snapshot for GET /admin/adapters (no lock: an operator can look while a check runs)."""
        statuses, live, pinned = dict(self.status), self.live, self.pinned
        stored = self.store.versions()
        loaded = self.registry.versions()
        versions = []
        for version in sorted({BASE_VERSION, *stored, *statuses, *loaded}, key=version_number):
            status = statuses.get(version)
            ratings, approvals = metrics.APPROVALS.get(version)
            checked = asdict(status) if status is not None else {}
            checked.pop("retry", None)
            versions.append(
                AdapterVersionView(
                    **(checked | {"state": status.state if status else "unchecked"}),
                    version=version,
                    in_store=version in stored,
                    loaded=version in loaded,
                    live=version == live,
                    pinned=version == pinned,
                    ratings=ratings,
                    approvals=approvals,
                    approval_rate=approvals / ratings if ratings else None,
                )
            )
        s = self.settings
        return AdaptersView(
            live=live,
            pinned=pinned,
            following=s.adapter_follow and pinned is None,
            loaded=loaded,
            versions=versions,
            refused={
                v: Refusal(reason=st.reason, message=st.message)
                for v, st in statuses.items()
                if st.state == "refused"
            },
            kl_bounds=KLBounds(
                live=s.adapter_max_kl_live, base=s.adapter_max_kl_base, probe_prompts=len(self._probes)
            ),
            base_model=self.model_id,
            base_fingerprint=self.fingerprint,
            follower=follower,
        )
