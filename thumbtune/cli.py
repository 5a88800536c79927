"""The `thumbtune` command: one subcommand per process or tool."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from thumbtune.settings import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="thumbtune: a chat model that gets better from its users' thumbs, live.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")


def _settings(**overrides: object) -> Settings:
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return settings


@app.command()
def broker(port: int = typer.Option(None, help="Port (default THUMBTUNE_BROKER_PORT, 9092).")) -> None:
    """Run the embedded Tansu Kafka-protocol broker (memory only) and create thumbtune's topics."""
    from thumbtune.broker import run_broker

    settings = _settings(broker_port=port)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its own readiness probes fail by design at start
    run_broker(settings)


@app.command()
def up() -> None:
    """Start the whole system (embedded broker unless an external Kafka is configured, then the server)."""
    from thumbtune.supervisor import up as run_up

    raise typer.Exit(run_up(_settings()))


@app.command()
def model() -> None:
    """Print which model THUMBTUNE_MODEL resolves to and warm its cache (dequantizing the GGUF once)."""
    from thumbtune.base_model import load_base, resolve

    settings = _settings()
    before = resolve(settings)
    typer.echo(f"THUMBTUNE_MODEL={settings.model!r} -> {before.model_id} ({before.source}: {before.path})")
    loaded = load_base(settings)
    params = sum(p.numel() for p in loaded.model.parameters())
    typer.echo(
        f"loaded {loaded.model_id} from {loaded.path}: {params / 1e6:.1f}M parameters, "
        f"fingerprint {loaded.fingerprint}"
    )


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default THUMBTUNE_HOST)."),
    port: int = typer.Option(None, help="Port (default THUMBTUNE_PORT)."),
) -> None:
    """Run the OpenAI-compatible chat server."""
    import uvicorn

    from service.app import create_app

    settings = _settings(host=host, port=port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


_FROM_FILE = typer.Option(None, "--from-file", help="Replay a JSONL file of FeedbackEvents instead of Kafka.")


@app.command()
def learn(
    from_file: Path | None = _FROM_FILE,
    once: bool = typer.Option(False, "--once", help="With --from-file: process the file once, then exit."),
) -> None:
    """Train adapter versions from rated answers (PPO with a KL penalty to the base).

    Without --from-file: consume thumbtune.feedback as group thumbtune-learner until SIGINT/SIGTERM.
    """
    from learner.config import LearnerSettings

    settings = _settings()
    if from_file is None:
        if once:
            raise typer.BadParameter(
                "--once needs --from-file (the Kafka learner runs until stopped)", param_hint="--once"
            )
        from learner.consumer import run_learner

        raise typer.Exit(run_learner(settings, LearnerSettings()))
    from learner.replay import run_from_file

    if not once:
        raise typer.BadParameter("following a growing file is not supported: add --once", param_hint="--once")
    versions = run_from_file(settings, LearnerSettings(), from_file, once=once)
    typer.echo("versions written: " + (" ".join(versions) or "none (no new events)"))


_RULE_HELP = (
    "How users rate: concise (<= 30 words), no-lists, polite, or package.module:function"
    "(prompt, response) -> bool | float in [0, 1] (a float becomes a 1-5 rating)."
)


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of a running thumbtune server."),
    users: int = typer.Option(8, min=1, help="Concurrent simulated users."),
    thumbs: int = typer.Option(
        200, min=1, help="Ratings to send in all (a choice between two answers is one)."
    ),
    rule: str = typer.Option("concise", help=_RULE_HELP),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of flipping each rating."),
    choice: bool = typer.Option(
        False, "--choice", help="Ask for two answers (n=2) and choose the better one."
    ),
    temperature: float = typer.Option(1.0, min=0.0, max=2.0, help="Sampling temperature of the requests."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the requests."),
    prompts: str = typer.Option("train", help="Bundled prompt set (train, heldout) or a file, one per line."),
    api_key: str = typer.Option(
        None, envvar="THUMBTUNE_API_KEY", help="Bearer key when the server has keys."
    ),
    seed: int = typer.Option(0, help="Seed of the prompt choice and the noise."),
    log: Path = typer.Option(None, help="Write every rating as JSON lines here."),
) -> None:
    """Simulated users: chat with a running server and rate every answer by a rule."""
    from thumbtune.rules import load_rule
    from thumbtune.simulate import SimulationError, Simulator, load_prompts, progress_printer, summary_lines

    try:
        judge = load_rule(rule)
        prompt_set = load_prompts(prompts)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    sim = Simulator(
        url,
        judge,
        users=users,
        thumbs=thumbs,
        noise=noise,
        choice=choice,
        temperature=temperature,
        max_tokens=max_tokens,
        prompts=prompt_set,
        api_key=api_key,
        seed=seed,
        on_rating=progress_printer(),
    )
    try:
        report = sim.run()
    except SimulationError as exc:
        typer.echo(f"simulate: {exc}", err=True)
        raise typer.Exit(2) from exc
    if log is not None:
        report.write_jsonl(log)
    for line in summary_lines(report):
        typer.echo(line)


@bench_app.command("serve")
def bench_serve(
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    requests_per_client: int = typer.Option(4, help="Requests each client sends per level."),
    max_tokens: int = typer.Option(64, help="Tokens per answer."),
) -> None:
    """thumbtune vs a naive one-at-a-time server vs the raw batched-decode ceiling, at 1/4/16 clients."""
    from thumbtune.bench_serve import run

    run(_settings(), out=out, requests_per_client=requests_per_client, max_tokens=max_tokens)


@bench_app.command("learn")
def bench_learn(
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    repeats: int = typer.Option(3, min=1, help="Runs of each contender (interleaved); medians are reported."),
    trl: bool = typer.Option(True, "--trl/--no-trl", help="Include TRL's GRPOTrainer (the bench extra)."),
) -> None:
    """PPO update throughput on 64 fixed rated answers: the learner vs the floor of any PPO update vs TRL."""
    from thumbtune.bench_learn import run

    run(_settings(), out=out, repeats=repeats, with_trl=trl)


@bench_app.command("ablate")
def bench_ablate(
    arm: list[str] = typer.Option(
        ..., help="Learner overrides of one arm, e.g. 'lam=0.95' or 'lam=1.0,kl_coef=0.3' ('' = defaults)."
    ),
    rule: str = typer.Option("concise", help=_RULE_HELP),
    versions: int = typer.Option(24, min=1, help="PPO updates (adapter versions) per arm."),
    batch_size: int = typer.Option(32, min=1, help="Rated answers per update."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the sampled answers and the evaluation."),
    eval_every: int = typer.Option(1_000_000, min=1, help="Evaluate every Nth version (always the last)."),
    samples_per_prompt: int = typer.Option(2, min=1, help="Answers per held-out prompt in an evaluation."),
    seed: int = typer.Option(1, help="Seed of the prompt draws and the evaluation."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Learner settings side by side on the same simulated users (no server): approval, KL, capability."""
    from thumbtune.bench_ablate import run

    try:
        run(
            _settings(),
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


@bench_app.command("kl-penalty")
def bench_kl_penalty(
    versions: list[str] = typer.Argument(..., help="Stored versions to measure, e.g. v10 v25 v40."),
    store: Path = typer.Option(..., help="The adapter store holding them (e.g. bench-out/loop/adapters)."),
    rule: str = typer.Option("concise", help=_RULE_HELP),
    answers: int = typer.Option(64, min=2, help="Answers sampled per version (training prompts)."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the sampled answers."),
    seed: int = typer.Option(1, help="Seed of the prompt draw and the sampling."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Where the reward's KL penalty falls: per-answer k1, k3 and exact KL sums vs the rule's approval."""
    from thumbtune.bench_kl import run

    try:
        run(
            _settings(),
            store,
            versions,
            rule=rule,
            answers=answers,
            max_tokens=max_tokens,
            seed=seed,
            out=out,
        )  # noqa: E501
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@bench_app.command("loop")
def bench_loop(
    rule: str = typer.Option("concise", help=_RULE_HELP),
    thumbs: int = typer.Option(1500, min=1, help="Ratings the simulated users send."),
    out: Path = typer.Option(Path("artifacts/bench-loop"), help="Where results.json and learning.png go."),
    url: str = typer.Option(None, help="Use a running server instead of starting the embedded system."),
    adapter_store: str = typer.Option(
        None, help="With --url: the store its learner writes (default the setting)."
    ),
    users: int = typer.Option(8, min=1, help="Concurrent simulated users."),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of flipping each rating."),
    choice: bool = typer.Option(
        False, "--choice", help="Users choose between two answers instead of thumbs."
    ),
    temperature: float = typer.Option(1.0, min=0.0, max=2.0, help="Sampling temperature of users and eval."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of users and eval."),
    samples_per_prompt: int = typer.Option(2, min=1, help="Answers sampled per held-out prompt per version."),
    eval_every: int = typer.Option(
        1, min=1, help="Evaluate every Nth version (always the base and the last)."
    ),
    seed: int = typer.Option(0, help="Seed of the users and the evaluation."),
) -> None:
    """The whole loop with simulated users: approval, KL, capability per version; results.json + plot."""
    from thumbtune.bench_loop import run

    try:
        run(
            _settings(),
            rule=rule,
            thumbs=thumbs,
            out=out,
            url=url,
            adapter_store=adapter_store,
            users=users,
            noise=noise,
            choice=choice,
            temperature=temperature,
            max_tokens=max_tokens,
            samples_per_prompt=samples_per_prompt,
            eval_every=eval_every,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


if __name__ == "__main__":
    app()
