"""`thumbtune bench ...`: the benchmarks' commands, registered by thumbtune.cli.main from a checkout.

Each benchmark prints its figures, ratios side by side in one run; docs/BENCHMARKS.md records them with
the exact commands. A benchmark's defaults are its documented configuration. The commands here run the
system (server, learner, users); those of the learner alone are in benchmarks/cli_learner.py.
"""

from __future__ import annotations

from pathlib import Path

import typer

from benchmarks.cli_learner import app as learner_app
from thumbtune.cli.configure import configure
from thumbtune.cli.rules import RULE_HELP

app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures (from a checkout).")
app.add_typer(learner_app)  # the learner's own benchmarks, no server: benchmarks/cli_learner.py


@app.command("serve")
def bench_serve(
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    requests_per_client: int = typer.Option(4, help="Requests each client sends per level."),
    max_tokens: int = typer.Option(64, help="Tokens per answer."),
    vllm: bool = typer.Option(
        True,
        "--vllm/--no-vllm",
        help="Include vLLM directly and thumbtune in front of vLLM (when installed).",
    ),
) -> None:
    """thumbtune vs a naive one-at-a-time server vs the raw batched-decode ceiling, at 1/4/16 clients; vLLM
    directly vs thumbtune in front of it, and vLLM's log-probs against the learner's."""
    from benchmarks.serve import run  # lazy: start-up time (torch), for every `thumbtune` command

    run(configure(), out=out, requests_per_client=requests_per_client, max_tokens=max_tokens, with_vllm=vllm)


@app.command("loop")
def bench_loop(
    rule: str = typer.Option("concise", help=RULE_HELP),
    thumbs: int = typer.Option(1500, min=1, help="Ratings the simulated users send."),
    out: Path = typer.Option(Path("artifacts/bench-loop"), help="Where results.json and learning.png go."),
    url: str = typer.Option(None, help="Use a running server instead of starting the embedded system."),
    adapter_store: str = typer.Option(
        None, help="With --url: the store its learner writes (default the setting)."
    ),
    users: int = typer.Option(4, min=1, help="Concurrent simulated users."),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of flipping each rating."),
    choice: bool = typer.Option(
        False, "--choice", help="Users choose between two answers instead of thumbs."
    ),
    rank: int = typer.Option(
        None, "--rank", min=2, max=4, help="Users rank K answers, best first, instead of thumbs."
    ),
    temperature: float = typer.Option(1.0, min=0.0, max=2.0, help="Sampling temperature of users and eval."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of users and eval."),
    samples_per_prompt: int = typer.Option(2, min=1, help="Answers sampled per held-out prompt per version."),
    eval_every: int = typer.Option(
        5, min=1, help="Evaluate the last version of every Nth human batch (always the base and the last)."
    ),
    seed: int = typer.Option(0, help="Seed of the users and the evaluation."),
    signal: str = typer.Option(
        None,
        help="The embedded learner's signal: direct, reward_model or both (default: "
        "THUMBTUNE_LEARNER_SIGNAL's). Several, comma-separated (e.g. direct,both), run one after another on "
        "the same users and seeds into OUT/<signal> and are drawn side by side in OUT/side-by-side.png.",
    ),
    think_s: float = typer.Option(
        0.0, min=0.0, help="Seconds each simulated user waits after a rating (0: as fast as answers come)."
    ),
    refine_rounds: int = typer.Option(
        None,
        min=0,
        help="The embedded learner's refine_rounds: own-answer updates between human batches (default: "
        "THUMBTUNE_LEARNER_REFINE_ROUNDS's).",
    ),
    canary_share: str = typer.Option(
        None,
        help="Serve each new version to this share of users (0-0.5) as a canary first "
        "(THUMBTUNE_CANARY_SHARE; default none, as `thumbtune up`); the users then come as 1,000 distinct "
        "`user` ids. Several, comma-separated (e.g. 0,0.1), run side by side as --signal's do, into "
        "OUT/canary-<share>.",
    ),
) -> None:
    """The whole loop with simulated users: approval, KL, capability per version; results.json + plot."""
    from benchmarks.loop import run  # lazy: start-up time (torch), for every `thumbtune` command
    from benchmarks.loop_compare import arms, side_by_side  # lazy: as above

    options = dict(
        rule=rule,
        thumbs=thumbs,
        users=users,
        noise=noise,
        choice=choice,
        rank=rank,
        temperature=temperature,
        max_tokens=max_tokens,
        samples_per_prompt=samples_per_prompt,
        eval_every=eval_every,
        seed=seed,
        think_s=think_s,
        refine_rounds=refine_rounds,
    )
    try:
        runs = arms(signal, canary_share)
        if len(runs) > 1:
            if url is not None:
                raise ValueError("side by side starts one embedded system per arm: drop --url")
            side_by_side(configure(), runs, out=out, **options)
        else:
            run(configure(), out=out, url=url, adapter_store=adapter_store, **options, **runs.popitem()[1])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("canary")
def bench_canary(
    out: Path = typer.Option(Path("artifacts/bench-canary/drill"), help="Where results.json and logs go."),
    adapters: Path = typer.Option(
        Path("artifacts/bench-canary/adapters"),
        help="The good and bad adapters: trained here on the first run (~15 min, both cores), then reused.",
    ),
    rule: str = typer.Option("concise", help=RULE_HELP),
    repetitions: int = typer.Option(20, min=1, help="Drills, each on a fresh system with its own seed."),
    first_seed: int = typer.Option(1, help="Seed of the first drill (the next ones count up)."),
    good_versions: int = typer.Option(16, min=1, help="PPO updates of the good adapter (on the rule)."),
    bad_versions: int = typer.Option(8, min=1, help="PPO updates of the bad adapter (on not:RULE)."),
    thumb_users: int = typer.Option(4, min=0, help="Concurrent simulated users who rate one answer."),
    compare_users: int = typer.Option(4, min=0, help="Concurrent simulated users who pick one of two."),
    population: int = typer.Option(1000, min=1, help="Distinct users (`user` ids) the requests come from."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the users' requests."),
    max_ratings: int = typer.Option(
        1000, min=1, help="Ratings after which an undecided canary counts as undecided and the drill goes on."
    ),
    canary_share: float = typer.Option(
        None,
        min=0.0,
        max=0.5,
        help="THUMBTUNE_CANARY_SHARE of the drill (default 0.05; the product's 0.1).",
    ),
    compare_share: float = typer.Option(
        None, min=0.0, max=1.0, help="THUMBTUNE_CANARY_COMPARE_SHARE (default 0; the product's 0.5)."
    ),
) -> None:
    """The canary drill: a good version is promoted and a planted bad one rolled back, by simulated users."""
    from benchmarks.canary import run  # lazy: start-up time (torch), for every `thumbtune` command

    if thumb_users + compare_users == 0:
        raise typer.BadParameter("the drill needs users: --thumb-users or --compare-users above 0")
    try:
        run(
            out,
            adapters=adapters,
            rule=rule,
            repetitions=repetitions,
            first_seed=first_seed,
            good_versions=good_versions,
            bad_versions=bad_versions,
            thumb_users=thumb_users,
            compare_users=compare_users,
            population=population,
            max_tokens=max_tokens,
            max_ratings=max_ratings,
            **{
                k: v
                for k, v in (("canary_share", canary_share), ("compare_share", compare_share))
                if v is not None
            },
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("poison")
def bench_poison(
    out: Path = typer.Option(Path("artifacts/bench-poison"), help="Where OUT/<arm>/ and poison.json go."),
    arms: str = typer.Option(
        "clean,caps-off,caps-on",
        help="Which runs, in order: clean (honest users alone), caps-off and caps-on (plus the attacker).",
    ),
    rule: str = typer.Option("concise", help="How the honest users rate. " + RULE_HELP),
    attacker_rule: str = typer.Option("verbose", help="How the attacking key rates."),
    thumbs: int = typer.Option(480, min=1, help="Honest ratings per run (the attacker's come on top)."),
    users: int = typer.Option(
        4, min=1, help="Honest users, each with a key of its own (the attacker: as many)."
    ),
    eval_every: int = typer.Option(
        160, min=1, help="Evaluate the version after every N honest ratings (and the base and the last)."
    ),
    samples_per_prompt: int = typer.Option(2, min=1, help="Answers sampled per held-out prompt per version."),
    temperature: float = typer.Option(1.0, min=0.0, max=2.0, help="Sampling temperature of users and eval."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of users and eval."),
    seed: int = typer.Option(0, help="Seed of the users and the evaluation (the same in every arm)."),
) -> None:
    """The poisoning drill: honest users' approval with and without one key sending half the ratings by the
    opposite rule, with the rater caps on and off."""
    from benchmarks.poison import parse_arms, run  # lazy: start-up time (torch), every `thumbtune` command

    try:
        run(
            configure(),
            arms=parse_arms(arms),
            out=out,
            rule=rule,
            attacker_rule=attacker_rule,
            thumbs=thumbs,
            users=users,
            eval_every=eval_every,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("canary-replay")
def bench_canary_replay(
    seeds: int = typer.Option(1000, min=1, help="Replayed drills, one seed each."),
    first_seed: int = typer.Option(1, help="Seed of the first (the next ones count up)."),
    canary_share: float = typer.Option(
        0.05, min=0.0, max=0.5, help="THUMBTUNE_CANARY_SHARE, as the drill's."
    ),
    compare_share: float = typer.Option(0.0, min=0.0, max=1.0, help="THUMBTUNE_CANARY_COMPARE_SHARE."),
    base: float = typer.Option(
        0.203, min=0.0, max=1.0, help="Approval of the base's answers (live at first)."
    ),
    good: float = typer.Option(0.750, min=0.0, max=1.0, help="Approval of the good version's answers."),
    bad: float = typer.Option(0.078, min=0.0, max=1.0, help="Approval of the bad version's answers."),
    thumb_fraction: float = typer.Option(
        0.57, min=0.0, max=1.0, help="Share of requests rated with a thumb (the rest: a choice of two)."
    ),
    ratings_per_s: float = typer.Option(
        0.47, min=0.001, help="Ratings per second (the judge looks each second)."
    ),
    max_ratings: int = typer.Option(1000, min=1, help="Ratings after which a canary counts as undecided."),
    oracle: bool = typer.Option(
        False,
        "--oracle",
        help="Decide by Wald's SPRT told every version's approval rate instead of the judge: the floor no "
        "test with the judge's error rates can go much below (benchmarks/canary_bound.py).",
    ),
) -> None:
    """The drill's decisions through the product's judge on synthetic ratings: error rates over many seeds."""
    from benchmarks.canary_bound import oracle as sprt  # lazy: start-up time, for every `thumbtune` command
    from benchmarks.canary_replay import run

    run(
        decide=sprt if oracle else None,
        label="Wald's SPRT told the rates (--oracle)" if oracle else "the product's judge",
        seeds=seeds,
        first_seed=first_seed,
        canary_share=canary_share,
        compare_share=compare_share,
        approval={"base": base, "good": good, "bad": bad},
        thumb_fraction=thumb_fraction,
        ratings_per_s=ratings_per_s,
        max_ratings=max_ratings,
    )


@app.command("soak")
def bench_soak(
    out: Path = typer.Option(Path("artifacts/bench-soak"), help="Results and the made adapters."),
    minutes: float = typer.Option(30.0, min=0.1, help="How long the load runs."),
    swap_every: float = typer.Option(7.0, min=0.5, help="Seconds between version swaps."),
    clients: int = typer.Option(4, min=1, help="Users chatting and rating without pause."),
    max_tokens: int = typer.Option(32, min=1, help="max_tokens of each chat request."),
    pause: float = typer.Option(30.0, min=0.0, help="Seconds the broker is frozen, halfway."),
    window: float = typer.Option(300.0, min=1.0, help="Seconds per latency window."),
    warmup: float = typer.Option(300.0, min=0.0, help="Seconds of warm-up before RSS growth counts."),
    adapters: int = typer.Option(4, min=1, help="Weight sets the versions cycle through."),
    noise: float = typer.Option(0.005, min=0.0, help="Std of the random LoRA B weights."),
) -> None:
    """One server for a long time: chat, ratings, version swaps and a broker pause; RSS, 5xx, lost ratings."""
    from benchmarks.soak import run  # lazy: start-up time, for every `thumbtune` command

    run(
        out,
        minutes=minutes,
        swap_every=swap_every,
        clients=clients,
        max_tokens=max_tokens,
        pause_s=pause,
        window_s=window,
        warmup_s=warmup,
        adapters=adapters,
        noise=noise,
    )
