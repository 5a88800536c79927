"""What a new adapter version must pass before it may go live.

File checks (`check_files`, any thread, CPU only, before the model is touched), in this order:
  fingerprint  the version was trained on the base this server serves (manifest and announcement),
  sha256       the announcement's hashes are the manifest's, and every file matches them,
  shape        every tensor is a LoRA A or B matrix of a module the base has, shaped for it, float,
  nonfinite    every weight is finite.
Anything unreadable is ``load_error``.

The KL probe (`probe_logprobs`, engine thread) teacher-forces a fixed chat prompt with a fixed
answer through one adapter and returns the next-token log-distributions over the answer
positions. `mean_kl` turns two such sets into the mean per-token KL(p || q) in nats
(thumbtune/core/divergence.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from service.engine.registry import AdapterRegistry
from thumbtune.core.chat import encode_chat, user_turn
from thumbtune.core.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterAnnouncement
from thumbtune.core.divergence import exact_kl
from thumbtune.core.store import AdapterStore

REASONS = (
    "sha256",
    "fingerprint",
    "shape",
    "nonfinite",
    "kl_live",
    "kl_base",
    "load_error",
    "capability",
    "proof",
    "operator",
    "canary",
)
"""Why a version was refused: the check it failed (``proof``: the engine generating elsewhere, vLLM, did not
serve its weights after loading them; service/engine/vllm.py), ``operator`` (POST /admin/adapters/refuse)
or ``canary`` (the canary judge: users liked it less than live)."""
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PROBES: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a haiku about the sea.", "Waves fold into foam, the tide keeps its old promise."),
    ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes."),
    ("Give me one tip for better sleep.", "Keep a regular bedtime, even on weekends."),
    ("What is a black hole?", "A region where gravity is so strong that not even light escapes."),
    ("Recommend a good book.", "Try The Hobbit by J. R. R. Tolkien."),
    ("Translate 'thank you' into Spanish.", "In Spanish, 'thank you' is 'gracias'."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue."),
)
"""(user prompt, answer) pairs: everyday chat, the distribution a version must not wreck."""


class Refused(Exception):
    """A version failed a check. ``retry``: the cause may go away (the version is not in the store yet)."""

    def __init__(self, reason: str, message: str, retry: bool = False) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.retry = reason, message, retry


@dataclass
class CheckedFiles:
    version: str
    directory: Path
    weights: dict[str, torch.Tensor]


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear module, by the path peft's saved keys use."""
    return {
        name: (int(module.in_features), int(module.out_features))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    }


def check_files(
    store: AdapterStore,
    version: str,
    fingerprint: str,
    shapes: dict[str, tuple[int, int]],
    announcement: AdapterAnnouncement | None = None,
) -> CheckedFiles:
    """Every check that needs only the files; returns the weights (on CPU) for loading. Raises `Refused`."""
    try:
        manifest = store.read_manifest(version)
    except FileNotFoundError as exc:
        raise Refused("load_error", f"not in the adapter store {store}: {exc}", retry=True) from exc
    except ValueError as exc:
        raise Refused("load_error", f"manifest.json is not a valid manifest: {exc}") from exc
    claims = [("manifest", manifest.base_fingerprint)]
    if announcement is not None:
        claims.append(("announcement", announcement.base_fingerprint))
    for source, fp in claims:
        if fp != fingerprint:
            raise Refused(
                "fingerprint",
                f"the {source} says it was trained on base {manifest.base_model} "
                f"(fingerprint {fp}); this server serves fingerprint {fingerprint}",
            )
    if announcement is not None and announcement.sha256 != manifest.sha256:
        raise Refused("sha256", "the announcement's sha256 differ from the stored manifest's")
    problems = store.verify(version)
    if problems:
        raise Refused("sha256", "; ".join(problems))
    directory = store.directory(version)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise Refused("load_error", f"cannot read {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise Refused("shape", f"{ADAPTER_CONFIG} is a {config.get('peft_type')!r} adapter, not LORA")
    check_shapes(weights, shapes, int(config.get("r", 0)), bool(config.get("rank_pattern")))
    for name, tensor in weights.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise Refused("nonfinite", f"{bad} of {tensor.numel()} values of {name} are NaN or infinite")
    return CheckedFiles(version, directory, weights)


def check_shapes(
    weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], r: int, has_rank_pattern: bool
) -> None:
    """LoRA A is [r, in], B is [out, r], for modules the base has; floats only. Raises `Refused`."""
    if not weights:
        raise Refused("shape", f"{ADAPTER_WEIGHTS} holds no tensors")
    ranks: dict[str, dict[str, int]] = {}
    for name, tensor in weights.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise Refused("shape", f"unexpected tensor {name} (only LoRA A/B matrices are served)")
        module, which = match["module"], match["which"]
        if module not in shapes:
            raise Refused("shape", f"{name}: the base model has no linear module {module}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise Refused("shape", f"{name} is {tensor.dtype}; expected float32, float16 or bfloat16")
        if tensor.dim() != 2:
            raise Refused("shape", f"{name} has shape {tuple(tensor.shape)}; expected a matrix")
        fan_in, fan_out = shapes[module]
        rows, cols = tensor.shape
        rank, size, expected = (rows, cols, fan_in) if which == "A" else (cols, rows, fan_out)
        if size != expected:
            raise Refused("shape", f"{name} has shape {(rows, cols)} but {module} is {fan_in} -> {fan_out}")
        if not has_rank_pattern and rank != r:
            raise Refused("shape", f"{name} has rank {rank} but {ADAPTER_CONFIG} says r = {r}")
        ranks.setdefault(module, {})[which] = rank
    for module, pair in ranks.items():
        if set(pair) != {"A", "B"} or pair["A"] != pair["B"]:
            raise Refused("shape", f"{module}: LoRA A and B do not pair up ({pair})")


@dataclass
class ProbeRow:
    """One probe prompt + its answer as token ids; the last ``keep`` positions predict answer tokens."""

    input_ids: torch.Tensor
    keep: int


def build_probes(tokenizer, count: int) -> list[ProbeRow]:
    """The first ``count`` of `PROBES`, chat-templated as served (default system prompt included)."""
    rows = []
    for prompt, answer in PROBES[:count]:
        ids = encode_chat(tokenizer, user_turn(prompt))
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        # the last prompt position predicts the first answer token, the last answer position what follows it
        rows.append(ProbeRow(torch.tensor([ids + answer_ids]), keep=len(answer_ids) + 1))
    return rows


def probe_logprobs(registry: AdapterRegistry, row: ProbeRow, name: str) -> torch.Tensor:
    """log-softmax [keep, vocab] of one probe row under one adapter ('base' = off). Engine thread only.

    One row per call on purpose: on a CPU one forward of the real model over a ~50-token row costs
    a few decode steps, and every running sequence waits for it; the caller runs one call per
    (prompt, adapter) as separate engine commands so decode steps go on in between.
    """
    with registry.routing([name]) as extra:
        out = registry.model(input_ids=row.input_ids, logits_to_keep=row.keep, use_cache=False, **extra)
    logits = out.logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def mean_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) = sum_v p(v) (log p(v) - log q(v)), in nats."""
    return float(exact_kl(p_logp, q_logp).mean())
