"""What the benchmarks share: their worker processes, the base model, and CPU and memory accounting.

A benchmark's figures come from processes of its own (so each peak RSS is its own), and the machine's
other work is measured beside them (the 'other CPU' columns: other processes' cores while it ran).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

from learner.policy import Batch, cpu_has_fast_bf16
from thumbtune.core.base_model import LoadedBase, load_base
from thumbtune.core.contract import FeedbackEvent, FeedbackKind, Message, SamplingParams, reward_for
from thumbtune.core.settings import Settings

REPOSITORY = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """What a benchmark's results record of the machine they came from: its cores, CPU model, whether the
    CPU has native bf16 (the learner's 'auto' precision trains in bf16 autocast only then, ~1.6x faster
    per update in the loop) and torch. Timings from machines that differ here are not comparable."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__,
    }


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's worker (``python -m benchmarks.<name> ...``): the checkout on the
    path whatever the working directory, unbuffered output."""
    path = os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def worker_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def load(settings: Settings) -> LoadedBase:
    """The configured base model, with THUMBTUNE_NUM_THREADS applied."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    return load_base(settings)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time used by process ``pid`` (user + system), or with None the busy time of the whole machine
    since boot (/proc/stat: all but idle and iowait)."""
    tck = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError, ValueError, IndexError):
        if pid is None:  # user nice system idle iowait irq softirq steal
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            return (sum(f) - f[3] - f[4]) / tck
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tck
    return 0.0


def own_cpu_seconds(children: bool = False) -> float:
    """This process's CPU time (and its reaped children's, with ``children``)."""
    t = os.times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


class CpuNoise:
    """How many cores processes other than this one (its children, and ``pid``) kept busy since it was made:
    others' work on the machine is noise in a benchmark's figures."""

    def __init__(self, pid: int | list[int] | None = None) -> None:
        self.pids = [] if pid is None else [pid] if isinstance(pid, int) else list(pid)
        self.t0, self.start = time.perf_counter(), self._ours_and_all()

    def _ours_and_all(self) -> tuple[float, float]:
        servers = sum(cpu_seconds(pid) for pid in self.pids)
        return own_cpu_seconds(children=True) + servers, cpu_seconds()

    def cores(self) -> float:
        (ours0, all0), (ours1, all1) = self.start, self._ours_and_all()
        return max(0.0, (all1 - all0) - (ours1 - ours0)) / max(time.perf_counter() - self.t0, 1e-9)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, alive now (a server that forks workers, vLLM's engine core)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def proc_status(pid: int | str, key: str) -> int | None:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM), None once the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(ln for ln in lines if ln.startswith(key + ":")).split()[1]) * 1024
    return None


def peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes."""
    peak = proc_status("self", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Window:
    """One timed update: wall seconds, this process's CPU seconds, and the cores other processes kept busy
    meanwhile (others' work on this machine is noise; the CPU seconds are less sensitive to it)."""

    def __init__(self) -> None:
        self.t0, self.own0, self.all0 = time.perf_counter(), own_cpu_seconds(), cpu_seconds()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own, busy = own_cpu_seconds() - self.own0, cpu_seconds() - self.all0
        return {"update_s": wall, "cpu_s": own, "other_cores": max(0.0, busy - own) / max(wall, 1e-9)}


@torch.no_grad()
def warm_up(model: torch.nn.Module, batch: Batch, rows: int) -> None:
    """The same untimed no-grad forward of the plain base on ``rows`` rows of a batch, in every contender's
    process before its timed window."""
    mb = batch.subset(torch.arange(rows))
    model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, logits_to_keep=1)


def thumb_event(
    base: LoadedBase,
    ids: tuple[str, str, str],
    conversation: list[dict[str, str]],
    prompt: list[int],
    sampled: tuple[list[int], list[float]],
    *,
    up: bool,
    adapter_version: str,
    max_tokens: int,
    eos: list[int],
) -> FeedbackEvent:
    """The event a thumb on an answer the benchmark sampled (T = 1, no top-p) becomes, as a server would
    record it. ``ids``: (event id, response id, completion id); ``sampled``: the answer's tokens and
    behaviour log-probs (`learner.rollout.sample_with_logprobs`)."""
    event_id, response_id, completion_id = ids
    answer, logprobs = sampled
    value = "up" if up else "down"
    return FeedbackEvent(
        event_id=event_id,
        response_id=response_id,
        completion_id=completion_id,
        api_key_id=None,
        answered_at=1.0,
        rated_at=2.0,
        base_model=base.model_id,
        base_fingerprint=base.fingerprint,
        adapter_version=adapter_version,
        messages=[Message(**m) for m in conversation],
        prompt_token_ids=prompt,
        response_token_ids=answer,
        behaviour_logprobs=logprobs,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens),
        finish_reason="stop" if answer[-1] in eos else "length",
        kind=FeedbackKind.thumb,
        value=value,
        reward=reward_for(FeedbackKind.thumb, value),
    )
