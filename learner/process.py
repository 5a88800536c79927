"""`thumbtune learn`, the process: threads, /metrics, signals, and its rank under data parallelism.

One process: the `KafkaLearner` loop until SIGINT/SIGTERM. Under torchrun (WORLD_SIZE > 1,
learner/distributed.py) rank 0 runs that loop, serves /metrics and tells the other ranks to stop when it
does; the other ranks follow it (`Learner.follow`) and end with the default action of SIGINT/SIGTERM, which
torchrun sends them all together.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch

from learner import metrics
from learner.config import LearnerSettings
from learner.consumer import KafkaLearner
from learner.distributed import DataParallel, from_environment, leave
from learner.progress import Progress
from learner.trainer import Learner
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)


def run_learner(settings: Settings, learner_settings: LearnerSettings) -> int:
    """`thumbtune learn`: train until SIGINT/SIGTERM, exit 0."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    dp = from_environment()
    try:
        if dp.leader:
            return _lead(settings, learner_settings, dp)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        Learner(settings, learner_settings, dp=dp).follow()
        log.info("rank %d: rank 0 stopped; stopping", dp.rank)
        return 0
    finally:
        leave(dp)


def _lead(settings: Settings, learner_settings: LearnerSettings, dp: DataParallel) -> int:
    """The Kafka loop (rank 0 of ``dp``, or the only process), /metrics, and the other ranks' stop."""
    server = metrics.start_metrics_server(learner_settings.metrics_host, learner_settings.metrics_port)
    progress = Progress(learner_settings.batch_size)
    loop = KafkaLearner(settings, learner_settings, Learner(settings, learner_settings, dp=dp), progress)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        loop.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress:
            versions = loop.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
    if not loop.interrupted:  # after an interrupted update the other ranks are inside a collective, or gone
        loop.learner.stop_followers()
    written = " ".join(versions) or "none"
    log.info("learner stopped at %s; versions written this run: %s", loop.learner.version, written)
    return 0
