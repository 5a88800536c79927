"""The TRL contender of `thumbtune bench learn`: GRPOTrainer doing the closest equivalent of one PPO update.

TRL >= 1.13 has no PPOTrainer; GRPOTrainer with these settings runs the same shape of work as the learner:
  * rollout_func replays the fixed token ids (prompt, answer, behaviour log-probs) instead of generating;
    the dataset holds one row per prompt, GRPO repeats each twice (num_generations = 2), so a group is the
    prompt's two answers; the reward callable returns their fixed +1 / -1, and scale_rewards = "none" makes
    the advantage reward - group mean = the given reward;
  * one generation batch of 64 = per_device_train_batch_size 16 x steps_per_generation 4, reused for
    num_iterations = 4 passes: 16 optimizer steps of 16 samples, like 4 epochs x 4 minibatches;
  * num_iterations > 1 makes it compute pi_old (no grad), beta = 0.05 (> 0) pi_ref with the adapter off:
    the same two no-grad passes as the learner; clipped surrogate with epsilon 0.2, AdamW lr 1e-4, constant
    schedule, gradient clipping 1.0; the same LoRA (r 8, alpha 16, q_proj + v_proj);
  * CPU: bf16 = False and gradient_checkpointing = False (its defaults assume a GPU).
The update is timed from on_train_begin to on_train_end (the Trainer's set-up before is excluded; the
replay, the two no-grad passes, the 16 steps and TRL's logging inside are included). Only imported when
trl (the bench extra) is installed.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from benchmarks.common import Window, warm_up
from learner.policy import Batch
from thumbtune.core.lora import lora_config
from thumbtune.core.settings import Settings

BETA = 0.05
"""The learner's init_beta: with beta > 0 TRL computes the reference log-probs, as the learner does."""


def run_trl(base, events: list, settings: Settings, *, epochs: int, minibatch: int, max_tokens: int) -> dict:  # noqa: ANN001
    n = len(events)
    if n % 2 or n % minibatch:
        raise ValueError(f"{n} events: need pairs and whole minibatches of {minibatch}")
    for k in range(0, n, 2):
        a, b = events[k], events[k + 1]
        if a.prompt_token_ids != b.prompt_token_ids or sorted((a.reward, b.reward)) != [-1.0, 1.0]:
            raise ValueError(f"events {k}, {k + 1} are not a (+1, -1) pair on one prompt")

    warm_up(base.model, Batch.from_events(events, base.tokenizer.pad_token_id), minibatch)
    keys = [f"pair-{k:03d}" for k in range(n // 2)]
    handed_out: Counter[str] = Counter()

    def rollout(prompts: list[str], trainer: object) -> dict:
        """The fixed answers: the first row of a prompt gets its first answer, the second its second."""
        prompt_ids, completion_ids, logprobs, index = [], [], [], []
        for key in prompts:
            i = 2 * int(key.split("-")[1]) + handed_out[key] % 2
            handed_out[key] += 1
            prompt_ids.append(list(events[i].prompt_token_ids))
            completion_ids.append(list(events[i].response_token_ids))
            logprobs.append(list(events[i].behaviour_logprobs))
            index.append(i)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "event_index": index,
        }

    def fixed_reward(prompts: list, completions: list, event_index: list[int], **_: object) -> list[float]:
        return [events[i].reward for i in event_index]

    class Clock(TrainerCallback):
        window: Window | None = None
        timed: dict | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.window = Window()

        def on_train_end(self, args, state, control, **kwargs):
            self.timed = self.window.stop()

    steps_per_generation = n // minibatch
    with tempfile.TemporaryDirectory(prefix="thumbtune-bench-trl-") as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=minibatch,
            gradient_accumulation_steps=1,
            steps_per_generation=steps_per_generation,
            num_generations=2,
            num_iterations=epochs,
            max_steps=epochs * steps_per_generation,
            max_completion_length=max_tokens,
            temperature=1.0,
            beta=BETA,
            epsilon=0.2,
            scale_rewards="none",
            loss_type="bnpo",
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            log_completions=False,
            dataloader_num_workers=0,
            seed=0,
            disable_dropout=True,
        )
        clock = Clock()
        torch.manual_seed(0)
        trainer = GRPOTrainer(
            model=base.model,
            reward_funcs=fixed_reward,
            args=config,
            processing_class=base.tokenizer,
            train_dataset=Dataset.from_dict({"prompt": keys}),
            peft_config=lora_config(settings),
            rollout_func=rollout,
            callbacks=[clock],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    replayed = sum(handed_out.values())
    if replayed != n or trainer.state.global_step != epochs * steps_per_generation:
        raise RuntimeError(
            f"TRL replayed {replayed} answers and took {trainer.state.global_step} steps; "
            f"expected {n} and {epochs * steps_per_generation}"
        )
    return clock.timed | {
        "train_call_s": train_s,
        "steps": trainer.state.global_step,
        "trl_version": trl.__version__,
        "config": {
            "beta": BETA,
            "num_generations": 2,
            "num_iterations": epochs,
            "loss_type": "bnpo",
            "steps_per_generation": steps_per_generation,
            "per_device_train_batch_size": minibatch,
        },
    }
