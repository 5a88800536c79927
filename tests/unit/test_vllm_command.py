"""`thumbtune vllm` / `thumbtune up` with THUMBTUNE_ENGINE=vllm: the vLLM server they start, and a clear error
without vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from thumbtune.cli.vllm import VLLMNotInstalled, vllm_command, vllm_python
from thumbtune.core.settings import Settings


def test_the_vllm_server_gets_what_the_loop_needs(tiny_model_dir: Path) -> None:
    settings = Settings(
        model=str(tiny_model_dir),
        lora_r=16,
        vllm_port=8123,
        vllm_max_loras=3,
        max_context=512,
        dtype="bfloat16",
    )
    argv, env = vllm_command(settings, "/opt/vllm/bin/python")
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = {
        name: argv[argv.index(name) + 1]
        for name in argv
        if name.startswith("--") and name not in ("--enable-lora", "--enforce-eager")
    }
    assert flags["--model"] == str(tiny_model_dir)  # the same local copy the server loads: nothing downloads
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--max-lora-rank"] == "16" and flags["--max-loras"] == "3"
    assert flags["--logprobs-mode"] == "processed_logprobs"  # log-probs after temperature (the contract)
    assert flags["--dtype"] == "bfloat16" and flags["--max-model-len"] == "512"
    assert "--enable-lora" in argv and argv[-1] == "--enforce-eager"  # THUMBTUNE_VLLM_ARGS' default
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_SERVER_DEV_MODE"] == "1"


def test_extra_arguments_are_split_like_a_shell(tiny_model_dir: Path) -> None:
    settings = Settings(
        model=str(tiny_model_dir), vllm_args="--gpu-memory-utilization 0.8 --served-model-name 'a b'"
    )
    argv, _ = vllm_command(settings, "python")
    assert argv[-4:] == ["--gpu-memory-utilization", "0.8", "--served-model-name", "a b"]


def test_without_vllm_the_error_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(VLLMNotInstalled, match="make install-vllm") as info:
        vllm_python(Settings(vllm_python=str(tmp_path / "missing" / "python")))
    assert "does not exist" in str(info.value) and "THUMBTUNE_VLLM_URL" in str(info.value)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named vllm' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(VLLMNotInstalled, match="No module named vllm"):
        vllm_python(Settings(vllm_python=str(fake)))
