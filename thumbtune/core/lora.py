"""The LoRA adapter's shape, which the server and the learner must agree on (THUMBTUNE_LORA_*)."""

from __future__ import annotations

from peft import LoraConfig

from thumbtune.core.settings import Settings


def lora_config(settings: Settings) -> LoraConfig:
    """The LoRA every version has: rank, alpha and target modules from the settings, no dropout, no bias."""
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
