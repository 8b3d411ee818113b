"""Text of generated tokens on the host: cutting at stop strings, and streaming a row's text piece by piece with
constant work per token (`IncrementalDecoder`)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class IncrementalDecoder:
    """The decoded text of a growing token sequence, with constant work per token (the scheme of vLLM's
    `detokenize_incrementally`): a step decodes only the window from the tokens of the last emitted piece to the
    end, and the new text is what that window adds to the window without the new tokens. Text is added once
    its characters are complete (a byte-fallback character spans several tokens); `finish()` adds the rest as a
    full decode gives it. `text` always equals the start of `tokenizer.decode(ids, skip_special_tokens=True)`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self.prefix = self.read = 0  # the window's start; where the tokens not yet turned into text start

    def _window_delta(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        return after[len(before):] if len(after) > len(before) else ""

    def push(self, ids: Sequence[int]) -> str:
        """Appends token ids -> the text they complete ("" while a character is incomplete)."""
        self.ids += [int(i) for i in ids]
        delta = self._window_delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text of the pending tokens, incomplete characters included (as a full decode)."""
        delta = self._window_delta()
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class TextStreamer:
    """Emits the new part of one row's decoded text, holding back what may still become a stop string.
    `update(tokens)` with the row's tokens so far (only the new ones are decoded); `stopped` once a stop string
    is seen; `text` the answer so far (cut at the stop string); `flush()` emits the rest."""

    def __init__(self, generator, stop: tuple[str, ...], emit: Callable[[str], None]):
        self.generator, self.stop, self.emit = generator, stop, emit
        self.decoder = IncrementalDecoder(generator.tokenizer)
        self.consumed, self.sent, self.text, self.stopped = 0, 0, "", False

    def update(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        new = tokens[self.consumed:]
        self.consumed = max(self.consumed, tokens.size)
        new = new[~np.isin(new, self.generator.eos_token_ids)]
        if new.size and not self.stopped:
            start = len(self.decoder.text)
            self.decoder.push(new.tolist())
            self._cut(start)
        safe = len(self.text) - max([_held_back(self.text, s) for s in self.stop] + [0])
        if safe > self.sent:
            self.emit(self.text[self.sent:safe])
            self.sent = safe

    def _cut(self, start: int) -> None:
        """The text up to the first stop string, searched in what was added after `start` (and the stop's length
        before it)."""
        text = self.decoder.text
        hits = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
        self.stopped = bool(hits)
        self.text = text[:min(hits)] if hits else text

    def flush(self) -> None:
        if not self.stopped:
            start = len(self.decoder.text)
            self.decoder.finish()
            self._cut(start)
        if len(self.text) > self.sent:
            self.emit(self.text[self.sent:])
            self.sent = len(self.text)


def _held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


__all__ = ["TextStreamer", "IncrementalDecoder", "cut_at_stop"]
