"""Everything a server process holds: model, engine, adapters, completion store, feedback publisher.

Built once at start-up (FastAPI lifespan) and reached by routes through ``request.app.state``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from service.adapter_follower import AdapterFollower
from service.adapter_manager import AdapterManager
from service.engine.adapters import BASE, AdapterRegistry, with_empty_adapter
from service.engine.engine import Engine
from service.publisher import FeedbackPublisher
from service.store import CompletionStore, make_store
from thumbtune.base_model import load_base
from thumbtune.contract import Message
from thumbtune.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    adapters: AdapterRegistry
    tokenizer: object
    store: CompletionStore
    publisher: FeedbackPublisher
    model_id: str
    fingerprint: str
    max_context: int
    adapter_manager: AdapterManager | None = None
    follower: AdapterFollower | None = None

    def encode_chat(self, messages: list[Message]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def model_names(self) -> list[str]:
        return ["thumbtune", *(f"thumbtune@{v}" for v in self.adapters.versions()), BASE]

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.engine.stop()
        self.publisher.close()
        self.store.close()


def build_runtime(settings: Settings) -> Runtime:
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    base = load_base(settings)
    if not getattr(base.tokenizer, "chat_template", None):
        raise RuntimeError(f"model {base.model_id} has no chat template; thumbtune serves chat models only")
    model = with_empty_adapter(base.model, settings)
    adapters = AdapterRegistry(model)
    max_context = settings.max_context or int(getattr(base.model.config, "max_position_embeddings", 2048))
    engine = Engine(
        model, base.tokenizer, adapters, max_batch_size=settings.max_batch_size, max_context=max_context
    )
    store = make_store(settings)
    publisher = FeedbackPublisher(settings)
    engine.start()
    publisher.start()
    manager = AdapterManager(settings, engine, adapters, base.tokenizer, base.fingerprint)
    try:
        manager.start_up()
    except Exception:
        log.exception("loading the newest adapter version at start-up failed; serving %s", adapters.live)
    follower = AdapterFollower(settings, manager) if settings.adapter_follow else None
    if follower is not None:
        follower.start()
    log.info(
        "serving %s (fingerprint %s) with adapter %s, context %d",
        base.model_id,
        base.fingerprint,
        adapters.live,
        max_context,
    )
    return Runtime(
        settings,
        engine,
        adapters,
        base.tokenizer,
        store,
        publisher,
        base.model_id,
        base.fingerprint,
        max_context,
        manager,
        follower,
    )
