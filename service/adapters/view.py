"""What GET /admin/adapters shows: every version this replica knows, and why it is (not) live."""

from __future__ import annotations

from dataclasses import asdict

from service import metrics
from service.adapters.manager import AdapterManager
from service.protocol import (
    AdaptersView,
    AdapterVersionView,
    ControlView,
    DecisionView,
    FollowerView,
    KLBounds,
    Refusal,
)
from thumbtune.core.contract import BASE_VERSION, version_number


def describe(
    manager: AdapterManager,
    follower: FollowerView | None = None,
    control: ControlView | None = None,
    decision: DecisionView | None = None,
) -> AdaptersView:
    """A snapshot for GET /admin/adapters (no lock: an operator can look while a check runs)."""
    statuses, live, pinned = dict(manager.status), manager.live, manager.pinned
    stored = manager.store.versions()
    loaded = manager.registry.versions()
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
    )
