"""The `thumbtune` command: one subcommand per process or tool.

The subcommands that load a model (serve, learn, model, up) import their modules when they run: the lazy
imports below keep `thumbtune --help`, `thumbtune broker` and `thumbtune simulate` from importing torch.
`thumbtune bench ...` exists when the benchmarks are at hand (a checkout of the repository, see
`add_benchmarks`): they sit above the product and are not shipped with it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import typer

from thumbtune.cli.broker import run_broker
from thumbtune.cli.configure import configure
from thumbtune.cli.rules import RULE_HELP, load_rule
from thumbtune.cli.simulate import SimulationError, Simulator, load_prompts, progress_printer, summary_lines
from thumbtune.core.malloc import freeze_startup_heap, tune_malloc, use_allocator

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="thumbtune: a chat model that gets better from its users' thumbs, live.",
)

REPOSITORY = Path(__file__).resolve().parents[2]
"""The checkout this package runs from, when it is installed editable (`make run`, `make test`)."""


@app.command()
def broker(port: int = typer.Option(None, help="Port (default THUMBTUNE_BROKER_PORT, 9092).")) -> None:
    """Run the embedded Tansu Kafka-protocol broker (memory only) and create thumbtune's topics."""
    settings = configure(broker_port=port)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its own readiness probes fail by design at start
    run_broker(settings)


@app.command()
def up() -> None:
    """Start the whole system (embedded broker unless an external Kafka is configured, then the server)."""
    from thumbtune.cli.up import up as run_up  # lazy: start-up time (the learner's settings import torch)

    raise typer.Exit(run_up(configure()))


@app.command()
def vllm() -> None:
    """Run the vLLM server thumbtune generates through with THUMBTUNE_ENGINE=vllm (in the foreground)."""
    from thumbtune.cli.vllm import VLLMNotInstalled, vllm_command, vllm_python  # lazy: imports the model code

    settings = configure()
    try:
        argv, env = vllm_command(settings, vllm_python(settings))
    except VLLMNotInstalled as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo("thumbtune vllm: " + " ".join(argv), err=True)
    os.execve(argv[0], argv, env)  # vLLM replaces this process: its signals, its exit code


@app.command()
def model() -> None:
    """Print which model THUMBTUNE_MODEL resolves to and warm its cache (dequantizing the GGUF once)."""
    from thumbtune.core.base_model import load_base, resolve  # lazy: start-up time (torch)

    settings = configure()
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
    settings = configure(host=host, port=port)
    use_allocator(settings.allocator)  # may start this command again on jemalloc: before anything big loads

    import uvicorn  # lazy: start-up time (the server imports torch)

    from service.app import create_app  # lazy: as above

    tune_malloc(settings.malloc_mmap_threshold, settings.malloc_arena_max)
    uvicorn.run(
        create_app(settings, on_started=freeze_startup_heap),
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
    from learner.config import LearnerSettings  # lazy: start-up time (torch)

    settings = configure()
    if from_file is None:
        if once:
            raise typer.BadParameter(
                "--once needs --from-file (the Kafka learner runs until stopped)", param_hint="--once"
            )
        from learner.process import run_learner  # lazy: start-up time (torch)

        raise typer.Exit(run_learner(settings, LearnerSettings()))
    from learner.replay import run_from_file  # lazy: start-up time (torch)

    if not once:
        raise typer.BadParameter("following a growing file is not supported: add --once", param_hint="--once")
    versions = run_from_file(settings, LearnerSettings(), from_file, once=once)
    typer.echo("versions written: " + (" ".join(versions) or "none (no new events)"))


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of a running thumbtune server."),
    users: int = typer.Option(8, min=1, help="Concurrent simulated users."),
    thumbs: int = typer.Option(
        200, min=1, help="Ratings to send in all (a choice between two answers, or a ranking, is one)."
    ),
    rule: str = typer.Option("concise", help=RULE_HELP),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of flipping each rating."),
    choice: bool = typer.Option(
        False, "--choice", help="Ask for two answers (n=2) and choose the better one."
    ),
    rank: int = typer.Option(
        None, "--rank", min=2, max=4, help="Ask for K answers (n=K) and rank them, best first, by the rule."
    ),
    temperature: float = typer.Option(1.0, min=0.0, max=2.0, help="Sampling temperature of the requests."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of the requests."),
    prompts: str = typer.Option("train", help="Bundled prompt set (train, heldout) or a file, one per line."),
    api_key: str = typer.Option(
        None,
        envvar="THUMBTUNE_API_KEY",
        help="Bearer key when the server has keys; several, comma-separated, give the users one each "
        "(round-robin), so each counts as its own rater.",
    ),
    seed: int = typer.Option(0, help="Seed of the prompt choice and the noise."),
    think_s: float = typer.Option(
        0.0, min=0.0, help="Seconds each user waits after a rating before the next question."
    ),
    log: Path = typer.Option(None, help="Write every rating as JSON lines here."),
    population: int = typer.Option(
        None,
        min=1,
        help="Send each request as one of this many users (the `user` field, drawn at random), so a "
        "canary's per-user share sees them; default none (every request is anonymous: it stays on live).",
    ),
) -> None:
    """Simulated users: chat with a running server and rate every answer by a rule."""
    try:
        judge = load_rule(rule)
        prompt_set = load_prompts(prompts)
        if choice and rank:
            raise ValueError("--choice and --rank are two kinds of rating: give one")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    sim = Simulator(
        url,
        judge,
        users=users,
        thumbs=thumbs,
        noise=noise,
        choice=choice,
        rank=rank,
        temperature=temperature,
        max_tokens=max_tokens,
        prompts=prompt_set,
        api_key=api_key.split(",") if api_key and "," in api_key else api_key,
        seed=seed,
        think_s=think_s,
        population=population,
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


def add_benchmarks(app: typer.Typer, repository: Path) -> bool:
    """Register `thumbtune bench` from ``<repository>/benchmarks/`` when the package runs from a checkout;
    True if it did.

    The benchmarks import the whole product (layers: benchmarks > thumbtune.cli > ...), so the command
    line must not import them; they are found here by path and loaded by name, once, at start-up. Without
    a checkout (a wheel, an image) `thumbtune bench` says where to get them.
    """
    if (repository / "benchmarks" / "cli.py").is_file():
        if str(repository) not in sys.path:
            sys.path.append(str(repository))
        app.add_typer(importlib.import_module("benchmarks.cli").app, name="bench")
        return True

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def bench() -> None:
        """Benchmarks (from a checkout of the repository only)."""
        typer.echo(
            "thumbtune bench: the benchmarks are not installed with thumbtune; run them from a checkout "
            "of the repository (`make install`, then .venv/bin/thumbtune bench ...)",
            err=True,
        )
        raise typer.Exit(2)

    return False


add_benchmarks(app, REPOSITORY)

if __name__ == "__main__":
    app()
