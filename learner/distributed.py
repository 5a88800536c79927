"""Data parallelism: N learner processes train one policy (`thumbtune learn` under torchrun).

    torchrun --nproc-per-node N -m thumbtune.cli learn

Rank 0 is the learner a single process is: it reads Kafka, cuts batches, fits the reward model, samples its
own answers, writes, announces and commits versions. Before each PPO update it sends the other ranks what
the update trains on (learner/trainer.py: the samples, the version they train from and the state the update
reads; `Learner.follow` receives them) and every rank runs
`ppo_update` on that batch with a share of its rows (learner/update.py):

- step 1, the no-grad passes: rank r computes the r-th of N contiguous near-equal row slices and the
  outputs are all-gathered, so each rank holds log pi_old, V_old, log pi_ref of the whole batch;
- steps 2-5 and 7 run in full on every rank from those same tensors, so every rank agrees on them;
- step 6: every rank draws the same minibatch permutation (the same seeded generator), computes its slice
  of each minibatch, and backpropagates each part p's loss times n_p / n_mb, its share of the minibatch's
  response tokens (every loss term is a token mean). The gradients are summed over the ranks:

      g = sum_r sum_{p in parts of rank r} (n_p / n_mb) * grad L_p

  which is the single process's minibatch gradient (the same sum, split differently), and every rank
  clips and steps its own AdamW on the same g: the weights stay equal without being sent.

The other ranks (`follow`) keep no reward model, prompts or rater window of their own: rank 0 does that
work and only sends its outcome. A rank whose weights are not the version an update trains from (rank 0
stepped off a refused head, or saving failed) restores that version from the adapter store first, so the
ranks meet again on a durable state. SIGINT/SIGTERM end every rank at once: a rank 0 that is stopping
treats a peer gone mid-update as the stop it is (a version already saved is announced, nothing else is
committed; `thumbtune learn` re-reads from the newest manifest, as after any stop). A rank dies with
torchrun's agent, its parent, even by SIGKILL.

Collectives run over gloo on CPU and NCCL on CUDA (rank r on GPU LOCAL_RANK); one process on its own
(WORLD_SIZE unset or 1) uses `SINGLE`, whose collectives do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the N learner processes, and the collectives the update uses."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    """Where collectives put their tensors (NCCL needs them on the GPU)."""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def rows(self, index: Tensor) -> Tensor:
        """This rank's contiguous slice of ``index`` (the r-th of N near-equal slices; may be empty)."""
        return index if self.world == 1 else index.tensor_split(self.world)[self.rank]

    def gather_rows(self, part: Tensor, sizes: list[int]) -> Tensor:
        """All ranks' row slices of one tensor, in rank order: rank r's ``part`` has ``sizes[r]`` rows and
        the same trailing shape everywhere."""
        if self.world == 1:
            return part
        most = max(sizes)
        padded = torch.zeros((most, *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[: len(part)] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over the ranks (a rank that computed nothing
        for a parameter contributes zeros)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).clone()

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (every rank passes the same keys in the same order)."""
        if self.world == 1 or not values:
            return dict(values)
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(values, total.tolist(), strict=True))

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; the others pass nothing)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's parameters set to rank 0's."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


SINGLE = DataParallel()
"""One process on its own: every collective is the identity."""


def from_environment(backend: str | None = None) -> DataParallel:
    """`SINGLE`, or this process's place in the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), joining it: gloo on CPU, NCCL when CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    _die_with_parent()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    log.info("learner rank %d of %d (%s)", rank, world, backend)
    return DataParallel(rank, world, device)


def _die_with_parent() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL to torchrun's process group (or to
    torchrun) would leave the ranks running, rank 0 still in the consumer group holding the partitions: ask
    Linux to SIGKILL this rank when its parent, torchrun's agent, dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux/glibc: torchrun's own shutdown is all there is
        return
    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): a killed torchrun leaves this rank running",
            ctypes.get_errno(),
        )
    elif os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def leave(dp: DataParallel) -> None:
    """Leave the process group (a no-op for `SINGLE`)."""
    if dp.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
