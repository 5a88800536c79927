"""`thumbtune learn --from-file events.jsonl --once`: train on a file of events instead of Kafka.

One FeedbackEvent JSON per line. Events are admitted in file order (malformed, mismatched and
repeated ones are skipped and counted), trained in batches of batch_size, and a final partial
batch is trained if it holds at least min_batch events. Each update writes one version whose
manifest lists its event ids (offsets stay empty: a file has none). Replaying the same file into
the same store again trains nothing new: the store's manifests say which events were trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from learner.config import LearnerSettings
from learner.trainer import Learner
from thumbtune.core.contract import FeedbackEvent
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)


def run_from_file(
    settings: Settings,
    learner_settings: LearnerSettings,
    path: str | Path,
    once: bool = True,
    learner: Learner | None = None,
) -> list[str]:
    """Train on every event in ``path``; return the versions written, oldest first."""
    if not once:
        raise NotImplementedError("following a growing file is not supported; use --once, or Kafka")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no events file at {path} (expected one FeedbackEvent JSON per line)")
    learner = learner if learner is not None else Learner(settings, learner_settings)
    batch_size, min_batch = learner_settings.batch_size, learner_settings.min_batch
    log.info(
        "replaying %s into %s from %s (batch %d, min %d)",
        path,
        learner.store,
        learner.version,
        batch_size,
        min_batch,
    )

    versions: list[str] = []
    pending: list[FeedbackEvent] = []

    def train(events: list[FeedbackEvent]) -> None:
        version = learner.train(events)
        if version is not None:
            versions.append(version)

    with path.open("rb") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            event = learner.admit(line, f"{path.name}:{lineno}")
            if event is None:
                continue
            pending.append(event)
            if len(pending) >= batch_size:
                pending = learner.drop_stale(pending)  # staleness is judged against the version trained now
            if len(pending) >= batch_size:
                train(pending[:batch_size])
                pending = pending[batch_size:]

    pending = learner.drop_stale(pending)
    if len(pending) >= min_batch:
        train(pending)
    elif pending:
        log.warning(
            "%d events left untrained: fewer than THUMBTUNE_LEARNER_MIN_BATCH=%d", len(pending), min_batch
        )
    log.info(
        "replay of %s done: versions %s, skipped %s", path, versions or "none", dict(learner.skips.total)
    )
    return versions
