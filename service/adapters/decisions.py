"""The cluster's decisions, one at a time, on one replica's `AdapterManager`.

service/adapters/control.py reads thumbtune.control and calls, for each record:

plan       before a decision goes on the log, on the replica that took the admin call: validate it, and
           resolve what it names (a rollback's target), so every replica does the same thing
apply      a new decision: carry it out now (loading what it needs). Returns False for a decision that no
           longer applies (a promotion of a version that is not the canary any more, a canary older than the
           one serving): several replicas may propose the same step, and the first in the log wins
restore    a decision from before this replica started: fold it into the state, load nothing
reconcile  make what is live (and the canary) agree with the folded state: at start-up, and when the log
           was replayed late (Kafka was down at start-up)

The state a replayed log leaves: the pinned version, the refused versions with reasons, the version last
promoted and the canary. With canaries on and a version promoted, that version is live after a restart
and newer ones go through the canary; on a log that promoted nothing yet (a new cluster, or canaries off)
start-up serves the newest version that passes its checks, as before canaries existed.
"""

from __future__ import annotations

import logging

from service.adapters.manager import AdapterManager, VersionConflict, VersionStatus
from thumbtune.core.contract import BASE_VERSION, ControlAction, ControlRecord, version_number

log = logging.getLogger(__name__)


def plan(manager: AdapterManager, action: ControlAction, version: str | None) -> str | None:
    """The version the record will name; UnknownVersion / VersionConflict if it cannot be decided."""
    with manager._lock:
        if action is ControlAction.rollback:
            return manager.rollback_target()
        if action is ControlAction.unpin:
            return None
        if action is ControlAction.promote:
            if manager.canary is None:
                raise VersionConflict("there is no canary to promote")
            if version not in (None, manager.canary):
                raise VersionConflict(f"{version} is not the canary ({manager.canary} is)")
            return manager.canary
        assert version is not None
        manager._require_known(version)
        if version == BASE_VERSION and action in (ControlAction.refuse, ControlAction.canary):
            raise VersionConflict(f"{BASE_VERSION} is the base model itself; it cannot be {action.value}d")
        if manager._refused(version) and action in (ControlAction.pin, ControlAction.canary):
            known = manager.status[version]
            raise VersionConflict(
                f"{version} was refused ({known.reason}: {known.message}); it cannot be {action.value}ned"
                if action is ControlAction.pin
                else f"{version} was refused ({known.reason}: {known.message}); it cannot be the canary"
            )
        return version


def apply(manager: AdapterManager, record: ControlRecord) -> bool:
    """Carry out a decision now; False if it no longer applies. Raises like the admin actions do when this
    replica cannot (VersionConflict, UnknownVersion, EngineUnavailable)."""
    with manager._lock:
        action, version = record.action, record.version
        if action is ControlAction.unpin:
            manager.unpin()
            return True
        assert version is not None
        if action is ControlAction.refuse:
            manager.refuse(version, record.reason or "", refusal_reason(record))
        elif action is ControlAction.pin:
            manager.pin(version)
        elif action is ControlAction.rollback:
            if manager._refused(version):
                raise VersionConflict(f"{version} is refused here; cannot roll back to it")
            manager._pin(version, "rollback")
        elif action is ControlAction.canary:
            if _stale_canary(manager, version):
                return False
            manager.start_canary(version, record.issued_at)
            manager.promoted = manager.promoted or record.previous
        elif action is ControlAction.promote:
            if manager.canary != version:
                return False
            manager.promote(version)
        return True


def refusal_reason(record: ControlRecord) -> str:
    """The reason a refusal shows: the check that failed, the canary judge, or an operator."""
    return record.check or ("canary" if record.actor == "canary" else "operator")


def _stale_canary(manager: AdapterManager, version: str) -> bool:
    """A canary record that lost to the log: pinned, refused, or not newer than what serves."""
    floor = max(version_number(manager.live), version_number(manager.canary or BASE_VERSION))
    return manager.pinned is not None or manager._refused(version) or version_number(version) <= floor


def restore(manager: AdapterManager, record: ControlRecord) -> None:
    """Fold a past decision into the state without loading anything (`reconcile` then does)."""
    with manager._lock:
        action, version = record.action, record.version
        canary = manager.restored_canary[0] if manager.restored_canary else None
        if action is ControlAction.unpin:
            manager.pinned = None
            return
        assert version is not None
        if action is ControlAction.refuse:
            manager.status[version] = VersionStatus(
                "refused", refusal_reason(record), record.reason or "", checked_at=record.issued_at
            )
            manager.pinned = None if manager.pinned == version else manager.pinned
            if manager.promoted == version:
                manager.promoted, manager.stepped_down_from = None, version
            if canary == version:
                manager.restored_canary = None
        elif action in (ControlAction.pin, ControlAction.rollback):
            manager.pinned, manager.restored_canary = version, None
        elif action is ControlAction.canary:
            newer = canary is None or version_number(version) > version_number(canary)
            if manager.pinned is None and not manager._refused(version) and newer:
                manager.restored_canary, manager.canary_history = (version, record.issued_at), True
                manager.promoted = (
                    manager.promoted or record.previous
                )  # the live version it was tried against
        elif action is ControlAction.promote and canary == version:
            manager.promoted, manager.restored_canary, manager.stepped_down_from = version, None, None


def reconcile(manager: AdapterManager, trigger: str = "reconcile", enforce_kl_live: bool = True) -> str:
    """Make what serves agree with the state: the pinned version if any; else, with canaries, the version
    last promoted and the canary; never a refused one; then newer versions as an automatic step would.
    Returns the live version."""
    with manager._lock:
        if manager.pinned is not None:
            if manager.live == manager.pinned:
                return manager.live
            if not manager._refused(manager.pinned) and manager._try(
                manager.pinned, trigger, enforce_kl_live=False
            ):
                return manager.live
            log.error(
                "the pinned version %s cannot go live on this replica; following the newest", manager.pinned
            )
            manager.pinned = None
        if manager.canaries and (manager.promoted or manager.stepped_down_from):
            target = manager.promoted
            if target is None or manager._refused(target):  # stepped down, as `AdapterManager.refuse` does
                below = manager._newest_good_below(manager.stepped_down_from or target or BASE_VERSION)
                target = below or BASE_VERSION
            if manager.live != target and not manager._try(target, trigger, enforce_kl_live=False):
                log.error("the promoted version %s cannot go live on this replica", target)
        if manager._refused(manager.live):
            manager._try(
                manager._newest_good_below(manager.live) or BASE_VERSION, trigger, enforce_kl_live=False
            )
        restored, manager.restored_canary = manager.restored_canary, None
        if manager.canaries and restored is not None and manager.canary is None:
            version, since = restored
            if version_number(version) > version_number(manager.live):
                try:
                    manager.start_canary(version, since)
                except VersionConflict as exc:
                    log.error("the canary %s cannot serve on this replica: %s", version, exc)
        bootstrap = trigger == "startup" and not manager.canary_history  # no canary yet: the newest goes live
        return manager._follow_newest(trigger, enforce_kl_live=enforce_kl_live, through_canary=not bootstrap)
