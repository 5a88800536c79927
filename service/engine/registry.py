"""Which LoRA adapter versions the served model holds, which one is live, and per-row routing.

All versions live inside one peft model over one copy of the base weights, each under its
own immutable name (the version, e.g. ``v3``). ``base`` means the adapter switched off.
The engine thread is the only one that runs the model; it asks this registry how to route
a batch (one adapter: activate it; several: peft's per-row ``adapter_names``).

Life of a version: `load` (engine thread) puts it into the peft model *staged*: present, not
servable, not collectable, so checks can probe it. `publish` makes it servable
(``thumbtune@vN``), `set_live` makes it what ``thumbtune`` means for sequences admitted from
then on. Sequences keep the version they were bound to; `collect` (engine thread, between
steps) deletes every version that is neither live, ``v0``, staged, in use by a waiting or
running sequence, nor resolved by a request in the last `RESOLVE_GRACE_S` seconds (a request
resolves its version before it reaches the engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from service import metrics
from thumbtune.core.contract import ADAPTER_OFF, BASE_VERSION
from thumbtune.core.lora import lora_config
from thumbtune.core.malloc import release_freed_memory
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

BASE = ADAPTER_OFF
"""The name of the adapter switched off (a request's ``model: base``, an event's ``adapter_version``)."""
PEFT_BASE_ROW = "__base__"
"""peft's name for a row with the adapter off in a mixed batch (``adapter_names``)."""
_PEFT_LOAD = threading.Lock()
"""peft's low_cpu_mem_usage loading swaps ``nn.Module.register_parameter`` process-wide while it runs, so two
engines in one process (replicas in a test, say) must not insert adapters at the same moment."""
RESOLVE_GRACE_S = 10.0
"""A version a request resolved this recently is not unloaded: the request may not have reached the engine."""


def with_empty_adapter(base_model: nn.Module, settings: Settings) -> PeftModel:
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
        """Servable versions, in the order they were published."""
        self.canary: str | None = None
        """The version a share of users gets instead of the live one (`service/canary/assignment.py`)."""
        self.canary_share = 0.0
        self._staged: set[str] = set()
        self._resolved_at: dict[str, float] = {}
        self._off: bool | None = None
        """Whether the LoRA layers are switched off (None: not known, after a load or delete)."""
        self.in_use_elsewhere: Callable[[], set[str]] | None = None
        """Versions requests use outside the engine that collects (an engine generating elsewhere, vLLM)."""
        self.on_unload: Callable[[str], None] | None = None
        """Called with each version unloaded here (that engine unloads it too)."""
        metrics.ACTIVE_ADAPTER.labels(live).set(1)

    def resolve(self, requested: str) -> str:
        """'' -> the live version; 'base' and loaded versions -> themselves; else UnknownAdapter."""
        with self._lock:
            name = self.live if requested == "" else requested
            if name == BASE:
                return BASE
            if name in self.loaded:
                self._resolved_at[name] = time.monotonic()
                return name
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

    def present(self) -> list[str]:
        """Every version inside the peft model, staged ones included."""
        return [name for name in self.model.peft_config if name != BASE]

    # --- changing what is loaded and live (load/unload/collect: engine thread only) ----------------

    def load(self, version: str, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """Insert a version's LoRA modules and weights, staged (engine thread; weights already checked)."""
        with self._lock:
            self._staged.add(version)
        if version in self.model.peft_config:
            return
        try:
            config = PeftConfig.from_pretrained(str(directory))
            config.inference_mode = True
            with _PEFT_LOAD:
                self.model.add_adapter(version, config, low_cpu_mem_usage=True)
                result = set_peft_model_state_dict(
                    self.model, weights, adapter_name=version, low_cpu_mem_usage=True
                )
            missing = [k for k in result.missing_keys if f".{version}." in k and "lora_" in k]
            if missing:
                raise ValueError(f"{len(missing)} LoRA weights missing from the file, e.g. {missing[0]}")
        except BaseException:
            self.unstage(version)
            self._delete(version)
            raise
        self.model.eval()
        self._off = None  # new LoRA layers start switched on, whatever the others are

    def stage(self, version: str) -> None:
        """Keep a loaded version loaded while a check runs on it (collect leaves staged versions alone)."""
        with self._lock:
            self._staged.add(version)

    def unstage(self, version: str) -> None:
        """A staged version's checks are over: collect may unload it unless it was published."""
        with self._lock:
            self._staged.discard(version)

    def publish(self, version: str) -> None:
        """Make a loaded version servable under ``thumbtune@<version>``."""
        if version not in self.model.peft_config:
            raise UnknownAdapter(version)
        with self._lock:
            if version not in self.loaded:
                self.loaded.append(version)
            self._staged.discard(version)

    def set_canary(self, version: str | None, share: float = 0.0) -> None:
        """Serve ``version`` (published) to ``share`` of the users, or no canary (None)."""
        with self._lock:
            if version is not None and version not in self.loaded:
                raise UnknownAdapter(version)
            if self.canary is not None:
                self._resolved_at[self.canary] = time.monotonic()
            self.canary, self.canary_share = version, share if version is not None else 0.0

    def withdraw(self, version: str) -> None:
        """A refused version is no longer servable by name; running sequences finish, collect unloads it."""
        with self._lock:
            if version == self.live:
                raise ValueError(f"{version} is live: make another version live before withdrawing it")
            if version in self.loaded:
                self.loaded.remove(version)
            self._resolved_at.pop(version, None)
            if self.canary == version:
                self.canary, self.canary_share = None, 0.0

    def set_live(self, version: str) -> str:
        """Make a published version live; returns the previous live version."""
        with self._lock:
            if version not in self.loaded:
                raise UnknownAdapter(version)
            previous, self.live = self.live, version
            self._resolved_at[previous] = time.monotonic()  # requests may have resolved it a moment ago
        metrics.ACTIVE_ADAPTER.labels(previous).set(0)
        metrics.ACTIVE_ADAPTER.labels(version).set(1)
        return previous

    def retiring(self) -> bool:
        """True while some version waits to be unloaded (the idle engine then wakes up to collect)."""
        with self._lock:
            keep = {self.live, BASE_VERSION, self.canary} | self._staged
            return any(v not in keep for v in self.present())

    def collect(self, in_use: set[str]) -> list[str]:
        """Unload versions nobody needs any more (engine thread, between steps); returns their names."""
        now = time.monotonic()
        # asked before taking the lock (that engine takes its own lock, then this one, to bind a request);
        # a request bound since then resolved its version within RESOLVE_GRACE_S, which keeps it
        elsewhere = self.in_use_elsewhere() if self.in_use_elsewhere is not None else set()
        with self._lock:
            keep = {self.live, BASE_VERSION, self.canary} | self._staged | in_use | elsewhere
            keep |= {v for v, at in self._resolved_at.items() if now - at < RESOLVE_GRACE_S}
            retired = [v for v in self.present() if v not in keep]
            for version in retired:
                if version in self.loaded:
                    self.loaded.remove(version)
                self._resolved_at.pop(version, None)
        for version in retired:
            self._delete(version)
            log.info("unloaded adapter %s (no request uses it)", version)
        if retired:  # glibc keeps what they freed; bench soak saw the server ~180 MB larger for good after a
            release_freed_memory()  # burst of loads (docs/BENCHMARKS.md, "Soak")
        return retired

    def _delete(self, version: str) -> None:
        if version not in self.model.peft_config:
            return
        if self.model.active_adapter == version:
            self.model.set_adapter(self.live if self.live in self.model.peft_config else BASE_VERSION)
        self.model.delete_adapter(version)
        self._off = None
        if self.on_unload is not None:
            self.on_unload(version)

    # --- routing a batch (engine thread) ------------------------------------------------------------

    @contextmanager
    def routing(self, names: list[str]) -> Iterator[dict]:
        """Set the model up for a batch whose rows use `names`; yields extra forward kwargs.

        v0's rows run with the adapter off: its LoRA B is zero, so it computes the base exactly, and skipping
        its LoRA matmuls is what makes a fresh deployment's single stream as fast as the bare model.
        """
        names = [BASE if n == BASE_VERSION else n for n in names]
        distinct = set(names)
        self._adapters_off(distinct == {BASE})
        if len(distinct) == 1 and distinct != {BASE}:
            (name,) = distinct
            if self.model.active_adapter != name:
                self.model.set_adapter(name)
        if len(distinct) == 1:
            yield {}
        else:
            yield {"adapter_names": [PEFT_BASE_ROW if n == BASE else n for n in names]}

    def _adapters_off(self, off: bool) -> None:
        """Switch every LoRA layer off (the base) or on, only when that changes: peft's disable_adapter()
        visits every module on the way in and out, ~22 ms a decode step on the embedded model, which a batch
        on the base would otherwise pay at every step. peft's own flag follows, so its context manager
        (``with model.disable_adapter()``) stays consistent with this state."""
        if off == self._off:
            return
        if off:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
        for layer in self.model.modules():
            if isinstance(layer, LoraLayer):
                # Off: the wrapped module's own forward, which is what peft's forward computes when off
                # (base_layer(x)), without its per-call bookkeeping: ~5.7 us a layer, 0.7 ms a decode step on
                # the embedded model (120 layers: 11.4 -> 10.7 ms for their calls alone, AMD EPYC, 2 threads).
                if off:
                    layer.forward = layer.base_layer.forward
                else:
                    layer.__dict__.pop("forward", None)
        self.model._adapters_disabled = self._off = off
