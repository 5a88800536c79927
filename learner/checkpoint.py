"""A policy + learner state <-> one adapter version in the store.

Layout of ``v<N>/`` (the file names are the contract's; every file but the manifest is hashed into it):
  ADAPTER_WEIGHTS, ADAPTER_CONFIG   the standard PEFT layout: PeftModel.from_pretrained(base, "v<N>") and
                                    vLLM's LoRA loader read the directory as is
  VALUE_HEAD_WEIGHTS                the critic, trained with the adapter
  LEARNER_STATE                     optimizer, KL controller, reward and length statistics, the trained
                                    weights theta when the adapter file holds their Polyak average
                                    (learner/average.py), and the reward model's rated answers
  REWARD_MODEL_WEIGHTS              the reward model's heads (learner/reward_model.py), when it has one
  MANIFEST                          `AdapterManifest`, written last by the store (plus the learner's
                                    ``refused`` and ``restored_from``: learner/control.py)

`load_latest` resumes the newest version at start-up; `restore_version` puts an older one back into the
policy in memory, the same way, when the head was refused.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from learner.average import load_trained_weights, lora_parameters
from learner.config import LearnerSettings
from learner.policy import ADAPTER_NAME, FEATURE_BLOCKS, Policy, resolve_device, resolve_precision
from learner.raters import RaterWindow
from learner.reward_model import RewardModel
from learner.rollout import PromptPool
from learner.update import LearnerState, finite
from thumbtune.core.base_model import LoadedBase
from thumbtune.core.contract import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_VERSION,
    LEARNER_STATE,
    REWARD_MODEL_WEIGHTS,
    VALUE_HEAD_WEIGHTS,
    AdapterManifest,
)
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore

log = logging.getLogger(__name__)


def save_version(
    store: AdapterStore,
    policy: Policy,
    state: LearnerState,
    *,
    base: LoadedBase,
    event_ids: list[str],
    offsets: dict[str, int] | None = None,
    diagnostics: dict[str, float] | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """Write the policy as the store's next version (parent: the one it was trained from); return its name.

    ``policy.version`` becomes the new version: the weights in memory now are that version. ``extra``:
    manifest fields beyond the contract's (``refused``, ``restored_from``: learner/control.py).
    """
    version = store.next_version()

    def write(tmp: Path) -> None:
        torch.save(state.state_dict(), tmp / LEARNER_STATE)  # first: it holds theta, not the average
        with state.average.published() if state.average else nullcontext():
            policy.model.save_pretrained(str(tmp), selected_adapters=[ADAPTER_NAME])
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card: not part of the adapter
        if not (tmp / ADAPTER_WEIGHTS).is_file() or not (tmp / ADAPTER_CONFIG).is_file():
            raise RuntimeError(f"peft did not write {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} at the top of {tmp}")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
            str(tmp / VALUE_HEAD_WEIGHTS),
        )
        if state.reward_model is not None:
            heads = state.reward_model.ensemble.state_dict()
            save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / REWARD_MODEL_WEIGHTS))

    manifest = AdapterManifest(
        version=version,
        parent=policy.version,
        base_model=base.model_id,
        base_fingerprint=base.fingerprint,
        created_at=time.time(),
        event_count=len(event_ids),
        offsets=dict(offsets or {}),
        event_ids=list(event_ids),
        diagnostics=finite(diagnostics or {}),
        **(extra or {}),
    )
    store.write_version(version, write, manifest)
    policy.version = version
    return version


def load_latest(
    store: AdapterStore, base: LoadedBase, settings: Settings, learner_settings: LearnerSettings
) -> tuple[Policy, LearnerState]:
    """The policy and learner state to continue from: the store's latest version, else a fresh v0.

    Refuses a latest version that was trained on another base model or whose files do not match
    their manifest (`check_loadable`).
    """
    device = resolve_device(learner_settings.device)
    precision = resolve_precision(learner_settings.precision, device)
    log.info("training on %s in %s", device, f"{precision} autocast" if precision else "float32")
    version = store.latest()
    if version is None:
        policy = Policy.fresh(
            base.model, settings, device, seed=learner_settings.seed, autocast_dtype=precision
        )
        log.info("adapter store %s is empty: training from the empty adapter v0", store)
        return policy, new_state(policy, learner_settings)

    check_loadable(store, version, base)
    directory = store.directory(version)
    policy = Policy.from_dir(base.model, directory, version, device, settings, autocast_dtype=precision)
    state = resume_state(policy, directory, learner_settings)
    log.info("resuming from adapter %s (%d updates so far)", version, state.updates)
    return policy, state


def restore_version(
    policy: Policy, store: AdapterStore, version: str, base: LoadedBase, learner_settings: LearnerSettings
) -> LearnerState:
    """Put ``version`` back into ``policy`` and return its learner state, all as `load_latest` resumes it at
    start-up (v0: the empty adapter and a fresh state). ``policy.version`` becomes ``version``.

    In place, since peft injected the LoRA layers into the base model itself (a second PeftModel over it
    would nest them): the adapter file's weights (the published average w when averaging) go into the LoRA
    parameters, then `resume_state` builds the average on them and puts theta back. v0's B is zero (its
    output is the base's) and its A is drawn afresh from the seed, as a fresh learner's is. Raises
    RuntimeError, as `load_latest` does, for a version of another base or with damaged files.
    """
    if version == BASE_VERSION:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(learner_settings.seed)
            for module in policy.model.modules():
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                    module.reset_lora_parameters(ADAPTER_NAME, init_lora_weights=True)
            for p in policy.value_head.parameters():
                p.zero_()
        policy.version = BASE_VERSION
        return new_state(policy, learner_settings)
    check_loadable(store, version, base)
    directory = store.directory(version)
    loaded = set_peft_model_state_dict(
        policy.model, load_file(str(directory / ADAPTER_WEIGHTS)), adapter_name=ADAPTER_NAME
    )
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise RuntimeError(
            f"adapter {version} in {store} does not fit the learner's LoRA: unexpected "
            f"{loaded.unexpected_keys[:3]}, missing {missing[:3]}"
        )
    policy.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_WEIGHTS)))
    policy.version = version
    return resume_state(policy, directory, learner_settings)


def check_loadable(store: AdapterStore, version: str, base: LoadedBase) -> None:
    """RuntimeError for a version trained on another base model or whose files do not match their
    manifest: training on from the wrong weights would silently publish nonsense."""
    manifest = store.read_manifest(version)
    if manifest.base_fingerprint != base.fingerprint:
        raise RuntimeError(
            f"adapter {version} in {store} was trained on {manifest.base_model} (fingerprint "
            f"{manifest.base_fingerprint}) but the base loaded is {base.model_id} ({base.fingerprint}); "
            "point THUMBTUNE_ADAPTER_STORE at a store for this model or THUMBTUNE_MODEL at that model"
        )
    problems = store.verify(version)
    if problems:
        raise RuntimeError(f"adapter {version} in {store} is damaged: {'; '.join(problems)}")


def resume_state(policy: Policy, directory: Path, learner_settings: LearnerSettings) -> LearnerState:
    """The learner state of the version in ``directory``, whose adapter ``policy`` holds now: the average
    (if any) starts from that adapter, which is the published w, and theta comes back from LEARNER_STATE."""
    state = new_state(policy, learner_settings)
    state_file = directory / LEARNER_STATE
    if state_file.is_file():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        state.load_state_dict(saved)
        if "trained_weights" in saved:  # the adapter file holds the average: train on from theta
            load_trained_weights(lora_parameters(policy.model), saved["trained_weights"])
    else:
        log.warning(
            "%s has no %s: resuming its weights with a fresh optimizer and statistics",
            policy.version,
            LEARNER_STATE,
        )
    return state


def new_state(policy: Policy, learner_settings: LearnerSettings) -> LearnerState:
    """A fresh `LearnerState` with the configured reward model, prompt pool and rater window (a resume loads
    into it)."""
    state = LearnerState.create(policy, learner_settings, learner_settings.seed)
    state.reward_model = new_reward_model(policy, learner_settings)
    state.prompts = PromptPool(learner_settings.prompt_pool)
    state.raters = RaterWindow(learner_settings.rater_window)
    return state


def new_reward_model(policy: Policy, learner_settings: LearnerSettings) -> RewardModel | None:
    """An empty reward model for the policy's base (`features`: FEATURE_BLOCKS x its hidden size); None
    when THUMBTUNE_LEARNER_REWARD_MODEL_HEADS is 0."""
    if not learner_settings.reward_model_heads:
        return None
    return RewardModel(
        learner_settings.reward_model_heads,
        FEATURE_BLOCKS * policy.value_head.summary.in_features,
        capacity=learner_settings.reward_model_capacity,
        l2=learner_settings.reward_model_l2,
        seed=learner_settings.seed,
        window=learner_settings.reward_model_window,
    )


def trained_event_ids(store: AdapterStore) -> set[str]:
    """Every event id some version in the store trained on: a re-delivered event is not trained twice."""
    ids: set[str] = set()
    for version in store.versions():
        ids.update(store.read_manifest(version).event_ids)
    return ids
