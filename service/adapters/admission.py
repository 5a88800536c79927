"""Admission of a version into this replica: its files checked, its weights loaded, the KL probe.

`Admission.admit` runs, for the manager and under its lock:
  1. `check_files` in the calling thread (fingerprint, sha256, shapes, finite; CPU only),
  2. one ``engine.call``: insert the LoRA modules and weights, staged (not servable yet),
  3. the KL probe: one ``engine.call`` per (probe prompt, adapter), so decode steps go on in between;
     the live version's and the base's log-probs are cached, so usually only the new rows run,
  4. install into the engine (with vLLM: load it there under its immutable name and prove it is served),
     then publish (``thumbtune@vN`` resolves),
  5. the capability gate (service/adapters/capability.py; automatic steps only, like KL(new || live)):
     checkable prompts answered greedily through the engine, against live's answers; a refused
     version is withdrawn again.
Making it live is the manager's call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from service import metrics
from service.adapters.capability import CapabilityGate
from service.adapters.checks import Refused, build_probes, check_files, mean_kl, module_shapes, probe_logprobs
from service.engine.engine import Engine, ProofFailed
from service.engine.registry import BASE, AdapterRegistry, UnknownAdapter
from thumbtune.core.base_model import LoadedBase
from thumbtune.core.contract import BASE_VERSION, AdapterAnnouncement
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore

T = TypeVar("T")
COMMAND_TIMEOUT_S = 120.0


class EngineUnavailable(RuntimeError):
    """The engine is stopping (or stopped): nothing can be loaded now."""


class Admission:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: AdapterRegistry,
        base: LoadedBase,
        store: AdapterStore,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.store = store
        self.fingerprint = base.fingerprint
        self._shapes = module_shapes(registry.model)
        self.probes = build_probes(base.tokenizer, settings.adapter_probe_prompts)
        self.gate = (
            CapabilityGate(settings, engine, base.tokenizer) if settings.adapter_capability_prompts else None
        )
        self._probe_cache: dict[str, torch.Tensor] = {}
        """Probe log-probs [positions, vocab] of 'base' and of the live version (the manager's lock)."""

    def admit(
        self, version: str, live: str, announcement: AdapterAnnouncement | None, enforce_kl_live: bool
    ) -> tuple[float | None, float | None, int | None] | None:
        """Checks + load + KL probe against ``live`` and the base + the capability gate: leaves the version
        published (servable) and returns (KL(new || live), KL(new || base), capability prompts answered
        right), None where there are no probe prompts / no gate; or raises `Refused`. Returns None when
        there was nothing to check: v0, or a version still loaded (it passed before; resolving it keeps it
        a while longer)."""
        if version == BASE_VERSION:
            return None  # the empty adapter, always loaded
        try:
            self.registry.resolve(version)
            return None
        except UnknownAdapter:
            pass
        checked = check_files(self.store, version, self.fingerprint, self._shapes, announcement)
        self._call(
            lambda: self.registry.load(version, checked.directory, checked.weights), "peft could not load it"
        )
        kl_live = kl_base = None
        try:
            if self.probes:
                kl_live, kl_base = self._kl(version, live)
                metrics.ADAPTER_PROBE_KL.labels("live").set(kl_live)
                metrics.ADAPTER_PROBE_KL.labels("base").set(kl_base)
                s = self.settings
                if enforce_kl_live and kl_live > s.adapter_max_kl_live:
                    raise Refused(
                        "kl_live",
                        f"KL(new || live {live}) = {kl_live:.4f} nats/token on the "
                        f"probe prompts > THUMBTUNE_ADAPTER_MAX_KL_LIVE = "
                        f"{s.adapter_max_kl_live}",
                    )
                if kl_base > s.adapter_max_kl_base:
                    raise Refused(
                        "kl_base",
                        f"KL(new || base) = {kl_base:.4f} nats/token on the probe "
                        f"prompts > THUMBTUNE_ADAPTER_MAX_KL_BASE = "
                        f"{s.adapter_max_kl_base}",
                    )
            try:
                self.engine.install(version, checked.directory)
            except ProofFailed as exc:
                raise Refused("proof", str(exc)) from exc
            self.registry.publish(version)
        finally:
            self.registry.unstage(version)  # refused: the engine unloads it at its next step
        capability = None
        if self.gate is not None and enforce_kl_live:  # automatic steps, like KL(new || live): an operator's
            # pin or rollback, and start-up, are moves away from live on purpose. Answered through the engine
            # like a request, so it must be published
            self.registry.stage(version)  # kept loaded (the engine collects idle versions) until the manager
            try:  # has made it live or the canary and unstages it
                capability, _ = self.gate.check(version, live)
            except Refused:
                self.registry.unstage(version)
                self.registry.withdraw(version)
                raise
        return kl_live, kl_base, capability

    def _kl(self, version: str, live: str) -> tuple[float, float]:
        """KL(new || live) and KL(new || base) on the probe prompts, mean per token.

        Each (prompt, adapter) forward is its own engine command, so decode steps go on in between;
        the live version's and the base's log-probs are cached, so a check usually runs only the new rows.
        """
        live = BASE if live == BASE_VERSION else live  # v0's LoRA B is zero: it *is* the base
        for name in dict.fromkeys((version, live, BASE)):
            if name not in self._probe_cache or name == version:
                rows = [
                    self._call(
                        lambda row=row, name=name: probe_logprobs(self.registry, row, name),
                        "the KL probe failed",
                    )
                    for row in self.probes
                ]
                self._probe_cache[name] = torch.cat(rows)
        new = self._probe_cache[version]
        return mean_kl(new, self._probe_cache[live]), mean_kl(new, self._probe_cache[BASE])

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on the engine thread; its failure refuses the version (load_error)."""
        try:
            future = self.engine.call(fn)
        except RuntimeError as exc:
            raise EngineUnavailable(str(exc)) from exc
        try:
            return future.result(timeout=COMMAND_TIMEOUT_S)
        except TimeoutError:
            future.cancel()  # if it has not started, it never will
            raise
        except Exception as exc:
            raise Refused("load_error", f"{what}: {exc!r}") from exc

    def forget(self, live: str) -> None:
        """Keep the cached probe log-probs of the base and the live version only."""
        self._probe_cache = {k: v for k, v in self._probe_cache.items() if k in (BASE, live)}
