"""Everything a server process holds: model, engine, adapters, model names, completion store, publisher.

Built once at start-up (FastAPI lifespan); routes get it, and the services over it, through the
dependencies in service/dependencies.py.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from service.adapters import decisions
from service.adapters.control import ControlPlane
from service.adapters.follower import AdapterFollower
from service.adapters.manager import AdapterManager
from service.adapters.view import Tallies
from service.canary.judge import CanaryJudge
from service.canary.ratings import VersionRatings
from service.canary.stream import RatingsFollower
from service.engine.engine import Engine
from service.engine.registry import AdapterRegistry, with_empty_adapter
from service.engine.vllm import VLLMEngine
from service.publisher import FeedbackPublisher
from service.serving_models import ServingModels
from service.store import CompletionStore, make_store
from thumbtune.core.base_model import load_base
from thumbtune.core.kafka import preflight
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 10.0
"""How long start-up waits to read thumbtune.control before it serves what the store has (the control
plane's thread reads it later and reconciles)."""


@dataclass
class Runtime:
    settings: Settings
    engine: Engine | VLLMEngine
    adapters: AdapterRegistry
    models: ServingModels
    tokenizer: PreTrainedTokenizerBase
    store: CompletionStore
    publisher: FeedbackPublisher
    model_id: str
    fingerprint: str
    max_context: int
    adapter_manager: AdapterManager | None = None
    follower: AdapterFollower | None = None
    control: ControlPlane | None = None
    tallies: Tallies | None = None
    ratings_follower: RatingsFollower | None = None

    def close(self) -> None:
        if self.tallies is not None and self.tallies.judge is not None:
            self.tallies.judge.stop()
        if self.ratings_follower is not None:
            self.ratings_follower.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.control is not None:
            self.control.stop()
        self.engine.stop()
        self.publisher.close()
        self.store.close()


def build_runtime(settings: Settings) -> Runtime:
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    preflight(settings)  # a TLS misconfiguration fails start-up, named; an unreachable broker does not
    base = load_base(settings)
    if not getattr(base.tokenizer, "chat_template", None):
        raise RuntimeError(f"model {base.model_id} has no chat template; thumbtune serves chat models only")
    model = with_empty_adapter(base.model, settings)
    adapters = AdapterRegistry(model)
    max_context = settings.max_context or int(getattr(base.model.config, "max_position_embeddings", 2048))
    engine: Engine | VLLMEngine = Engine(
        model, base.tokenizer, adapters, max_batch_size=settings.max_batch_size, max_context=max_context
    )
    if settings.engine == "vllm":  # the embedded engine stays, for the checks: it serves no requests
        engine = VLLMEngine(engine, settings)
    store = make_store(settings)
    publisher = FeedbackPublisher(settings)
    engine.start()
    max_context = engine.max_context  # vLLM's window may be smaller
    publisher.start()
    manager = AdapterManager(settings, engine, adapters, base)
    control = ControlPlane(settings, manager) if settings.adapter_follow else None
    if control is not None:
        control.replay(timeout=REPLAY_TIMEOUT_S)  # pinned and refused versions before anything loads
    try:
        decisions.reconcile(manager, "startup", enforce_kl_live=False)  # the newest good, or the log's state
    except Exception:
        log.exception("loading the newest adapter version at start-up failed; serving %s", adapters.live)
    follower = AdapterFollower(settings, manager) if settings.adapter_follow else None
    if follower is not None:
        follower.start()
    tallies = ratings_follower = None
    if control is not None:
        control.start()
        tallies = Tallies(VersionRatings(), threading.Lock(), None)
        ratings_follower = RatingsFollower(settings, tallies.ratings, tallies.lock)
        ratings_follower.start()
        tallies.judge = CanaryJudge(  # judges canaries (none with THUMBTUNE_CANARY_SHARE=0), exports tallies
            settings,
            manager,
            tallies.ratings,
            tallies.lock,
            control.propose,
            ratings_follower.caught_up.is_set,
        )
        tallies.judge.start()
    log.info(
        "serving %s (fingerprint %s) with adapter %s, context %d, engine %s",
        base.model_id,
        base.fingerprint,
        adapters.live,
        max_context,
        settings.engine,
    )
    return Runtime(
        settings,
        engine,
        adapters,
        ServingModels(adapters, base.model_id, settings.canary_compare_share),
        base.tokenizer,
        store,
        publisher,
        base.model_id,
        base.fingerprint,
        max_context,
        manager,
        follower,
        control,
        tallies,
        ratings_follower,
    )
