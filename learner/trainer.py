"""`Learner`: the seam between where events come from (a file, Kafka) and the PPO update.

An input loop hands each raw event to `Learner.admit` (parse, validate, deduplicate: a bad or
repeated event is counted and logged, never raised), collects what it admits into batches, and
calls `Learner.train(events, offsets)`, which fits the reward model on them, drops stale events, runs
one PPO update and writes one adapter version whose manifest records the events and the input offsets
it covers. The input loop owns batching policy (batch_size, min_batch, max_wait_s) and offsets; this
class owns the model and the store.

What the PPO update trains on is the ``signal`` setting (`Learner.signal`):

    direct        the batch's human-rated answers, each with its human reward
    reward_model  the learner's own answers to users' prompts, scored by the reward model (rollout.py);
                  the human ratings train the reward model only
    both          the two together in one update

and 'reward_model' or 'both' fall back to 'direct' while the reward model's prequential accuracy over
its newest ``reward_model_window`` outcomes is below ``reward_model_min_accuracy``: a learnt reward is
only optimised while it keeps predicting ratings it has not seen.

Between human batches the input loop may call `Learner.refine` (the ``refine_rounds`` setting): one more
update on the learner's own answers alone, scored by the trusted reward model, written as a version that
trains on no event and covers the same offsets as its parent. Iterated online RLHF (Bai et al. 2022):
the policy keeps improving while the humans are away, within the same KL leash.

Under data parallelism (learner/distributed.py) the Learner of rank 0 is this one, and it sends the other
ranks each update's samples, the version they train from and the state the update reads; theirs run
`follow`, which trains on what it receives until rank 0 says stop.

Before either update the learner leaves a head the cluster refused or rolled back from (`refusals`, fed
from thumbtune.control by learner/control.py): `step_off_refused` restores the newest version in the store
that was not, and the update trains on from there (the input's offsets stay where they are).
"""

from __future__ import annotations

import logging
import time

import torch

from learner.checkpoint import load_latest, restore_version, save_version, trained_event_ids
from learner.config import LearnerSettings
from learner.control import Refusal, Refusals, Serving, restored
from learner.distributed import SINGLE, DataParallel
from learner.events import SkipCounter, is_stale, parse_event, stale_reason, validate_event
from learner.policy import Batch, Sample, features
from learner.ptx import PTX_TEXT, PretrainingMix
from learner.raters import limit
from learner.rollout import pessimistic_reward, rollouts, scored
from learner.update import CPU_FORWARD_TOKENS, ppo_update, row_chunks
from thumbtune.core.base_model import LoadedBase, load_base
from thumbtune.core.chat import end_token_ids
from thumbtune.core.contract import BASE_VERSION, FeedbackEvent
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore, make_adapter_store

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
"""Under data parallelism, the longest rank 0 leaves the other ranks without a message while idle."""

LOGGED = (
    "policy_loss",
    "value_loss",
    "entropy",
    "approx_kl",
    "kl_ref",
    "beta",
    "clipfrac",
    "explained_variance",
    "mean_reward",
    "is_ess",
    "response_length_drift",
    "epochs",
    "update_s",
    "reward_model.accuracy",
    "reward_model.pair_accuracy",
    "reward_model.recent_accuracy",
    "signal.reward_model_share",
    "rollout.reward",
    "rollout.sample_s",
    "raters.top_share",
    "raters.top_share_capped",
)


class Learner:
    def __init__(
        self,
        settings: Settings,
        learner_settings: LearnerSettings,
        base: LoadedBase | None = None,
        store: AdapterStore | None = None,
        dp: DataParallel = SINGLE,
    ) -> None:
        self.settings = settings
        self.dp = dp
        """This process's rank among the learner processes (learner/distributed.py)."""
        self.learner_settings = learner_settings
        self.base = base if base is not None else load_base(settings)
        self.store = (
            store
            if store is not None
            else make_adapter_store(settings.adapter_store_path, settings.adapter_cache_path)
        )
        self.policy, self.state = load_latest(self.store, self.base, settings, learner_settings)
        dp.broadcast_parameters(self.policy.parameters())  # every rank starts from rank 0's weights
        self.skips = SkipCounter()
        self.admitted: set[str] = trained_event_ids(self.store)
        """Ids trained on (per the store) or admitted since the start: a later copy is a duplicate."""
        latest = self.store.latest()
        self.newest = latest or BASE_VERSION
        """The store's newest version. Staleness counts the versions written since an event's was, which
        after a restore (`refusals`) is more than the head's number says."""
        self.refusals = Refusals.from_manifest(self.store.read_manifest(latest) if latest else None)
        """Versions not to train on from (learner/control.py): the newest manifest's, and thumbtune.control's
        once a `ControlFollower` folds it in."""
        self.serving = Serving()  # what the replicas serve (learner/control.py): never stale
        self._restored: Refusal | None = None
        """The refused head the weights were restored from since the last version written."""
        self.max_length: int | None = getattr(self.base.model.config, "max_position_embeddings", None)
        self.pad_id: int = self.base.tokenizer.pad_token_id
        self.eos_ids = end_token_ids(self.base.model, self.base.tokenizer)
        ls = learner_settings
        self.ptx = PretrainingMix(self.base.tokenizer, ls.ptx_text or PTX_TEXT) if ls.ptx_coef > 0 else None
        self._signal: str | None = None
        self._told = time.monotonic()
        """When rank 0 last sent the other ranks a message (`heartbeat`)."""

    @property
    def version(self) -> str:
        """The version the weights in memory are (v0 before the first update)."""
        return self.policy.version

    def admit(self, raw: bytes | str, where: str) -> FeedbackEvent | None:
        """The event if the learner can train on it and has not seen it yet; else None (counted, logged)."""
        event, reason = parse_event(raw)
        if event is not None:
            reason = validate_event(event, self.policy.vocab_size, self.base.fingerprint, self.max_length)
            if reason is None and event.event_id in self.admitted:
                reason = f"duplicate: event {event.event_id} was already admitted or trained on"
        if event is None or reason is not None:
            self.skips.add(reason or "schema", where)
            return None
        self.admitted.add(event.event_id)
        return event

    def is_stale(self, event: FeedbackEvent, versions_ahead: int = 0) -> bool:
        """``event`` is too stale to train on ``versions_ahead`` versions from now (`events.is_stale`)."""
        max_lag = self.learner_settings.max_staleness - versions_ahead
        return is_stale(event, self.newest, max_lag, self.serving.versions())

    def drop_stale(self, events: list[FeedbackEvent]) -> list[FeedbackEvent]:
        """The events `stale_reason` keeps (the rest: counted, logged)."""
        kept, max_lag = [], self.learner_settings.max_staleness
        for event in events:
            reason = stale_reason(event, self.newest, max_lag, self.serving.versions())
            if reason is None:
                kept.append(event)
            else:
                self.skips.add(reason, event.event_id)
        return kept

    def train(self, events: list[FeedbackEvent], offsets: dict[str, int] | None = None) -> str | None:
        """One PPO update on ``events`` and one new version in the store; None if none was fresh enough.

        ``offsets`` ('topic:partition' -> next offset) go into the manifest unchanged, so a consumer
        that resumes from the latest manifest neither loses nor re-trains events. A refused head is left
        first (`step_off_refused`).
        """
        self.step_off_refused()
        ls = self.learner_settings
        limited = limit(  # one weight per rating: no rater over its capped share (learner/raters.py)
            events,
            self.state.raters,
            cap=ls.rater_cap,
            identity=ls.rater_identity,
            normalise=ls.rater_normalise,
        )
        reward_model = self._fit_reward_model(events, limited.weights)  # every human rating, stale or not
        self.state.prompts.add(events)
        per_event = zip(limited.rewards, limited.weights, strict=True)
        limits = {e.event_id: rw for e, rw in zip(events, per_event, strict=True)}
        events = self.drop_stale(events)
        if not events:
            log.warning("no fresh events left in the batch; no version written")
            return None
        signal = self.signal()
        human = [Sample.of(e, *limits[e.event_id]) for e in events] if signal in ("direct", "both") else []
        own, figures = self._rollouts() if signal in ("reward_model", "both") else ([], {})
        return self._update(human, own, events, offsets, reward_model | figures | limited.diagnostics)

    def refine(self, offsets: dict[str, int] | None = None) -> str | None:
        """One update on the learner's own answers alone, scored by the reward model, between human batches;
        None (nothing written) unless the signal is 'reward_model' or 'both' and the reward model is trusted.

        The version trains on no event; ``offsets`` are the parent's (the input loop's last durable ones),
        so exactly-once accounting is unchanged. A refused head is left first (`step_off_refused`).
        """
        self.step_off_refused()
        if self.signal() == "direct" or not self.state.prompts:
            return None
        own, figures = self._rollouts()
        return self._update([], own, [], offsets, figures | {"signal.refine": 1.0})

    def _update(
        self,
        human: list[Sample],
        own: list[Sample],
        events: list[FeedbackEvent],
        offsets: dict[str, int] | None,
        figures: dict[str, float],
    ) -> str:
        """PPO on ``human + own`` and the new version (trained on ``events``) in the store."""
        batch = Batch.from_samples(human + own, self.pad_id)
        if self.dp.world > 1:  # the message is built only for other ranks to hear it
            self._tell_followers(
                "update", parent=self.version, samples=human + own, state=self.state.shared()
            )
        diagnostics = ppo_update(self.policy, batch, self.state, self.learner_settings, self.ptx, self.dp)
        diagnostics |= figures
        diagnostics |= {
            "signal.human_answers": float(len(human)),
            "signal.own_answers": float(len(own)),
            "signal.reward_model_share": len(own) / len(batch),
        }
        if self.state.average is not None:
            diagnostics["average_gap"] = self.state.average.update()
        diagnostics |= {f"skipped.{code}": float(n) for code, n in self.skips.drain().items()}
        parent = self.version
        version = save_version(
            self.store,
            self.policy,
            self.state,
            base=self.base,
            event_ids=[e.event_id for e in events],
            offsets=offsets,
            diagnostics=diagnostics,
            extra=self._control_fields(),
        )
        self.newest, self._restored = version, None
        self._tell_followers("saved", version=version)
        log.info(
            "trained %s from %s on %d events and %d own answers: %s",
            version,
            parent,
            len(events),
            len(own),
            " ".join(f"{k}={diagnostics[k]:.4g}" for k in LOGGED if k in diagnostics),
        )
        return version

    # --- data parallelism (learner/distributed.py) ---------------------------------------------------------

    def _tell_followers(self, kind: str, **message: object) -> None:
        """Rank 0: send the other ranks a message (nothing in one process)."""
        if self.dp.world > 1:
            self.dp.broadcast({"kind": kind, **message})
            self._told = time.monotonic()

    def heartbeat(self) -> None:
        """Rank 0, while no ratings come: tell the other ranks it is alive every HEARTBEAT_S, so that
        their wait for the next update stays within the collectives' timeout (30 min for gloo)."""
        if self.dp.world > 1 and time.monotonic() - self._told >= HEARTBEAT_S:
            self._tell_followers("idle")

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' `follow` (ranks already gone are not waited for)."""
        try:
            self._tell_followers("stop")
        except RuntimeError as exc:
            log.warning("could not tell the other learner ranks to stop (%s); they stop with torchrun", exc)

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's PPO updates with it, each on the batch and state it sends, until
        it says stop. Weights that are not the version an update trains from (rank 0 stepped off a refused
        head, or did not save) are first restored from the store, where rank 0's are."""
        while (message := self.dp.broadcast())["kind"] != "stop":
            if message["kind"] == "saved":
                self.policy.version = message["version"]
            if message["kind"] != "update":
                continue
            if message["parent"] != self.version:
                log.warning(
                    "rank %d: at %s, the update trains from %s: restoring it",
                    self.dp.rank,
                    self.version,
                    message["parent"],
                )
                self.state = restore_version(
                    self.policy, self.store, message["parent"], self.base, self.learner_settings
                )
            self.state.load_shared(message["state"])
            batch = Batch.from_samples(message["samples"], self.pad_id)
            ppo_update(self.policy, batch, self.state, self.learner_settings, self.ptx, self.dp)

    def step_off_refused(self) -> None:
        """If the head was refused (or rolled back from) on thumbtune.control, restore the newest version in
        the store that was not (v0 at the bottom): its weights, value head, optimizer, KL controller,
        statistics, reward model, prompts and published average, as a start-up resumes them. What the
        refused versions trained on stays trained (the input's offsets and the manifests' event ids are
        untouched); the next version's parent is the restored one."""
        refusal = self.refusals.get(self.version)
        if refusal is None:
            return
        for target in self.refusals.fallback(self.store.versions()):
            try:
                self.state = restore_version(
                    self.policy, self.store, target, self.base, self.learner_settings
                )
                break
            except (RuntimeError, OSError) as exc:  # v0, the last, needs no file
                log.error("cannot go back to %s (%s); trying the next older version", target, exc)
        self._restored = refusal
        restored(refusal, self.version)

    def _control_fields(self) -> dict[str, object]:
        """The manifest's ``refused`` (every refusal known) and ``restored_from`` (the refused head this
        version's weights were restored away from, if any)."""
        fields: dict[str, object] = {"refused": self.refusals.summary()} if len(self.refusals) else {}
        if self._restored is not None:
            fields["restored_from"] = self._restored.as_dict()
        return fields

    def signal(self) -> str:
        """What this update trains on: the configured signal, or 'direct' while the reward model is not
        trusted (none configured, its window not yet full, or its accuracy there below the floor)."""
        ls, model = self.learner_settings, self.state.reward_model
        wanted = ls.signal
        if wanted != "direct" and (model is None or not model.trusted(ls.reward_model_min_accuracy)):
            wanted = "direct"
        if wanted != self._signal:
            accuracy, n = model.recent_accuracy() if model is not None else (float("nan"), 0)
            log.info(
                "training on %s (configured: %s; reward model accuracy %.3f over its newest %d outcomes, "
                "floor %.2f over %d)",
                "human ratings alone" if wanted == "direct" else wanted,
                ls.signal,
                accuracy,
                n,
                ls.reward_model_min_accuracy,
                ls.reward_model_window,
            )
            self._signal = wanted
        return wanted

    def _rollouts(self) -> tuple[list[Sample], dict[str, float]]:
        """The policy's own answers to users' prompts, scored by the reward model (learner/rollout.py)."""
        ls, model = self.learner_settings, self.state.reward_model
        assert model is not None
        started = time.perf_counter()
        prompts = self.state.prompts.draw(ls.rollout_prompts, self.state.generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.state.generator))
        own = rollouts(
            self.policy,
            prompts,
            samples=ls.rollout_samples,
            max_tokens=ls.rollout_max_tokens,
            temperature=ls.rollout_temperature,
            pad=self.pad_id,
            eos=self.eos_ids,
            seed=seed,
            name=f"rollout-{self.state.updates}",
        )
        sampled = time.perf_counter()
        rewards, spread = pessimistic_reward(
            model.ensemble, self._features(Batch.from_samples(own, self.pad_id)), ls.reward_model_kappa
        )
        figures = {
            "rollout.reward": rewards.mean().item(),
            "rollout.spread": spread.mean().item(),
            "rollout.length": sum(len(s.response_token_ids) for s in own) / len(own),
            "rollout.sample_s": sampled - started,
            "rollout.score_s": time.perf_counter() - sampled,
        }
        return scored(own, rewards, ls.rollout_samples), figures

    def _features(self, batch: Batch) -> torch.Tensor:
        """`features` of every row, in row chunks within the CPU forward budget."""
        index = torch.arange(len(batch))
        max_tokens = CPU_FORWARD_TOKENS if self.policy.device.type == "cpu" else None
        return torch.cat(
            [features(self.policy, batch.subset(rows)) for rows in row_chunks(batch, index, max_tokens)]
        )

    def _fit_reward_model(self, events: list[FeedbackEvent], weights: list[float]) -> dict[str, float]:
        """Score the batch with the reward model as it is (prequential), then fit it on the batch too, each
        rating at its rater weight; the figures as ``reward_model.*`` diagnostics. The base's features cost
        one no-grad pass."""
        model = self.state.reward_model
        if model is None or not events:
            return {}
        started = time.perf_counter()
        features = self._features(Batch.from_events(events, self.pad_id))
        figures = model.observe(events, features, torch.tensor(weights))
        figures["recent_accuracy"], _ = model.recent_accuracy()
        figures["trusted"] = float(model.trusted(self.learner_settings.reward_model_min_accuracy))
        figures["update_s"] = time.perf_counter() - started
        return {f"reward_model.{name}": value for name, value in figures.items()}
