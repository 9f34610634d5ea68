"""One answer's text while it is generated: incremental decoding, stop strings, and what may be shown so far.

:class:`RowText` decodes a row's tokens as they come (the whole answer again each step: answers are short and a
tokenizer's decoder is only guaranteed right on whole sequences) and keeps three rules:

* the answer is the decoded text cut before the first stop string, surrounding whitespace trimmed: exactly what
  :func:`dama_engine.forward.generate` returns for the same tokens when there is no stop string;
* a stream never shows text that may still turn out to be part of a stop string: the longest end of the text
  that starts some stop string is held back until the next token settles it;
* a stream never shows text that may still change: an incomplete UTF-8 character (a byte-level BPE token that
  ends mid-character decodes to U+FFFD) and trailing whitespace (trimmed if the answer ends there) wait for the
  next token.

So the deltas a stream sends concatenate to the final answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class RowText:
    """The text of one row's answer as its tokens arrive (EOS and padding are never added)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.raw = ""  # the decoded tokens, special tokens dropped
        self.cut: int | None = None  # where the first stop string starts in ``raw``, once one appeared
        self.sent = ""  # what :meth:`delta` has handed out so far

    def add(self, token: int) -> bool:
        """Append one generated token; True when a stop string now appears in the text (the answer ends there)."""
        self.ids.append(token)
        self.raw = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop and self.cut is None:
            found = [index for stop in self.stop if (index := self.raw.find(stop)) >= 0]
            if found:
                self.cut = min(found)
        return self.cut is not None

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def answer(self) -> str:
        """The final answer: the text before the first stop string, surrounding whitespace trimmed."""
        return (self.raw if self.cut is None else self.raw[: self.cut]).strip()

    def visible(self) -> str:
        """What may be shown now: a prefix of the final answer, however the answer goes on."""
        if self.cut is not None:
            return self.answer()
        shown = self.raw[: len(self.raw) - self._stop_prefix_length(self.raw)]
        return shown.rstrip(REPLACEMENT).strip()

    def delta(self, *, final: bool = False) -> str:
        """The text not handed out yet (all of the answer's rest when ``final``)."""
        shown = self.answer() if final else self.visible()
        if not shown.startswith(self.sent):
            # A decoder that rewrites earlier text when later tokens come (none of the supported families' does):
            # what was sent stands, the rest of the answer cannot be expressed as an addition to it.
            log.warning("a streamed answer's decoded text changed after it was sent; its rest is dropped")
            return ""
        delta, self.sent = shown[len(self.sent) :], shown
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        """The length of the longest end of ``text`` that some stop string starts with (0: none)."""
        longest = max((len(stop) for stop in self.stop), default=0)
        for length in range(min(longest - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stop):
                return length
        return 0
