"""Evaluate one adapter version offline: approval under a rule, answer length, KL to the base, capability.

Used by `thumbtune bench loop` on every version the learner wrote, with the base model in this process
and each version loaded from the adapter store with peft (so it also checks what the store holds, not
what a server believes it serves). Prompts are the held-out set: never shown to the simulated users.

    approval     fraction of sampled answers the rule approves (temperature and max_tokens as the users)
    mean_words   mean whitespace words of those answers
    kl_to_base   mean over answer tokens of KL(pi(.|s_t) || pi_base(.|s_t)), exact over the vocabulary
                 (nats per token)
    kl_per_answer  the same summed over each answer's tokens, averaged over answers (the learner's unit)
    capability   checkable instructions (thumbtune/core/data/capability.jsonl) answered right, greedy
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from thumbtune.cli import rules
from thumbtune.cli.rules import Rule
from thumbtune.core.capability import load_capability
from thumbtune.core.chat import encode_chat, end_token_ids, user_turn
from thumbtune.core.divergence import exact_kl


@torch.no_grad()
def activate_version(model, base_model, directory: Path, version: str):  # noqa: ANN001, ANN201
    """``model`` (None at first) with the stored adapter ``directory`` loaded as ``version``, made active
    and in eval mode: a PeftModel over ``base_model`` that holds each version loaded so far."""
    if model is None:
        model = PeftModel.from_pretrained(base_model, str(directory), adapter_name=version)
    else:
        model.load_adapter(str(directory), adapter_name=version)
    model.set_adapter(version)
    model.eval()
    return model


@dataclass
class Evaluation:
    approval: float
    mean_words: float
    kl_to_base: float
    kl_per_answer: float
    capability: int
    capability_of: int
    failed_items: list[str]
    samples: list[dict]


class Evaluator:
    """Holds the tokenizer and a PeftModel; `evaluate()` runs with whichever adapter is active."""

    def __init__(
        self,
        model,
        tokenizer,
        heldout: list[str],
        rule: Rule,
        *,
        samples_per_prompt: int = 2,
        temperature: float = 1.0,
        max_tokens: int = 48,
        capability_max_tokens: int = 40,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.model, self.tok, self.rule = model, tokenizer, rule
        self.heldout = heldout
        self.samples_per_prompt, self.temperature, self.max_tokens = (
            samples_per_prompt,
            temperature,
            max_tokens,
        )
        self.capability_items = load_capability()
        self.capability_max_tokens = capability_max_tokens
        self.batch_size, self.seed = batch_size, seed
        self.eos = end_token_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id

    def encode(self, prompt: str) -> list[int]:
        return encode_chat(self.tok, user_turn(prompt))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, temperature: float, max_tokens: int) -> list[list[int]]:
        """Answers' token ids (without the end token), batched with left padding; greedy at temperature 0."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **sampling,
            )
            for row in gen[:, width:].tolist():
                answer = []
                for t in row:
                    if t in self.eos:
                        break
                    answer.append(t)
                out.append(answer)
        return out

    @torch.no_grad()
    def kl_to_base(self, prompts: list[list[int]], answers: list[list[int]]) -> tuple[float, float]:
        """Exact per-token KL(pi || pi_base) on the answers' positions: (mean per token, mean per answer)."""
        total, tokens, per_answer = 0.0, 0, []
        for start in range(0, len(prompts), self.batch_size):
            rows = [
                p + a
                for p, a in zip(
                    prompts[start : start + self.batch_size],
                    answers[start : start + self.batch_size],
                    strict=True,
                )
            ]
            lens = [
                (len(p), len(a))
                for p, a in zip(
                    prompts[start : start + self.batch_size],
                    answers[start : start + self.batch_size],
                    strict=True,
                )
            ]
            width = max(map(len, rows))
            ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            with self._base():
                logq = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            kl = exact_kl(logp, logq)  # [batch, width]: KL at each position
            for i, (p_len, a_len) in enumerate(lens):
                # positions p_len-1 .. p_len+a_len-2 predict the answer's tokens
                k = kl[i, p_len - 1 : p_len - 1 + a_len]
                total += float(k.sum())
                tokens += a_len
                per_answer.append(float(k.sum()))
        return total / max(1, tokens), sum(per_answer) / max(1, len(per_answer))

    def _base(self):
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else nullcontext()

    def evaluate(self) -> Evaluation:
        torch.manual_seed(self.seed)
        prompts = [p for p in self.heldout for _ in range(self.samples_per_prompt)]
        encoded = [self.encode(p) for p in prompts]
        answers = self.generate(encoded, temperature=self.temperature, max_tokens=self.max_tokens)
        texts = [self.tok.decode(a, skip_special_tokens=True) for a in answers]
        verdicts = [rules.approves(rules.judge(self.rule, p, t)) for p, t in zip(prompts, texts, strict=True)]
        kl_token, kl_answer = self.kl_to_base(encoded, answers)
        items = self.capability_items
        greedy = self.generate(
            [self.encode(i.prompt) for i in items], temperature=0.0, max_tokens=self.capability_max_tokens
        )
        greedy_texts = [self.tok.decode(a, skip_special_tokens=True) for a in greedy]
        passed = [i.passes(t) for i, t in zip(items, greedy_texts, strict=True)]
        return Evaluation(
            approval=sum(verdicts) / len(verdicts),
            mean_words=sum(rules.words(t) for t in texts) / len(texts),
            kl_to_base=kl_token,
            kl_per_answer=kl_answer,
            capability=sum(passed),
            capability_of=len(items),
            failed_items=[i.id for i, ok in zip(items, passed, strict=True) if not ok],
            samples=[
                {"prompt": p, "answer": t, "approved": v}
                for p, t, v in list(zip(prompts, texts, verdicts, strict=True))[:8]
            ]
            + [
                {"prompt": i.prompt, "answer": t, "passed": ok}
                for i, t, ok in zip(items, greedy_texts, passed, strict=True)
            ],
        )
