"""The learner's configuration: one typed field per hyper-parameter, each with its meaning and its default.

`PPOConfig` is what one update does (learner/ppo.py, learner/update.py take it); `LearnerSettings` is the
same fields plus the learner's batching and process settings, read from ``THUMBTUNE_LEARNER_<NAME>``.
A `LearnerSettings` *is* a `PPOConfig`, so there is nothing to map and nothing to keep equal. The defaults
are the product's, measured with `thumbtune bench loop` and `bench ablate` (docs/BENCHMARKS.md).

Shared facts (the model, the LoRA shape, the adapter store, Kafka) stay in `thumbtune.core.settings`, so
the server and the learner cannot disagree on them. The README's settings table lists these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PPOConfig(BaseModel):
    """The hyper-parameters of one PPO update and of the adapter it publishes."""

    model_config = ConfigDict(extra="forbid")

    # --- PPO (Schulman et al. 2017; the LM form of Ziegler et al. 2019) --------------------------------
    # lambda = 1 (as in OpenRLHF): a zero-initialised critic cannot carry the end-of-answer thumb back 30-50
    # tokens (0.95^40 = 0.13 of it reached the first token); measured ~2x faster learning (docs/BENCHMARKS.md)
    lam: float = Field(
        1.0, ge=0, le=1, description="GAE lambda (gamma is fixed at 1: one score per response)."
    )
    # 1 epoch of minibatches of 4: the 8 optimizer steps per 32 events that 2 x 8 (run 4) and 4 x 16 took,
    # each rating used once, at half 2 x 8's compute: ~48 s per update on one float32 core of an AVX2-only
    # CPU, inside the 60 s feedback-to-live budget (docs/BENCHMARKS.md, runs 6 and 8)
    epochs: int = Field(1, ge=1, description="Passes over each batch (PPO's K).")
    minibatch_size: int = Field(4, ge=1, description="Responses per gradient step.")
    # at 1e-4 the embedded model learnt nothing in 160 ratings (docs/BENCHMARKS.md)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the LoRA weights and the value head.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (pulls the adapter toward the base)."
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range of the ratio pi_theta / pi_old.")
    value_clip_eps: float = Field(0.2, gt=0, description="Clip range of the value update around V_old.")
    vf_coef: float = Field(0.1, ge=0, description="Weight c_v of the value loss.")
    # 0 as in Ziegler et al. and InstructGPT: the KL penalty to pi_ref already keeps the policy from
    # collapsing, and an entropy bonus over a ~50k-token vocabulary pushes probability onto junk tokens
    ent_coef: float = Field(0.0, ge=0, description="Weight c_e of the entropy bonus (0 = none).")
    is_clip_c: float = Field(
        1.0, gt=0, description="Truncation c of the importance weights min(c, pi_old / pi_behaviour)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    early_stop_kl: float | None = Field(
        0.1,
        gt=0,
        description="Skip an update's remaining epochs once approx-KL(pi_old || pi) passes this; "
        "'none' = never.",
    )
    reward_clip: float = Field(
        5.0, gt=0, description="Running-normalised user rewards are clipped to +-this."
    )

    # --- KL penalty to the reference (the base model, adapter off) --------------------------------------
    # At lr 1e-4 nothing was learnt in 160 ratings; at lr 1e-3 with beta 0.05 approval passed 80% but
    # capability collapsed once KL(pi || base) passed ~3 nats per answer; beta 0.3 kept it but approval
    # settled at 50-70% (loop runs 5 and 6); beta 0.2 with the averaged adapter reached 74-88% with answers
    # intact (run 8).
    target_kl: float = Field(
        2.0, gt=0, description="Adaptive beta's target KL(pi || pi_ref), nats per response (sum over tokens)."
    )
    kl_penalty: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token estimator of KL(pi || pi_ref) in the reward's beta penalty: 'k1' = log pi - "
        "log pi_ref (Ziegler et al.); 'k3' = (rho - 1) - log rho with rho = pi_ref / pi, >= 0 but weak on "
        "what the policy learnt (run 7 in docs/BENCHMARKS.md: reward hacking at beta 0.3).",
    )
    fixed_beta: float | None = Field(
        None, ge=0, description="Keep the KL coefficient beta at this value; unset or 'none' = adaptive."
    )
    init_beta: float = Field(
        0.2, ge=0, description="Starting KL coefficient beta of the adaptive controller."
    )
    kl_horizon: int = Field(
        10_000, ge=1, description="Adaptive controller horizon in responses (beta moves <= ~20% per horizon)."
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the exact per-token KL(pi || pi_ref) in the loss, beside the reward's "
        "beta penalty; 0 = the penalty alone.",
    )

    # --- the pretraining mix (InstructGPT's PPO-ptx): + gamma * E_x~D_ptx[log pi(x)] ------------------
    ptx_coef: float = Field(
        0.0,
        ge=0,
        description="Weight gamma of the pretraining-mix loss -gamma * (mean log-likelihood per token) of "
        "plain text the base models well (learner/data/ptx.txt), added to every minibatch; 0 = none.",
    )
    ptx_batch: int = Field(2, ge=1, description="Pretraining-mix passages per minibatch (when ptx_coef > 0).")

    # --- what is published ------------------------------------------------------------------------------
    # 0.5: each version moves the served policy by half of what its update found (docs/BENCHMARKS.md, run 8)
    average_decay: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Publish the Polyak average w <- d*w + (1-d)*theta of the trained LoRA weights with this "
        "decay d per version (learner/average.py); 0 = publish the trained weights themselves.",
    )


class LearnerSettings(PPOConfig, BaseSettings):
    """`PPOConfig` plus how the learner batches events and runs, from ``THUMBTUNE_LEARNER_*``."""

    model_config = SettingsConfigDict(
        env_prefix="THUMBTUNE_LEARNER_", extra="ignore", env_parse_none_str="none"
    )

    # --- batching -----------------------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, description="Events per PPO update (one adapter version per update).")
    min_batch: int = Field(
        8, ge=1, description="Smallest batch trained on when max_wait_s passes or the input ends."
    )
    max_wait_s: float = Field(
        60.0, gt=0, description="Train on a partial batch (>= min_batch) after this wait."
    )
    max_staleness: int = Field(
        4,
        ge=0,
        description="Drop events served by an adapter over this many versions behind the learner, unless a "
        "replica still serves it (live or canary).",
    )

    # --- the reward model (learner/reward_model.py) ------------------------------------------------------
    reward_model_heads: int = Field(
        4,
        ge=0,
        description="Heads of the reward-model ensemble fitted on every human rating (their spread is its "
        "doubt); 0 = no reward model.",
    )
    reward_model_capacity: int = Field(
        2048,
        ge=1,
        description="Newest rated answers the reward model is fitted on (and keeps, in half precision).",
    )
    reward_model_l2: float = Field(0.01, ge=0, description="L2 penalty lambda on each head's weights.")

    # --- what the policy learns from (learner/rollout.py) -------------------------------------------------
    # direct: on this 2-core CPU it reached 80% in 512 ratings; 'both' was 63% against its 57% at 320 side by
    # side but behind at 160, at twice its feedback-to-live (docs/BENCHMARKS.md, runs 9-13): no clear winner
    signal: Literal["direct", "reward_model", "both"] = Field(
        "direct",
        description="What PPO trains the policy on: 'direct' = the human-rated answers with their human "
        "reward; 'reward_model' = the learner's own answers to users' prompts scored by the reward model "
        "(human ratings train the reward model only); 'both' = the two in every update. Either falls back "
        "to 'direct' while the reward model is below reward_model_min_accuracy.",
    )
    reward_model_kappa: float = Field(
        1.0,
        ge=0,
        description="Pessimism of the reward model's scores of the learner's own answers: mean - kappa * "
        "spread of the ensemble's heads.",
    )
    reward_model_min_accuracy: float = Field(
        0.7,
        ge=0,
        le=1,
        description="The reward model scores the policy's answers only while its prequential accuracy over "
        "the last reward_model_window ratings is at least this; below it the learner trains on human "
        "ratings alone.",
    )
    # 64: trusted from the third batch of 32 on; the embedded model's reward model predicted 0.85-0.94 of the
    # second batch's thumbs on `concise` (docs/BENCHMARKS.md)
    reward_model_window: int = Field(
        64,
        ge=1,
        description="Newest prequential outcomes (thumbs, ratings and pairs scored before training) that "
        "the accuracy floor is judged on; the floor is not met until the window is full.",
    )
    rollout_prompts: int = Field(
        8, ge=1, description="Users' prompts (the newest distinct ones) the learner answers per update."
    )
    rollout_samples: int = Field(
        4, ge=2, description="Answers the learner samples per prompt (their mean is each one's baseline)."
    )
    refine_rounds: int = Field(
        0,
        ge=0,
        description="After each update on a human batch, up to this many updates on the learner's own "
        "answers alone (signal reward_model or both, once the reward model is trusted) while no full batch "
        "of ratings is waiting: the policy keeps improving between human batches. 0 = none.",
    )
    rollout_max_tokens: int = Field(48, ge=1, description="Longest answer the learner samples, in tokens.")
    rollout_temperature: float = Field(1.0, gt=0, description="Temperature the learner samples at.")
    ptx_text: Path | None = Field(
        None,
        description="Plain-text file of blank-line separated passages for the pretraining mix (ptx_coef); "
        "unset = learner/data/ptx.txt.",
    )
    prompt_pool: int = Field(
        256, ge=1, description="Distinct user prompts kept to sample from (the newest; kept across restarts)."
    )

    # --- rater influence limits (learner/raters.py) -------------------------------------------------------
    rater_cap: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Largest share of an update's human-rating weight, and of the newest rater_window "
        "ratings, that one rater may have; a rater over it has its ratings down-weighted to it (with K "
        "raters the cap is at least 1/K: equal shares). 1 = no cap.",
    )
    rater_window: int = Field(
        512, ge=1, description="Newest human ratings over which each rater's share is also capped."
    )
    rater_identity: Literal["key", "user"] = Field(
        "key",
        description="Who counts as a rater: 'key' = the API key that rated; 'user' = the chat request's user "
        "field (else the key), only where a trusted front end sets it: clients can send any user.",
    )
    rater_normalise: bool = Field(
        False,
        description="Centre and scale each rater's rewards by their own mean and spread over rater_window "
        "(shrunk toward everyone's), so a rater who approves everything adds little signal.",
    )

    # --- process ------------------------------------------------------------------------------------------
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.")
    precision: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Autocast dtype of the forward passes: 'auto' = bfloat16 on CUDA and on CPUs with AMX "
        "or AVX512-BF16 (1.3x float32 with AMX in bench learn), float32 elsewhere. Weights and optimizer "
        "stay float32.",
    )
    metrics_port: int = Field(9100, ge=0, description="Port of the learner's Prometheus /metrics; 0 = none.")
    metrics_host: str = Field(
        "127.0.0.1", description="Bind address of /metrics; 0.0.0.0 to let Prometheus scrape it from outside."
    )
    max_update_s: float = Field(
        1800.0,
        gt=0,
        description="Longest one update may take before Kafka counts the learner as gone "
        "(the consumer's max_poll_interval_ms).",
    )
    seed: int = Field(0, description="Seed of the LoRA init and the minibatch shuffling.")
