"""Adapter versions written straight into a store, for the hot-swap tests, and reference log-probs.

A version here is a real PEFT adapter (peft's own save_pretrained) whose LoRA B matrices are random
with a chosen scale, so it measurably moves the tiny model's distribution; a learner version is the
same files plus the value head and learner state, which the server does not read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from thumbtune.core.base_model import fingerprint
from thumbtune.core.contract import ADAPTER_WEIGHTS, AdapterManifest
from thumbtune.core.lora import lora_config
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore


class VersionWriter:
    """Writes versions v1, v2, ... of a LoRA over the tiny model into a store."""

    def __init__(self, model_dir: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        self.fingerprint = fingerprint(base)
        """The tiny base's fingerprint: what the server computes when it loads the same directory."""
        with (
            torch.random.fork_rng()
        ):  # LoRA A is random: seeded, so a version's KL does not hang on test order
            torch.manual_seed(0)
            self.model = get_peft_model(base, lora_config(Settings()), adapter_name="default")

    def write(
        self,
        store: LocalAdapterStore,
        scale: float,
        seed: int,
        *,
        base_fingerprint: str | None = None,
        edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> str:
        """A new version, LoRA B ~ N(0, scale^2); ``edit`` may change the tensors before they are hashed."""
        version = store.next_version()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)

        def files(tmp: Path) -> None:
            self.model.save_pretrained(str(tmp))
            (tmp / "README.md").unlink(missing_ok=True)
            if edit is not None:
                tensors = load_file(str(tmp / ADAPTER_WEIGHTS))
                edit(tensors)
                save_file(tensors, str(tmp / ADAPTER_WEIGHTS))

        manifest = AdapterManifest(
            version=version,
            parent=None,
            base_model="thumbtune-tests/tiny-llama",
            base_fingerprint=base_fingerprint or self.fingerprint,
            created_at=time.time(),
            event_count=0,
        )
        store.write_version(version, files, manifest)
        return version


def corrupt(store: LocalAdapterStore, version: str) -> None:
    """Flip one byte of the stored weights (after the manifest hashed them)."""
    path = store.path(version) / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def reference_logprobs(
    model_dir: Path, version_dir: Path | None, prompt: list[int], answer: list[int]
) -> list[float]:
    """log pi(answer_t | prompt, answer_<t) from a fresh base + ``PeftModel.from_pretrained(version_dir)``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if version_dir is not None:
        model = PeftModel.from_pretrained(model, str(version_dir))
    model.eval()
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(answer).unsqueeze(1)).squeeze(1).tolist()
