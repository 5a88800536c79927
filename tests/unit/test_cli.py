"""The `thumbtune` command: `thumbtune bench` from a checkout, and a clear word without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.support import ROOT
from thumbtune.cli.main import add_benchmarks, app


def test_bench_is_a_command_group_from_a_checkout() -> None:
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for name in ("serve", "learn", "ablate", "loop", "kl-penalty"):
        assert name in result.output


def test_without_the_benchmarks_bench_says_where_to_get_them(tmp_path: Path) -> None:
    installed = typer.Typer()
    installed.command()(lambda: None)  # a wheel's `thumbtune` has its other commands
    assert add_benchmarks(installed, tmp_path) is False
    result = CliRunner().invoke(installed, ["bench", "loop", "--thumbs", "10"])
    assert result.exit_code == 2 and "from a checkout" in result.output
    assert add_benchmarks(typer.Typer(), ROOT) is True


def test_on_topic_counts_the_prompts_content_words_in_the_answer() -> None:
    from thumbtune.cli.rules import content_words, load_rule

    on_topic = load_rule("on-topic")
    prompt = "How do I keep guacamole from turning brown overnight?"
    assert content_words(prompt) == {"keep", "guacamole", "turning", "brown", "overnight"}
    assert on_topic(prompt, "Press plastic wrap on the guacamole to keep it from turning brown.")
    assert not on_topic(prompt, "Guacamole turns brown: what would you like to know about that?")  # 2 words
    assert not on_topic(prompt, "")


def test_not_inverts_a_rule_thumbs_and_scores_alike() -> None:
    from thumbtune.cli.rules import load_rule

    verbose = load_rule("not:concise")
    assert verbose("q", " ".join(["word"] * 31)) is True
    assert verbose("q", "Short and to the point.") is False
    assert load_rule("not:not:concise")("q", "Short.") is True
    shorter = load_rule("not:tests.support.loop_rules:shorter")
    assert shorter("q", "abc") == 1 - 1 / 4
    with pytest.raises(ValueError, match="unknown rule"):
        load_rule("not:terse")
