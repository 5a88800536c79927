"""What GET /admin/adapters shows: every version this replica knows, and why it is (not) live."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from service import metrics
from service.adapters.manager import AdapterManager, VersionStatus
from service.canary.judge import CanaryJudge, elo_ratings
from service.canary.ratings import VersionRatings
from service.canary.sequential import mean_cs
from service.protocol_admin import (
    AdaptersView,
    AdapterVersionView,
    CanaryView,
    ControlView,
    DecisionView,
    FollowerView,
    KLBounds,
    Refusal,
)
from thumbtune.core.contract import ADAPTER_OFF, BASE_VERSION, version_number

ALPHA = 0.05
"""The approval intervals shown: 95%, anytime-valid (they stay valid however often they are looked at)."""


@dataclass
class Tallies:
    """Every replica's ratings folded from the feedback topic, and the canary judge (with a control plane)."""

    ratings: VersionRatings
    lock: threading.Lock
    judge: CanaryJudge | None


def _stage(manager: AdapterManager, version: str, status: VersionStatus | None) -> str:
    if status is not None and status.state == "refused":
        return "refused"
    if version == manager.live:
        return "live"
    if version == manager.canary:
        return "canary"
    if version in manager.retired:
        return "retired"
    return "checked" if status is not None else "unchecked"


def describe(
    manager: AdapterManager,
    follower: FollowerView | None = None,
    control: ControlView | None = None,
    decision: DecisionView | None = None,
    tallies: Tallies | None = None,
) -> AdaptersView:
    """A snapshot for GET /admin/adapters (no lock: an operator can look while a check runs)."""
    statuses, live, pinned = dict(manager.status), manager.live, manager.pinned
    stored = manager.store.versions()
    loaded = manager.registry.versions()
    counts, elo = _counts(tallies, live)
    versions = []
    rated = {v for v in counts if v != ADAPTER_OFF}  # answers with the adapter off are not a version's
    for version in sorted({BASE_VERSION, *stored, *statuses, *loaded, *rated}, key=version_number):
        status = statuses.get(version)
        ratings, approvals = counts[version] if version in counts else metrics.APPROVALS.get(version)
        checked = asdict(status) if status is not None else {}
        checked.pop("retry", None)
        interval = mean_cs(approvals, ratings, ALPHA) if ratings else None
        rating = elo.get(version)
        versions.append(
            AdapterVersionView(
                **(checked | {"state": status.state if status else "unchecked"}),
                stage=_stage(manager, version, status),
                version=version,
                in_store=version in stored,
                loaded=version in loaded,
                live=version == live,
                pinned=version == pinned,
                ratings=ratings,
                approvals=approvals,
                approval_rate=approvals / ratings if ratings else None,
                approval_interval=[interval.lower, interval.upper] if interval else None,
                elo=rating[0] if rating else None,
                elo_interval=list(rating[1:]) if rating else None,
            )
        )
    s = manager.settings
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
            live=s.adapter_max_kl_live,
            base=s.adapter_max_kl_base,
            probe_prompts=len(manager.admission.probes),
        ),
        base_model=manager.model_id,
        base_fingerprint=manager.fingerprint,
        follower=follower,
        control=control,
        decision=decision,
        canary=_canary(manager, tallies),
    )


def _counts(tallies: Tallies | None, live: str) -> tuple[dict[str, tuple[int, int]], dict[str, tuple]]:
    """(ratings, approvals) and (Elo, lower, upper) per version from the cluster's tallies; {} without."""
    if tallies is None:
        return {}, {}
    with tallies.lock:
        counts = {}
        for version in tallies.ratings.versions():
            approval = tallies.ratings.approval(version)
            counts[version] = (approval.ratings, approval.approvals)
        comparisons = tallies.ratings.comparisons()
    return counts, elo_ratings(comparisons, live)


def _canary(manager: AdapterManager, tallies: Tallies | None) -> CanaryView | None:
    canary, since = manager.canary, manager.canary_since
    if canary is None or since is None:
        return None
    last = tallies.judge.last if tallies is not None and tallies.judge is not None else None
    if last is None or last.version != canary:
        return CanaryView(
            version=canary,
            since=since,
            share=manager.registry.canary_share,
            ratings=0,
            approvals=0,
            live_ratings=0,
            live_approvals=0,
            difference=None,
            wins=0,
            losses=0,
            verdict=None,
            reason="not judged yet (the feedback topic is still being read)",
            expired=False,
            exhausted=False,
            waiting=manager.waiting,
        )
    cs = last.approval.interval
    return CanaryView(
        version=canary,
        since=since,
        share=manager.registry.canary_share,
        ratings=last.canary.ratings,
        approvals=last.canary.approvals,
        live_ratings=last.against.ratings,
        live_approvals=last.against.approvals,
        difference=[cs.lower, cs.estimate, cs.upper]
        if last.canary.ratings and last.against.ratings
        else None,
        wins=last.head_to_head.wins,
        losses=last.head_to_head.losses,
        verdict=last.verdict.value,
        reason=last.reason,
        expired=last.expired,
        exhausted=last.exhausted,
        waiting=manager.waiting,
    )
