"""Incremental detokenization for streaming: token ids in, text deltas out, stop strings honoured.

Decoding each new token alone is wrong in two ways: a byte-level BPE token can end in the middle
of a UTF-8 character (the text then ends in U+FFFD until the next token completes it), and
whether a space belongs before a word depends on its neighbours. So the whole output is decoded
and the new text is what extends the text already sent. Two things are held back until they are
certain: an incomplete character, and a tail that could still grow into a stop string (the text is
cut before a stop string and the stop string is never sent, as vLLM does).
"""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """The text of one request's output as it grows. ``stop``: strings that end it (cut before them)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.stopped_by: str | None = None

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the text that is now certain (all of the rest when ``final``)."""
        self.token_ids.extend(token_ids)
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        end = len(full)
        for s in self.stop:
            if s in full:
                self.stopped_by, end, final = s, full.index(s), True
                break
        if not final:
            while end > self.sent and full[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            end -= max((_held_back(full[:end], s) for s in self.stop), default=0)
        end = max(end, self.sent)
        delta, self.sent = full[self.sent:end], end
        return delta


def _held_back(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with (it may still become ``stop``)."""
    return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
