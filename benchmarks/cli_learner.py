"""`thumbtune bench ...` for the learner alone: PPO, its settings, its KL penalty and its reward model, on
the configured model without a server, users or broker (registered into benchmarks/cli.py's ``bench``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from thumbtune.cli.configure import configure
from thumbtune.cli.rules import RULE_HELP

app = typer.Typer()


@app.command("learn")
def bench_learn(
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    repeats: int = typer.Option(3, min=1, help="Runs of each contender (interleaved); medians are reported."),
    trl: bool = typer.Option(True, "--trl/--no-trl", help="Include TRL's GRPOTrainer (the bench extra)."),
    contenders: str = typer.Option(
        None, help="Comma-separated contenders to run (default: all that can run here; ours is required)."
    ),
) -> None:
    """PPO update throughput on 64 fixed rated answers: the learner vs the floor of any PPO update vs TRL,
    and the learner as 2 data-parallel ranks."""
    from benchmarks.learn import check_contenders, run  # lazy: start-up time (torch), for every command

    only = [c.strip() for c in contenders.split(",") if c.strip()] if contenders else None
    try:
        check_contenders(only)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--contenders") from exc
    run(configure(), out=out, repeats=repeats, with_trl=trl, only=only)


@app.command("ablate")
def bench_ablate(
    arm: list[str] = typer.Option(
        ..., help="Learner overrides of one arm, e.g. 'lam=0.95' or 'lam=1.0,kl_coef=0.3' ('' = defaults)."
    ),
    rule: str = typer.Option("concise", help=RULE_HELP),
    versions: int = typer.Option(24, min=1, help="PPO updates (adapter versions) per arm."),
    batch_size: int = typer.Option(32, min=1, help="Rated answers per update."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the sampled answers and the evaluation."),
    eval_every: int = typer.Option(1_000_000, min=1, help="Evaluate every Nth version (always the last)."),
    samples_per_prompt: int = typer.Option(2, min=1, help="Answers per held-out prompt in an evaluation."),
    seed: int = typer.Option(1, help="Seed of the prompt draws and the evaluation."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Learner settings side by side on the same simulated users (no server): approval, KL, capability."""
    from benchmarks.ablate import run  # lazy: start-up time (torch), for every `thumbtune` command

    try:
        run(
            configure(),
            arm,
            rule=rule,
            versions=versions,
            batch_size=batch_size,
            max_tokens=max_tokens,
            eval_every=eval_every,
            samples_per_prompt=samples_per_prompt,
            seed=seed,
            out=out,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("kl-penalty")
def bench_kl_penalty(
    versions: list[str] = typer.Argument(..., help="Stored versions to measure, e.g. v10 v25 v40."),
    store: Path = typer.Option(..., help="The adapter store holding them (e.g. bench-out/loop/adapters)."),
    rule: str = typer.Option("concise", help=RULE_HELP),
    answers: int = typer.Option(64, min=2, help="Answers sampled per version (training prompts)."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the sampled answers."),
    seed: int = typer.Option(1, help="Seed of the prompt draw and the sampling."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Where the reward's KL penalty falls: per-answer k1, k3 and exact KL sums vs the rule's approval."""
    from benchmarks.kl_penalty import run  # lazy: start-up time (torch), for every `thumbtune` command

    try:
        run(
            configure(),
            store,
            versions,
            rule=rule,
            answers=answers,
            max_tokens=max_tokens,
            seed=seed,
            out=out,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("exact-reward")
def bench_exact_reward(
    rule: str = typer.Option("concise", help=RULE_HELP),
    updates: int = typer.Option(25, min=1, help="PPO updates on the learner's own answers."),
    every: int = typer.Option(5, min=1, help="Evaluate the published weights every this many updates."),
    seed: int = typer.Option(0, help="Seed of the prompt draws, the sampling and the evaluation."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """PPO on the learner's own answers scored by the rule itself (a reward model that is never wrong):
    approval, KL and capability against updates and learner time, the bound for the reward-model signals."""
    from benchmarks.exact_reward import run  # lazy: start-up time (torch), for every `thumbtune` command

    try:
        run(configure(), rule=rule, updates=updates, every=every, seed=seed, out=out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("reward-features")
def bench_reward_features(
    rules: str = typer.Option("concise,on-topic", help="Comma-separated rules to label the answers by."),
    answers: int = typer.Option(512, min=2, help="Base answers (a multiple of rollout_samples)."),
    batch: int = typer.Option(32, min=1, help="Answers per reward-model batch, as the learner's batches."),
    seed: int = typer.Option(0, help="Seed of the prompt draws and the sampling."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """The reward model's prequential AUC, accuracy and balanced accuracy on the base's answers, for each
    choice of the hidden states its features read (final or middle layer, with or without the prompt)."""
    from benchmarks.reward_features import run  # lazy: start-up time (torch), for every `thumbtune` command

    try:
        run(
            configure(),
            rules_=[r.strip() for r in rules.split(",") if r.strip()],
            answers=answers,
            batch=batch,
            seed=seed,
            out=out,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
