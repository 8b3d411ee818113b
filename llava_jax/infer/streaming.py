"""Text of generated tokens on the host: cutting at stop strings, and streaming a row's text piece by piece."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class TextStreamer:
    """Emits the new part of one row's decoded text, holding back what may still become a stop string or an
    incomplete character. `update(tokens)` with the row's tokens so far; `stopped` once a stop string is seen;
    `text` the answer so far (cut at the stop string); `flush()` emits the rest."""

    def __init__(self, generator, stop: tuple[str, ...], emit: Callable[[str], None]):
        self.generator, self.stop, self.emit = generator, stop, emit
        self.sent, self.text, self.stopped = 0, "", False

    def update(self, tokens: np.ndarray) -> None:
        full = self.generator.tokenizer.decode(
            np.asarray(tokens)[~np.isin(tokens, self.generator.eos_token_ids)].tolist(), skip_special_tokens=True)
        self.text = cut_at_stop(full, self.stop)
        self.stopped = len(self.text) < len(full)
        safe = len(self.text) - max([_held_back(self.text, s) for s in self.stop] + [0])
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        if safe > self.sent:
            self.emit(self.text[self.sent:safe])
            self.sent = safe

    def flush(self) -> None:
        if len(self.text) > self.sent:
            self.emit(self.text[self.sent:])
            self.sent = len(self.text)


def _held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


__all__ = ["TextStreamer", "cut_at_stop"]
