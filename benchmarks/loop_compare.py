"""`thumbtune bench loop --signal direct,both` or `--canary-share 0,0.1`: the loop benchmark once per arm,
side by side.

An arm is one learner signal (what the learner trains the policy on, learner/trainer.py) or one canary
share (what share of users a new version serves before the judge lets it go live). Each arm gets its own
embedded system (fresh broker, server, learner and adapter store) under OUT/<arm>, and the same simulated
users: the same rule, seeds, prompts, noise and number of ratings, so the curves differ only by the arm.
Then:

    OUT/side-by-side.png   approval (held-out) against human ratings, and against wall time, one curve per
                           arm; the reward model's prequential accuracy against human ratings
    OUT/side-by-side.json  every run's summary, and the ratios against the first arm:
                           ratings_ratio = ratings to 80% (first arm) / ratings to 80% (this one)
                           wall_ratio    = the users' wall time for the same ratings (this / first)

The runs are sequential (a 2-core machine cannot host two systems without each slowing the other).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.loop import TARGET_APPROVAL, run
from thumbtune.core.settings import Settings

SIGNALS = ("direct", "reward_model", "both")


def parse_signals(spec: str) -> list[str]:
    """'direct,both' -> ['direct', 'both']; a clear error for an unknown or repeated name."""
    signals = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in signals if s not in SIGNALS]
    if not signals or unknown or len(set(signals)) != len(signals):
        raise ValueError(
            f"--signal takes one or more distinct of {', '.join(SIGNALS)} (comma-separated), got {spec!r}"
        )
    return signals


def parse_shares(spec: str) -> list[float]:
    """'0, 0.1' -> [0.0, 0.1]; a clear error for a share outside [0, 0.5] or a repeated one."""
    try:
        shares = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        shares = []
    if not shares or any(not 0 <= x <= 0.5 for x in shares) or len(set(shares)) != len(shares):
        raise ValueError(
            f"--canary-share takes one or more distinct shares in [0, 0.5] (comma-separated), got {spec!r}"
        )
    return shares


def arms(signal: str | None, canary_share: str | None) -> dict[str, dict]:
    """What each run of bench loop sets, by name: {'direct': {'signal': 'direct'}, ...} or
    {'canary-0': {'canary_share': 0.0}, 'canary-0.1': ...}; one entry per value given. Only one of the two
    may list several values (an arm differs from the others in one setting)."""
    signals = parse_signals(signal) if signal is not None else []
    shares = parse_shares(canary_share) if canary_share is not None else []
    if len(signals) > 1 and len(shares) > 1:
        raise ValueError("side by side varies one setting: give several --signal or several --canary-share")
    if len(shares) > 1:
        common = {"signal": signals[0]} if signals else {}
        return {f"canary-{share:g}": common | {"canary_share": share} for share in shares}
    common = {"canary_share": shares[0]} if shares else {}
    if not signals:
        return {"run": common}
    return {s: common | {"signal": s} for s in signals}


def ratios(summaries: dict[str, dict]) -> dict[str, dict]:
    """Each arm against the first: ratings to the target (first / this) and the users' wall time."""
    first = summaries[next(iter(summaries))]
    out = {}
    for signal, s in summaries.items():
        to_target, first_to_target = s["thumbs_to_target"], first["thumbs_to_target"]
        out[signal] = {
            "ratings_ratio": round(first_to_target / to_target, 2) if to_target and first_to_target else None,
            "wall_ratio": round(s["loop_wall_s"] / first["loop_wall_s"], 2),
        }
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib  # lazy: matplotlib is the optional bench extra (checked by `run` first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, and after choosing the headless backend

    fig, (by_ratings, by_wall, rm) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    for signal, r in results.items():
        rows = r["versions"]
        by_ratings.plot([v["thumbs"] for v in rows], [v["approval"] for v in rows], "o-", label=signal)
        by_wall.plot([v["wall_s"] / 60 for v in rows], [v["approval"] for v in rows], "o-", label=signal)
        rm_rows = [v for v in r["all_versions"] if "reward_model.recent_accuracy" in v["diagnostics"]]
        rm.plot(
            [v["thumbs"] for v in rm_rows],
            [v["diagnostics"]["reward_model.recent_accuracy"] for v in rm_rows],
            ".-",
            label=signal,
        )
    for ax, xlabel in ((by_ratings, "human ratings trained on"), (by_wall, "wall time, minutes")):
        ax.axhline(TARGET_APPROVAL, ls="--", lw=1, color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("approval (held-out prompts)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    rm.set_xlabel("human ratings")
    rm.set_ylabel("reward model: prequential accuracy (newest window)")
    rm.set_ylim(0.4, 1)
    rm.legend(fontsize=8)
    rule = next(iter(results.values()))["config"]["rule"]
    fig.suptitle(f"bench loop, rule '{rule}': {', '.join(results)} side by side", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def side_by_side(settings: Settings, runs: dict[str, dict], *, out: Path, **options: object) -> dict:
    """`benchmarks.loop.run` per arm (``runs``: `arms`) into OUT/<arm>, then the joint plot and ratios."""
    results = {}
    for name, arm in runs.items():
        print(f"[bench loop] === {name} ===", flush=True)
        results[name] = run(settings, out=out / name, **(options | arm))
    names = list(runs)
    summaries = {name: r["summary"] for name, r in results.items()}
    joint = {"arms": runs, "summaries": summaries, "ratios": ratios(summaries)}
    (out / "side-by-side.json").write_text(json.dumps(joint, indent=2))
    plot(results, out / "side-by-side.png")
    keys = (
        "thumbs_to_target",
        "min_approval_after_target",
        "final_approval",
        "capability_base",
        "capability_min",
        "feedback_to_live_s",
        "loop_wall_s",
        "reward_model_run_accuracy",
        "served_approval_by_quarter",
        "ratings_untrained",
    )
    print(f"{'':28}" + "".join(f"{s:>24}" for s in names))
    for key in keys:
        print(f"{key:28}" + "".join(f"{str(summaries[s].get(key)):>24}" for s in names))
    for key in ("ratings_ratio", "wall_ratio"):
        print(f"{key:28}" + "".join(f"{str(joint['ratios'][s][key]):>24}" for s in names))
    print(f"[bench loop] wrote {out / 'side-by-side.json'} and {out / 'side-by-side.png'}")
    return joint
