"""The policy the learner trains: base model + one LoRA adapter + a value head, and the batch it reads.

One copy of the base weights serves three roles:
  pi_theta  the adapter on (trained),
  pi_ref    the same model inside peft's ``disable_adapter()`` (the base, never a second copy),
  V         `ValueHead` on the final hidden state of pi_theta.

The tokens are the ones the server served (the event's ids), never re-tokenized text. Log-probs
are needed only for response tokens, so `Policy.forward_batch` runs the model body over the whole
sequence but the LM head only on the positions that predict response tokens: with a ~50k
vocabulary the head dominates a small model's cost and memory, and most positions are prompt.

The adapter keeps peft's name ``default`` in memory for the learner's whole life: save_pretrained
then writes the standard PEFT layout at the top of a version directory (other names go into a
subfolder), and the optimizer's parameters stay the same tensors from one version to the next.
The version name lives in `Policy.version`, the store directory and the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import Tensor, nn

from learner.ppo import entropy_from_logits, logprobs_from_logits
from thumbtune.core.contract import BASE_VERSION, VALUE_HEAD_WEIGHTS, FeedbackEvent
from thumbtune.core.lora import lora_config
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls in oneDNN: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4
    and later, Intel Cooper Lake). bf16 autocast was 1.3x float32 per PPO update on one core with AMX in
    bench learn, and 1.6x on an AVX512-BF16 EPYC in the loop (docs/BENCHMARKS.md); without either, bf16 on
    CPU is emulated and slower."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the learner's forward passes: 'auto' -> bfloat16 on CUDA and on CPUs with
    AMX, else None (float32); 'bfloat16' or 'float32' force it. Weights and optimizer stay float32."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"precision must be 'auto', 'bfloat16' or 'float32', got {name!r}")
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else None


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the final hidden state h_t; zero-initialised, so V = 0 until trained.

    It reads the hidden state detached: the critic is fitted on top of the policy's features but its
    loss does not reach the LoRA weights, so the adapter the server runs is shaped by the policy
    objective alone and an early, badly-fitted critic cannot pull it around.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.detach().to(self.summary.weight.dtype)).squeeze(-1)


@dataclass(frozen=True)
class Sample:
    """One answer to train on: a human-rated event's (`of`) or one the learner sampled itself (rollout.py)."""

    sample_id: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    """log pi_b of each response token at ``temperature``"""
    temperature: float
    reward: float
    centred: bool = False
    """The reward already has its baseline subtracted (a rollout's leave-one-out baseline, rollout.py)."""
    weight: float = 1.0
    """u_i: how much the answer counts in the policy loss (its rater's capped share, learner/raters.py)."""

    @classmethod
    def of(cls, event: FeedbackEvent, reward: float | None = None, weight: float = 1.0) -> Sample:
        """A human-rated answer, with its event's reward unless ``reward`` is given (normalised per rater)."""
        return cls(
            event.event_id,
            event.prompt_token_ids,
            event.response_token_ids,
            event.behaviour_logprobs,
            event.sampling.logprob_temperature,
            event.reward if reward is None else reward,
            weight=weight,
        )


@dataclass
class Batch:
    """Answers collated for the model: responses right-padded to T, sequences to L = max(prompt + resp.)."""

    input_ids: Tensor  # [B, L] prompt + response, right-padded with pad_id
    attention_mask: Tensor  # [B, L]
    prompt_lens: Tensor  # [B]
    response_ids: Tensor  # [B, T] right-padded with pad_id
    mask: Tensor  # [B, T] float, 1 on response tokens
    scores: Tensor  # [B] the user's reward R
    behaviour_logprobs: Tensor  # [B, T] log pi_b at the event's logprob temperature, 0 on padding
    temperatures: Tensor  # [B] SamplingParams.logprob_temperature
    event_ids: list[str]  # the sample ids: event ids of human-rated answers
    centred: Tensor | None = None  # [B] bool, Sample.centred (None given: no row is)
    weights: Tensor | None = None  # [B] Sample.weight (None given: all 1)

    def __post_init__(self) -> None:
        if self.centred is None:
            self.centred = torch.zeros(len(self.event_ids), dtype=torch.bool)
        if self.weights is None:
            self.weights = torch.ones(len(self.event_ids))

    @classmethod
    def from_events(cls, events: list[FeedbackEvent], pad_id: int) -> Batch:
        return cls.from_samples([Sample.of(e) for e in events], pad_id)

    @classmethod
    def from_samples(cls, events: list[Sample], pad_id: int) -> Batch:
        if not events:
            raise ValueError("cannot collate an empty batch")
        n, lengths = len(events), [len(e.response_token_ids) for e in events]
        seq_lens = [len(e.prompt_token_ids) + r for e, r in zip(events, lengths, strict=True)]
        input_ids = torch.full((n, max(seq_lens)), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, max(seq_lens)), dtype=torch.long)
        response_ids = torch.full((n, max(lengths)), pad_id, dtype=torch.long)
        mask = torch.zeros((n, max(lengths)))
        behaviour = torch.zeros((n, max(lengths)))
        for i, (e, r, s) in enumerate(zip(events, lengths, seq_lens, strict=True)):
            input_ids[i, :s] = torch.tensor(e.prompt_token_ids + e.response_token_ids, dtype=torch.long)
            attention_mask[i, :s] = 1
            response_ids[i, :r] = torch.tensor(e.response_token_ids, dtype=torch.long)
            mask[i, :r] = 1.0
            behaviour[i, :r] = torch.tensor(e.behaviour_logprobs)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_lens=torch.tensor([len(e.prompt_token_ids) for e in events], dtype=torch.long),
            response_ids=response_ids,
            mask=mask,
            scores=torch.tensor([e.reward for e in events]),
            behaviour_logprobs=behaviour,
            temperatures=torch.tensor([e.temperature for e in events]),
            event_ids=[e.sample_id for e in events],
            centred=torch.tensor([e.centred for e in events], dtype=torch.bool),
            weights=torch.tensor([e.weight for e in events], dtype=torch.float32),
        )

    def __len__(self) -> int:
        return len(self.event_ids)

    def subset(self, index: Tensor) -> Batch:
        """Rows ``index``, with the columns that are padding in all of them trimmed off."""
        seq_len = int(self.attention_mask[index].sum(1).max())
        resp_len = int(self.mask[index].sum(1).max())
        return Batch(
            input_ids=self.input_ids[index, :seq_len],
            attention_mask=self.attention_mask[index, :seq_len],
            prompt_lens=self.prompt_lens[index],
            response_ids=self.response_ids[index, :resp_len],
            mask=self.mask[index, :resp_len],
            scores=self.scores[index],
            behaviour_logprobs=self.behaviour_logprobs[index, :resp_len],
            temperatures=self.temperatures[index],
            event_ids=[self.event_ids[i] for i in index.tolist()],
            centred=self.centred[index],
            weights=self.weights[index],
        )

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})


class PolicyOutput(NamedTuple):
    logprobs: Tensor
    """[B, T] log pi(a_t | s_t) at temperature 1, 0 on padding (with gradient unless called under no_grad)"""
    values: Tensor | None
    """[B, T] V(s_t), when asked for"""
    entropy: Tensor | None
    """[B, T] entropy of pi(. | s_t) at temperature 1, when asked for"""
    tempered_logprobs: Tensor | None
    """[B, T] log_softmax(z_t / T_row)[a_t], comparable with the event's behaviour log-probs, on request"""
    log_dist: Tensor | None = None
    """[B, T, V] float32 log pi(. | s_t) over the whole vocabulary, on request (the exact KL loss term)"""


class Policy:
    """A peft LoRA model over the base, its value head, and the version its weights currently are."""

    def __init__(
        self,
        model: PeftModel,
        value_head: ValueHead,
        version: str,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.to(device)
        self.value_head = value_head.to(device)
        self.version = version
        self.device = device
        self.autocast_dtype = autocast_dtype
        """Forward passes under torch.autocast to this dtype (None: float32); see `resolve_precision`."""
        self.model.eval()  # no dropout anywhere: at the start of an update pi_theta must equal pi_old
        self._hf = model.get_base_model()
        self.vocab_size = int(self._hf.get_output_embeddings().weight.shape[0])

    @classmethod
    def fresh(
        cls,
        base_model: nn.Module,
        settings: Settings,
        device: torch.device,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> Policy:
        """A zero-initialised LoRA (outputs equal the base: this is v0) and a zero value head."""
        with torch.random.fork_rng():  # LoRA's A matrices are random (B = 0 keeps the output the base's)
            torch.manual_seed(seed)
            model = get_peft_model(base_model, lora_config(settings), adapter_name=ADAPTER_NAME)
        return cls(model, ValueHead(base_model.config.hidden_size), BASE_VERSION, device, autocast_dtype)

    @classmethod
    def from_dir(
        cls,
        base_model: nn.Module,
        directory: Path,
        version: str,
        device: torch.device,
        settings: Settings,
        autocast_dtype: torch.dtype | None = None,
    ) -> Policy:
        """Resume from a stored version: its adapter (trainable) and value head."""
        model = PeftModel.from_pretrained(
            base_model, str(directory), adapter_name=ADAPTER_NAME, is_trainable=True
        )
        _warn_if_lora_differs(model.peft_config[ADAPTER_NAME], lora_config(settings), version)
        value_head = ValueHead(base_model.config.hidden_size)
        value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_WEIGHTS)))
        return cls(model, value_head, version, device, autocast_dtype)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the LoRA weights and the value head, in a fixed order."""
        lora = [p for _, p in self.model.named_parameters() if p.requires_grad]
        return lora + list(self.value_head.parameters())

    def _autocast(self) -> torch.autocast:
        dtype = self.autocast_dtype or torch.bfloat16  # the dtype is ignored when disabled
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def forward_batch(
        self,
        batch: Batch,
        with_values: bool,
        reference: bool = False,
        with_entropy: bool = False,
        tempered: bool = False,
        with_log_dist: bool = False,
    ) -> PolicyOutput:
        """Log-probs of the served response tokens (and V, entropy, tempered log-probs on request).

        The hidden state at position p - 1 + t (p = prompt length) predicts response token t, so the
        body runs over all L positions, those T positions are gathered, and only then the LM head is
        applied: logits are [B, T, V], not [B, L, V]. ``reference=True`` runs with the adapter off.
        """
        batch = batch.to(self.device)
        body = self._hf.base_model  # the transformer without its LM head (LlamaModel for Llama)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with self._autocast():
            if reference:
                with self.model.disable_adapter():
                    hidden = body(**inputs).last_hidden_state
            else:
                hidden = body(**inputs).last_hidden_state
            resp_lens = batch.mask.sum(1).long()
            t = torch.arange(batch.mask.shape[1], device=self.device)
            last = (resp_lens - 1).clamp(min=0).unsqueeze(1)
            positions = batch.prompt_lens.unsqueeze(1) - 1 + torch.minimum(t.unsqueeze(0), last)
            gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            logits = self._hf.get_output_embeddings()(gathered)
        mask = batch.mask
        logprobs = logprobs_from_logits(logits, batch.response_ids) * mask
        values = self.value_head(gathered) * mask if with_values else None
        entropy = entropy_from_logits(logits) * mask if with_entropy else None
        tempered_lp = None
        if tempered:
            temperatures = batch.temperatures.float().cpu()
            tempered_lp = logprobs_from_logits(logits, batch.response_ids, temperatures) * mask
        log_dist = logits.float().log_softmax(-1) if with_log_dist else None
        return PolicyOutput(logprobs, values, entropy, tempered_lp, log_dist)


FEATURE_BLOCKS = 4
"""phi is 4 blocks of the hidden size: [h_T ; hbar ; xbar ; hbar * xbar] (`features`)."""


@torch.no_grad()
def features(policy: Policy, batch: Batch, layer: int | None = None, prompt: bool = True) -> Tensor:
    """The reward model's input phi(x, y) per row, [B, FEATURE_BLOCKS x H] float32 (learner/reward_model.py).

    From the base's (adapter off) hidden states h at ``layer`` (None: the middle one, L // 2 of L; -1: the
    final, normalised one), at response tokens t of T and prompt tokens s of S:

        phi(x, y) = [h_T ; hbar ; xbar ; hbar * xbar]      hbar = 1/T sum_t h_t,  xbar = 1/S sum_s h_s

    the last answer token, the answer's mean, the prompt's mean and their elementwise product (a linear
    head on it can score how an answer relates to its prompt). A middle layer's states tell a linear head
    more than the final one's, which is shaped to predict the next token (`thumbtune bench reward-features`
    in docs/BENCHMARKS.md). ``prompt=False``: [h_T ; hbar] alone, [B, 2H] (what phi was before).
    """
    batch = batch.to(policy.device)
    body = policy._hf.base_model
    k = policy._hf.config.num_hidden_layers // 2 if layer is None else layer
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with policy._autocast(), policy.model.disable_adapter():
        hidden = body(**inputs).last_hidden_state if k == -1 else _states_after(body, inputs, k)
    hidden = hidden.float()
    rows = torch.arange(len(batch), device=policy.device)
    t = torch.arange(batch.mask.shape[1], device=policy.device)
    positions = (batch.prompt_lens.unsqueeze(1) + t.unsqueeze(0)).clamp(max=hidden.shape[1] - 1)
    response = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    mask = batch.mask.unsqueeze(-1)
    h_last = response[rows, (batch.mask.sum(1).long() - 1).clamp(min=0)]
    h_mean = (response * mask).sum(1) / mask.sum(1).clamp(min=1)
    if not prompt:
        return torch.cat([h_last, h_mean], dim=-1).cpu()
    s = torch.arange(hidden.shape[1], device=policy.device)
    in_prompt = (s.unsqueeze(0) < batch.prompt_lens.unsqueeze(1)).unsqueeze(-1)
    x_mean = (hidden * in_prompt).sum(1) / in_prompt.sum(1).clamp(min=1)
    return torch.cat([h_last, h_mean, x_mean, h_mean * x_mean], dim=-1).cpu()


class _Reached(Exception):
    """Raised by `_states_after`'s forward hook: the layer it needs has run, the rest need not."""

    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


def _states_after(body: nn.Module, inputs: dict[str, Tensor], k: int) -> Tensor:
    """The body's hidden states after its first ``k`` decoder layers (``hidden_states[k]``; 0: the
    embeddings). Where the body lists its layers (``body.layers``, as Llama-style models do) the forward
    pass stops there, so the layers above cost nothing: half the pass for the middle layer."""
    layers = getattr(body, "layers", None)
    if k < 1 or layers is None:
        return body(**inputs, output_hidden_states=True).hidden_states[k]

    def stop(module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = layers[k - 1].register_forward_hook(stop)
    try:
        body(**inputs)
    except _Reached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass ended without running decoder layer {k - 1}")


def _warn_if_lora_differs(stored: LoraConfig, configured: LoraConfig, version: str) -> None:
    """A stored adapter keeps its own shape; say so when THUMBTUNE_LORA_* now asks for another."""
    got = (stored.r, stored.lora_alpha, sorted(stored.target_modules))
    want = (configured.r, configured.lora_alpha, sorted(configured.target_modules))
    if got != want:
        log.warning(
            "adapter %s was trained with LoRA (r, alpha, targets) = %s but the settings say %s; "
            "continuing with the stored shape (start a new store to change it)",
            version,
            got,
            want,
        )
