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

Canaries (with a control plane and THUMBTUNE_CANARY_SHARE > 0): an automatic step does not make a
new version live; it checks it and proposes it as the canary (`on_candidate`). Once the cluster has
made it the canary (`start_canary`) it serves a share of users until the judge (or an operator)
promotes it (`promote`) or refuses it; a newer version waits for the slot (`waiting`), and the newest
waiting takes it when the judge finds the canary undecided for too long (service/canary/judge.py). A pin
freezes the stage.

The cluster's state (pinned, canary, promoted, refused) is the control log's; how each decision is
validated, applied and replayed is service/adapters/decisions.py.
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
from thumbtune.core.contract import BASE_VERSION, AdapterAnnouncement, version_number
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
    capability: int | None = None
    """Capability prompts it answered right (the gate)."""
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
        self.store = store or make_adapter_store(settings.adapter_store_path, settings.adapter_cache_path)
        self.pinned: str | None = None
        self.status = {BASE_VERSION: VersionStatus("good", kl_live=0.0, kl_base=0.0)}
        self._lock = threading.RLock()
        self.admission = Admission(settings, engine, registry, base, self.store)
        self.on_refused: Callable[[str, str, str], None] | None = None
        """Called with (version, reason, message) when a check refuses a version for good (the control
        plane tells the cluster)."""
        self.on_candidate: Callable[[str], None] | None = None
        """With canaries on, called with a checked version newer than live (the control plane proposes it
        as the canary: service/adapters/decisions.py)."""
        self.on_live: Callable[[str], None] | None = None
        """Called with the version that just went live, whatever made it (the control plane says so in a
        receipt: the learner keeps training on that version's ratings however far ahead it is)."""
        self.canary_since: float | None = None
        """When the cluster made the canary the canary (its record's time: the same on every replica)."""
        self.waiting: str | None = None
        """The newest checked version waiting for the canary slot."""
        self.proposed: str | None = None  # the newest version this replica proposed as canary (once each)
        self.promoted: str | None = None
        """The version the control log last promoted (what is live, with canaries, unless pinned)."""
        self.stepped_down_from: str | None = None  # the promoted version refused since (live stepped down)
        self.canary_history = False  # the log has made a canary: since then only promotions go live
        self.restored_canary: tuple[str, float] | None = None
        """The canary the replayed log left, loaded by `decisions.reconcile`."""
        self.retired: set[str] = set()  # versions that served (live or canary) and were superseded

    @property
    def live(self) -> str:
        return self.registry.live

    @property
    def canary(self) -> str | None:
        return self.registry.canary

    @property
    def canaries(self) -> bool:
        """New versions go through the canary stage (a control plane, and a share of traffic for it)."""
        return self.on_candidate is not None and self.settings.canary_share > 0

    # --- triggers ---------------------------------------------------------------------------------------

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
            if number <= version_number(self.live) or number <= version_number(self.canary or BASE_VERSION):
                log.info(
                    "%s announced but %s is live and %s the canary: ignored", version, self.live, self.canary
                )
                return
            if self._offer(version, "announcement", enforce_kl_live=True, announcement=announcement):
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
        """Follow the newest good version again (with canaries: through the canary); returns the live one."""
        with self._lock:
            self.pinned = None
            return self._follow_newest("unpin", enforce_kl_live=False)

    def start_canary(self, version: str, since: float) -> None:
        """``version`` (newer than live) serves the canary share of users from now on, replacing a canary."""
        with self._lock:
            if self._refused(version) or not self._check(version, enforce_kl_live=False):
                known = self.status[version]
                raise VersionConflict(f"{version} is refused here ({known.reason}: {known.message})")
            if self.canary not in (None, version):
                self.retired.add(self.canary)
            self.registry.set_canary(version, self.settings.canary_share)
            self.registry.unstage(version)
            self.canary_since, self.canary_history = since, True
            if self.waiting is not None and version_number(self.waiting) <= version_number(version):
                self.waiting = None
            metrics.ADAPTER_SWAPS.labels("canary").inc()
            log.info(
                "adapter %s is the canary for %.0f%% of users", version, 100 * self.settings.canary_share
            )

    def promote(self, version: str) -> str:
        """The canary ``version`` goes live; the next waiting version, if any, is proposed as the canary."""
        with self._lock:
            previous = self.live
            if not self._try(version, "promote", enforce_kl_live=False):
                known = self.status[version]
                raise VersionConflict(f"{version} failed its checks here ({known.reason}: {known.message})")
            self.promoted, self.stepped_down_from = version, None
            self.retired.add(previous)
            self._end_canary()
            return self.live

    def _end_canary(self) -> None:
        """No canary any more; the newest version that waited for the slot is proposed (with canaries)."""
        self.registry.set_canary(None)
        self.canary_since = None
        waiting, self.waiting = self.waiting, None
        if waiting is not None and self.canaries and self.pinned is None and not self._refused(waiting):
            if version_number(waiting) > version_number(self.live):
                self.proposed = waiting
                self.on_candidate(waiting)  # type: ignore[misc]

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
            was_canary = self.canary == version
            if not self._refused(version):
                self.status[version] = VersionStatus("refused", reason, message, checked_at=time.time())
                metrics.ADAPTER_REFUSED.labels(reason).inc()
                log.warning("adapter %s refused (%s): %s", version, reason, message)
            if self.pinned == version:
                self.pinned = None
            if self.promoted == version:
                self.promoted, self.stepped_down_from = None, version
            if self.live == version:
                below = self._newest_good_below(version) or BASE_VERSION
                self._try(below, "refuse", enforce_kl_live=False)
            if self.live != version:
                self.registry.withdraw(version)
            if was_canary:
                self._end_canary()
            return self.live

    # --- checking and swapping ------------------------------------------------------------------------------

    def _follow_newest(self, trigger: str, enforce_kl_live: bool, through_canary: bool = True) -> str:
        """The newest good version above what serves goes live, or with canaries is offered as the canary."""
        with self._lock:
            floor = max(version_number(self.live), version_number(self.canary or BASE_VERSION))
            for version in reversed(self.store.versions()):
                if version_number(version) <= floor:
                    break
                if self._refused(version):
                    continue
                if self._offer(
                    version, trigger, enforce_kl_live=enforce_kl_live, through_canary=through_canary
                ):
                    break
            return self.live

    def _pin(self, version: str, trigger: str) -> str:
        """Make ``version`` live and pinned; a pin freezes the canary stage (the canary, if any, retires)."""
        if not self._try(version, trigger, enforce_kl_live=False):
            refused = self.status[version]
            raise VersionConflict(f"{version} failed its checks ({refused.reason}: {refused.message})")
        self.pinned = version
        if self.canary is not None:
            self.retired.add(self.canary)
            self.registry.set_canary(None)
            self.canary_since = None
        return version

    def _offer(
        self,
        version: str,
        trigger: str,
        *,
        enforce_kl_live: bool,
        announcement: AdapterAnnouncement | None = None,
        through_canary: bool = True,
    ) -> bool:
        """An automatic step found ``version`` newer than what serves. Without canaries it goes live now;
        with them it is checked and proposed as the canary, or waits for the slot while a canary is under
        test (the judge may give it the slot). True if it passed its checks."""
        if not (self.canaries and through_canary):
            return self._try(version, trigger, enforce_kl_live=enforce_kl_live, announcement=announcement)
        if not self._check(version, enforce_kl_live=enforce_kl_live, announcement=announcement):
            return False
        self.registry.unstage(version)  # start_canary admits it again (at once, if it is still loaded)
        if self.proposed is not None and version_number(version) <= version_number(self.proposed):
            return True  # proposed already (a repeated announcement, a catch-up)
        if self.canary is None:
            self.proposed = version
            self.on_candidate(version)  # type: ignore[misc]
        elif self.waiting is None or version_number(version) > version_number(self.waiting):
            self.waiting = version
        return True

    def _newest_good_below(self, version: str) -> str | None:
        """The newest version below ``version`` that passes its checks (v0 at the bottom), loaded."""
        number = version_number(version)
        older = [v for v in reversed(self.store.versions()) if version_number(v) < number]
        for candidate in [*older, BASE_VERSION] if number > 0 else []:
            if not self._refused(candidate) and self._check(candidate, enforce_kl_live=False):
                self.registry.unstage(candidate)  # the caller makes it live (admitting it again if unloaded)
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
            kl_live, kl_base, capability = probed
            self.status[version] = VersionStatus(
                "good", kl_live=kl_live, kl_base=kl_base, capability=capability, checked_at=time.time()
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
        self.registry.unstage(version)  # admission kept it loaded until now
        self.admission.forget(self.live)
        if previous != version:
            if self.on_live is not None:
                self.on_live(version)
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
