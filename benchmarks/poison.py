"""`thumbtune bench poison`: the poisoning drill. Can one API key steer what everyone is served?

Arms, each on a fresh embedded system (`thumbtune up`: broker, server, learner, store) under OUT/<arm>, with
the same honest users, prompts and seeds:

    clean     --users honest users, each with an API key of its own, rate by --rule (concise)
    caps-off  the same, plus one key sending about half of all ratings by --attacker-rule ('verbose': approve
              answers over 40 words), with the rater caps off (THUMBTUNE_LEARNER_RATER_CAP=1)
    caps-on   the same attack against the product's rater caps (THUMBTUNE_LEARNER_RATER_CAP's default)

The attacker is as many concurrent simulated users as the honest ones, on one key, so the server answers it
about as often and it sends about half the ratings (the measured share is reported). A run ends once the
honest users have sent --thumbs ratings. Then the version the learner had after each --eval-every honest
ratings (the last human batch's version at or below the mark, and the last one) is evaluated on held-out
prompts under the honest rule (`benchmarks.loop.measure`): the x axis counts honest ratings only.

    OUT/poison.json   every arm's summary, approval at each mark, and ratio = arm / clean at the same honest
                      ratings (issue 15's target: caps-on >= 0.8 of clean at the end)
    OUT/poison.png    approval against honest ratings, one curve per arm
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

from benchmarks.common import machine
from benchmarks.loop import TARGET_APPROVAL, measure, wait_for_trained
from benchmarks.system import EmbeddedSystem
from learner.config import LearnerSettings
from thumbtune.cli.rules import load_rule
from thumbtune.cli.simulate import Simulator, load_prompts, progress_printer
from thumbtune.core.settings import Settings

ARMS = ("clean", "caps-off", "caps-on")
ATTACKER_KEY = "attacker"
TARGET_RATIO = 0.8
"""Issue 15: with caps on, the honest approval reaches >= 80% of what it reaches without the attacker."""


def parse_arms(spec: str) -> list[str]:
    """'clean,caps-on' -> ['clean', 'caps-on']; a clear error for an unknown or repeated arm."""
    arms = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown or len(set(arms)) != len(arms):
        raise ValueError(
            f"--arms takes one or more distinct of {', '.join(ARMS)} (comma-separated), got {spec!r}"
        )
    return arms


def honest_keys(users: int) -> list[str]:
    return [f"honest-{i}" for i in range(users)]


def at_marks(every: int):  # noqa: ANN201 - a `measure` chooser
    """The last human batch's version at or below each multiple of ``every`` honest ratings, and the last."""

    def choose(ends: list[dict]) -> list[dict]:
        if not ends:
            return []
        marks = range(every, ends[-1]["thumbs"] + 1, every)
        chosen = [
            max((r for r in ends if r["thumbs"] <= m), key=lambda r: r["thumbs"], default=None) for m in marks
        ]
        picked = {r["version"]: r for r in [*chosen, ends[-1]] if r is not None}
        return sorted(picked.values(), key=lambda r: r["thumbs"])

    return choose


async def _drive(honest: Simulator, attacker: Simulator | None) -> None:
    """Honest and attacking users at once; the attacker stops when the honest users are done."""

    async def honest_then_stop() -> None:
        try:
            await honest.run_async()
        finally:
            if attacker is not None:
                attacker.stop()

    await asyncio.gather(honest_then_stop(), *([attacker.run_async()] if attacker else []))


def run_arm(
    settings: Settings,
    arm: str,
    *,
    out: Path,
    rule: str,
    attacker_rule: str,
    thumbs: int,
    users: int,
    eval_every: int,
    samples_per_prompt: int,
    temperature: float,
    max_tokens: int,
    seed: int,
) -> dict:
    """One arm: its system, its users, then `measure` on the honest ratings; its results (bench loop's)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = honest_keys(users)
    env = {"THUMBTUNE_API_KEYS": ",".join([*keys, ATTACKER_KEY])}
    if arm == "caps-off":
        env["THUMBTUNE_LEARNER_RATER_CAP"] = "1"
    common = dict(temperature=temperature, max_tokens=max_tokens, prompts=load_prompts("train"))
    honest = Simulator(
        "",
        load_rule(rule),
        users=users,
        thumbs=thumbs,
        api_key=keys,
        seed=seed,
        on_rating=progress_printer(50),
        **common,
    )
    attacker = (
        Simulator(
            "",
            load_rule(attacker_rule),
            users=users,
            thumbs=100 * thumbs,
            api_key=ATTACKER_KEY,
            seed=seed + 1000,
            **common,
        )
        if arm != "clean"
        else None
    )
    system = EmbeddedSystem(out, out / "system.log", env=env)
    print(f"[bench poison] === {arm} === (log: {out / 'system.log'})", flush=True)
    with system:
        for sim in (honest, attacker):
            if sim is not None:
                sim.url = system.url
        asyncio.run(_drive(honest, attacker))
        sent = sum(len(r.event_ids) for sim in (honest, attacker) if sim for r in sim.report.ratings)
        wait_for_trained(system.store, sent, LearnerSettings().batch_size, 180)
    attacks = len(attacker.report.ratings) if attacker else 0
    config = {
        "arm": arm,
        "rule": rule,
        "attacker_rule": attacker_rule if attacker else None,
        "thumbs": thumbs,
        "users": users,
        "attacker_ratings": attacks,
        "attacker_share": round(attacks / (attacks + len(honest.report.ratings)), 4),
        "temperature": temperature,
        "max_tokens": max_tokens,
        "samples_per_prompt": samples_per_prompt,
        "eval_every": eval_every,
        "model": settings.model,
        "learner": LearnerSettings(**({"rater_cap": 1.0} if arm == "caps-off" else {})).model_dump(
            mode="json"
        ),
        **machine(),
    }
    honest.report.write_jsonl(out / "ratings.jsonl")
    if attacker:
        attacker.report.write_jsonl(out / "attacker-ratings.jsonl")
    return measure(
        settings,
        honest.report,
        system.store,
        out,
        config,
        judge=load_rule(rule),
        choose=at_marks(eval_every),
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
    )


def interpolate(points: list[tuple[int, float]], x: int) -> float | None:
    """The piecewise-linear curve through ``points`` (sorted by x) at ``x``; its ends beyond them."""
    if not points:
        return None
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def compare(results: dict[str, dict]) -> dict:
    """Per arm: approval at each evaluated honest-rating count, and its final one against the clean run's
    curve at the same number of honest ratings (linear between the clean run's evaluations)."""
    clean = [(r["thumbs"], r["approval"]) for r in results["clean"]["versions"]] if "clean" in results else []
    out = {}
    for arm, r in results.items():
        rows = [
            {"thumbs": v["thumbs"], "approval": v["approval"], "version": v["version"]} for v in r["versions"]
        ]
        final = rows[-1]
        reference = interpolate(clean, final["thumbs"])
        out[arm] = {
            "approval": rows,
            "final_thumbs": final["thumbs"],
            "final_approval": final["approval"],
            "clean_at_same_ratings": None if reference is None else round(reference, 4),
            "ratio_to_clean": round(final["approval"] / reference, 3) if reference else None,
            "attacker_share": r["config"]["attacker_share"],
            "capability_min": r["summary"]["capability_min"],
            "capability_base": r["summary"]["capability_base"],
            "versions": r["summary"]["versions"],
            "loop_wall_s": r["summary"]["loop_wall_s"],
            "top_share_capped_median": _median_diag(r, "raters.top_share_capped"),
            "top_share_median": _median_diag(r, "raters.top_share"),
        }
    return out


def _median_diag(results: dict, name: str) -> float | None:
    values = sorted(v["diagnostics"][name] for v in results["all_versions"] if name in v["diagnostics"])
    return round(values[len(values) // 2], 3) if values else None


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib  # lazy: matplotlib is the optional bench extra (checked by `run` first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, and after choosing the headless backend

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for arm, r in results.items():
        rows = r["versions"]
        share = r["config"]["attacker_share"]
        label = arm if not share else f"{arm} (attacker {share:.0%} of ratings)"
        ax.plot([v["thumbs"] for v in rows], [v["approval"] for v in rows], "o-", label=label)
    ax.axhline(TARGET_APPROVAL, ls="--", lw=1, color="grey")
    ax.set_xlabel("honest ratings trained on")
    ax.set_ylabel(f"approval under '{next(iter(results.values()))['config']['rule']}' (held-out)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("bench poison: one key sending half the ratings by the opposite rule", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(settings: Settings, *, arms: list[str], out: Path, **options: object) -> dict:
    """Every arm in turn (a 2-core machine cannot host two systems at once), then OUT/poison.json and .png."""
    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after an hour of simulated users
        raise ValueError("bench poison draws poison.png with matplotlib: .venv/bin/pip install -e '.[bench]'")
    load_rule(str(options["rule"]))  # a bad rule fails before any system starts
    load_rule(str(options["attacker_rule"]))
    results = {arm: run_arm(settings, arm, out=out / arm, **options) for arm in arms}
    joint = {"arms": arms, "target_ratio": TARGET_RATIO, "compare": compare(results)}
    (out / "poison.json").write_text(json.dumps(joint, indent=2))
    plot(results, out / "poison.png")
    print(f"{'':26}" + "".join(f"{a:>12}" for a in arms))
    for key in (
        "attacker_share",
        "final_thumbs",
        "final_approval",
        "ratio_to_clean",
        "top_share_capped_median",
        "capability_min",
        "versions",
        "loop_wall_s",
    ):
        print(f"{key:26}" + "".join(f"{str(joint['compare'][a][key]):>12}" for a in arms))
    print(f"[bench poison] wrote {out / 'poison.json'} and {out / 'poison.png'}")
    return joint
