"""Which adapter version is live, and why: checks, swaps, pins, rollbacks, refusals.

One `AdapterManager` per server. Everything that changes the live version goes through it, one
change at a time (a lock): the follower's announcements, start-up, the control plane's decisions
(service/adapters/control.py) and, without a control plane, the admin routes.

Going live (`_try`): `Admission.admit` (files, load, KL probe; service/adapters/admission.py), then
flip the live pointer. Sequences bind to a version at admission and keep it; the old version is
unloaded by the engine once nothing uses it. A version that fails is refused for good (reason,
message, metric, log, and `on_refused` tells the cluster) and serving stays on the live one; only
"not in the store yet" is retried when the version is offered again.

Which checks apply: automatic steps (announcements, catch-up) enforce both KL bounds; operator
actions (pin, unpin, rollback) and start-up enforce KL(new || base) only, because moving away
from the live version is their point (at start-up the live version is v0, i.e. the base).
Rollback goes to the newest version below the live one that passes its checks (v0 at the
bottom) and pins it; unpin follows the newest version above the live one that passes. Refuse
takes a version out of service for good, stepping down to the newest good version below it.

The cluster's state (what is pinned, what is refused) is the control log's: `restore` folds a past
decision in without loading anything, `reconcile` then makes what is live agree with it, and
`apply` carries out a new decision; `plan` validates one before it goes on the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service import metrics
from service.adapters.admission import Admission
from service.adapters.checks import REASONS, Refused
from service.engine.engine import Engine
from service.engine.registry import AdapterRegistry
from thumbtune.core.base_model import LoadedBase
from thumbtune.core.contract import (
    BASE_VERSION,
    AdapterAnnouncement,
    ControlAction,
    ControlRecord,
    version_number,
)
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore, make_adapter_store

# Every refusal reason starts at 0, so an alert on increase() sees the first refusal too.
for _reason in REASONS:
    metrics.ADAPTER_REFUSED.labels(_reason)

log = logging.getLogger(__name__)


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
        self.admission = Admission(settings, engine, registry, base, self.store)
        self.on_refused: Callable[[str, str, str], None] | None = None
        """Called with (version, reason, message) when a check refuses a version for good (the control
        plane tells the cluster)."""

    @property
    def live(self) -> str:
        return self.registry.live

    # --- triggers ---------------------------------------------------------------------------------------

    def start_up(self) -> str:
        """Make the newest version in the store that passes its checks live (older ones are tried in turn),
        or the pinned one when the control log (`restore`) pinned one."""
        return self.reconcile("startup", enforce_kl_live=False)

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
            return self._pin(version, "pin")

    def unpin(self) -> str:
        """Follow the newest good version again; returns the live version."""
        with self._lock:
            self.pinned = None
            return self._follow_newest("unpin", enforce_kl_live=False)

    def rollback(self) -> str:
        """Back to the newest good version below the live one, pinned; returns it."""
        with self._lock:
            return self._pin(self.rollback_target(), "rollback")

    def rollback_target(self) -> str:
        """The newest version below the live one that passes its checks (loaded, not live yet)."""
        with self._lock:
            target = self._newest_good_below(self.live)
            if target is None:
                raise VersionConflict(f"no good version before {self.live} to roll back to")
            return target

    def refuse(self, version: str, message: str, reason: str = "operator") -> str:
        """``version`` never serves again; if it is live, step down to the newest good version below it.

        Returns the live version. Requests that name it get 404 from now on; those running finish.
        """
        with self._lock:
            if version == BASE_VERSION:
                raise VersionConflict(f"{BASE_VERSION} is the base model itself; it cannot be refused")
            if not self._refused(version):
                self.status[version] = VersionStatus("refused", reason, message, checked_at=time.time())
                metrics.ADAPTER_REFUSED.labels(reason).inc()
                log.warning("adapter %s refused (%s): %s", version, reason, message)
            if self.pinned == version:
                self.pinned = None
            if self.live == version:
                below = self._newest_good_below(version) or BASE_VERSION
                self._try(below, "refuse", enforce_kl_live=False)
            if self.live != version:
                self.registry.withdraw(version)
            return self.live

    # --- the cluster's decisions (service/adapters/control.py applies them in the log's order) -------------

    def plan(self, action: ControlAction, version: str | None) -> str | None:
        """Validate a decision before it goes on the log; returns the version the record names (rollback:
        its target, resolved here so every replica goes to the same one). UnknownVersion / VersionConflict."""
        with self._lock:
            if action is ControlAction.rollback:
                return self.rollback_target()
            if action is ControlAction.unpin:
                return None
            assert version is not None
            self._require_known(version)
            if version == BASE_VERSION and action is ControlAction.refuse:
                raise VersionConflict(f"{BASE_VERSION} is the base model itself; it cannot be refused")
            if self._refused(version) and action is ControlAction.pin:
                known = self.status[version]
                raise VersionConflict(
                    f"{version} was refused ({known.reason}: {known.message}); it cannot be pinned"
                )
            return version

    def apply(self, record: ControlRecord) -> str:
        """Carry out a decision now (loading what it needs); returns the live version. Raises like the
        admin actions do when this replica cannot (VersionConflict, UnknownVersion, EngineUnavailable)."""
        with self._lock:
            if record.action is ControlAction.unpin:
                return self.unpin()
            assert record.version is not None
            if record.action is ControlAction.refuse:
                return self.refuse(record.version, record.reason or "", record.check or "operator")
            if record.action is ControlAction.pin:
                return self.pin(record.version)
            if self._refused(record.version):
                raise VersionConflict(f"{record.version} is refused here; cannot roll back to it")
            return self._pin(record.version, "rollback")

    def restore(self, record: ControlRecord) -> None:
        """Fold a past decision into the state without loading anything (`reconcile` then does)."""
        with self._lock:
            if record.action is ControlAction.unpin:
                self.pinned = None
            elif record.action is ControlAction.refuse:
                assert record.version is not None
                reason = record.check or "operator"
                self.status[record.version] = VersionStatus(
                    "refused", reason, record.reason or "", checked_at=record.issued_at
                )
                if self.pinned == record.version:
                    self.pinned = None
            else:
                self.pinned = record.version

    def reconcile(self, trigger: str = "reconcile", enforce_kl_live: bool = True) -> str:
        """Make what is live agree with the state: the pinned version if any, never a refused one, else
        the newest good version. Returns the live version."""
        with self._lock:
            if self.pinned is not None:
                if self.live == self.pinned:
                    return self.live
                if not self._refused(self.pinned) and self._try(self.pinned, trigger, enforce_kl_live=False):
                    return self.live
                log.error(
                    "the pinned version %s cannot go live on this replica; following the newest", self.pinned
                )
                self.pinned = None
            if self._refused(self.live):
                self._try(self._newest_good_below(self.live) or BASE_VERSION, trigger, enforce_kl_live=False)
            return self._follow_newest(trigger, enforce_kl_live=enforce_kl_live)

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

    def _pin(self, version: str, trigger: str) -> str:
        if not self._try(version, trigger, enforce_kl_live=False):
            refused = self.status[version]
            raise VersionConflict(f"{version} failed its checks ({refused.reason}: {refused.message})")
        self.pinned = version
        return version

    def _newest_good_below(self, version: str) -> str | None:
        """The newest version below ``version`` that passes its checks (v0 at the bottom), loaded."""
        number = version_number(version)
        older = [v for v in reversed(self.store.versions()) if version_number(v) < number]
        for candidate in [*older, BASE_VERSION] if number > 0 else []:
            if not self._refused(candidate) and self._check(candidate, enforce_kl_live=False):
                return candidate
        return None

    def _check(
        self, version: str, *, enforce_kl_live: bool, announcement: AdapterAnnouncement | None = None
    ) -> bool:
        """Check and load ``version`` (published, not live); on failure refuse it. True if it passed."""
        try:
            probed = self.admission.admit(version, self.live, announcement, enforce_kl_live)
        except Refused as refusal:
            self.admission.forget(self.live)
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
            if not refusal.retry and self.on_refused is not None:
                self.on_refused(version, refusal.reason, refusal.message)
            return False
        if probed is not None:  # newly checked (not v0, not still loaded from an earlier check)
            kl_live, kl_base = probed
            self.status[version] = VersionStatus(
                "good", kl_live=kl_live, kl_base=kl_base, checked_at=time.time()
            )
        return True

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
        if not self._check(version, enforce_kl_live=enforce_kl_live, announcement=announcement):
            return False
        previous = self.registry.set_live(version)
        self.admission.forget(self.live)
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
