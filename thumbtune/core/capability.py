"""The capability probe: everyday instructions with checkable answers, answered greedily.

Approval alone can be won by flattering users, so a version must also keep what the base could do. Each
item is a prompt and the strings any of which makes the answer right (case-insensitive, on word
boundaries). The server gates admission on it (service/adapters/capability.py: a version that gets more of
them wrong than live does, by more than THUMBTUNE_ADAPTER_CAPABILITY_MAX_LOSSES, is refused); the
benchmarks report it per version (benchmarks/evaluate.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ITEMS = Path(__file__).parent / "data" / "capability.jsonl"


@dataclass(frozen=True)
class CapabilityItem:
    id: str
    prompt: str
    accept: tuple[str, ...]

    def passes(self, answer: str) -> bool:
        """Any accepted string appears in the answer: case-insensitive, on word boundaries."""
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in self.accept)


def load_capability(path: Path = ITEMS) -> list[CapabilityItem]:
    text = path.read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [CapabilityItem(i["id"], i["prompt"], tuple(i["accept"])) for i in items]
