"""The `thumbtune` command: one subcommand per process or tool."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from thumbtune.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="thumbtune: a chat model that gets better from its users' thumbs, live.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")


def _settings(**overrides: object) -> Settings:
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    """Print which model THUMBTUNE_MODEL resolves to and warm its cache (dequantizes the embedded GGUF once)."""
    from thumbtune.base_model import load_base, resolve

    settings = _settings()
    before = resolve(settings)
    typer.echo(f"THUMBTUNE_MODEL={settings.model!r} -> {before.model_id} ({before.source}: {before.path})")
    loaded = load_base(settings)
    params = sum(p.numel() for p in loaded.model.parameters())
    typer.echo(f"loaded {loaded.model_id} from {loaded.path}: {params / 1e6:.1f}M parameters, "
               f"fingerprint {loaded.fingerprint}")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default THUMBTUNE_HOST)."),
    port: int = typer.Option(None, help="Port (default THUMBTUNE_PORT)."),
) -> None:
    """Run the OpenAI-compatible chat server."""
    import uvicorn

    from service.app import create_app

    settings = _settings(host=host, port=port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


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
            raise typer.BadParameter("--once needs --from-file (the Kafka learner runs until stopped)",
                                     param_hint="--once")
        from learner.consumer import run_learner

        raise typer.Exit(run_learner(settings, LearnerSettings()))
    from learner.replay import run_from_file

    if not once:
        raise typer.BadParameter("following a growing file is not supported: add --once", param_hint="--once")
    versions = run_from_file(settings, LearnerSettings(), from_file, once=once)
    typer.echo("versions written: " + (" ".join(versions) or "none (no new events)"))


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


if __name__ == "__main__":
    app()
