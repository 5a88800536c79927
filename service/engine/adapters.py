"""Which LoRA adapter versions the served model holds, which one is live, and per-row routing.

All versions live inside one peft model over one copy of the base weights, each under its
own immutable name (the version, e.g. ``v3``). ``base`` means the adapter switched off.
The engine thread is the only one that runs the model; it asks this registry how to route
a batch (one adapter: activate it; several: peft's per-row ``adapter_names``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from peft import LoraConfig, PeftModel, get_peft_model

from service import metrics
from thumbtune.contract import BASE_VERSION
from thumbtune.settings import Settings

BASE = "base"


def lora_config(settings: Settings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def with_empty_adapter(base_model, settings: Settings) -> PeftModel:  # noqa: ANN001
    """Wrap the base in a zero-initialised LoRA (B = 0) named v0: outputs equal the base's."""
    model = get_peft_model(base_model, lora_config(settings), adapter_name=BASE_VERSION)
    model.eval()
    return model


class UnknownAdapter(LookupError):
    pass


class AdapterRegistry:
    def __init__(self, model: PeftModel, live: str = BASE_VERSION) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.live = live
        self.loaded: list[str] = [live]
        metrics.ACTIVE_ADAPTER.labels(live).set(1)

    def resolve(self, requested: str) -> str:
        """'' -> the live version; 'base' and loaded versions -> themselves; else UnknownAdapter."""
        with self._lock:
            if requested == "":
                return self.live
            if requested == BASE or requested in self.loaded:
                return requested
        raise UnknownAdapter(requested)

    def acquire(self, requested: str) -> str:
        """Bind a sequence to a version at admission; it keeps that version to its end."""
        try:
            return self.resolve(requested)
        except UnknownAdapter:
            return self.resolve("")

    def versions(self) -> list[str]:
        with self._lock:
            return list(self.loaded)

    @contextmanager
    def routing(self, names: list[str]) -> Iterator[dict]:
        """Set the model up for a batch whose rows use `names`; yields extra forward kwargs."""
        distinct = set(names)
        if distinct == {BASE}:
            with self.model.disable_adapter():
                yield {}
        elif len(distinct) == 1:
            (name,) = distinct
            if self.model.active_adapter != name:
                self.model.set_adapter(name)
            yield {}
        else:
            yield {"adapter_names": ["__base__" if n == BASE else n for n in names]}

    def collect(self, in_use: set[str]) -> None:
        """Called by the engine between steps; unloading retired versions hooks in here."""
