"""Which users a canary serves: a sticky, per-canary random share.

A request that names no version (``model`` = ``thumbtune``) goes to the canary when

    h(canary, subject) = int(sha256(f"{canary}:{subject}")[:8], 16) / 16^8  <  share

where the subject is the request's ``user`` field, else its API key, else (the chat page) a per-browser
id the page keeps and sends as ``user``. The hash is uniform on [0, 1), so a share of the subjects lands
on the canary; the same subject always lands on the same side for one canary (one user sees one version
consistently), and each new canary draws its users afresh, so no user is everyone's guinea pig. A
request with no subject at all stays on live: it could not be counted as one user.
"""

from __future__ import annotations

import hashlib


def canary_draw(canary: str, subject: str) -> float:
    """h(canary, subject) in [0, 1)."""
    digest = hashlib.sha256(f"{canary}:{subject}".encode()).hexdigest()
    return int(digest[:8], 16) / 16**8


def serves_canary(canary: str, subject: str | None, share: float) -> bool:
    return subject is not None and share > 0 and canary_draw(canary, subject) < share
