"""Incremental detokenization with stop strings, safe for streaming.

Text is only released once it can no longer become part of a stop string, and never in the
middle of a multi-byte character, so a client never sees text that is later taken back.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]) -> None:  # noqa: ANN001 - any HF tokenizer
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._tokens: list[int] = []
        self.emitted = ""
        """The text released so far."""

    def add(self, token_id: int, final: bool = False) -> tuple[str, bool]:
        """Add one token. Returns (newly releasable text, whether a stop string was hit).

        final: the sequence ends after this token, so nothing needs holding back.
        """
        self._tokens.append(token_id)
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        hit = self._find_stop(text)
        if hit is not None:
            text, final = text[:hit], True
        elif not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return "", False
            text = text[: len(text) - self._held_back(text)]
        if len(text) <= len(self.emitted):
            return "", hit is not None
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta, hit is not None

    def _find_stop(self, text: str) -> int | None:
        # Only the tail can hold a new match: search from just before what was already released.
        start = max(0, len(self.emitted) - max((len(s) for s in self._stop), default=0))
        found = [i for s in self._stop if (i := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
