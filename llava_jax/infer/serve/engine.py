"""The serving engine: one thread owns the model and answers queued requests in batches.

Requests (`Job`s: prompt token ids, pixel values, settings, an `emit` callback) wait in a bounded queue.
The engine takes the oldest job and every waiting job with the same sampling settings, up to `max_batch`, and
decodes them together with `Generator.decode_steps`. It takes them at once when `max_batch` are waiting, or
when no request is on its way (callers wrap a request's preparation in `arriving()`) and at least as many are
waiting as the last batch had (clients of a batch come back together); otherwise it waits, at most
`batch_window_s` after the oldest job was queued or the last batch ended. A lone client never waits.

Each row is followed on the host: its text goes through its own `TextStreamer` (the template's stop strings
and the request's), and it finishes at its own stop, EOS or `max_tokens`; its answer is sent as soon as it
finishes, and the batch ends when every row has.

Jobs batch together when they decode greedily, or sample with the same temperature and top-p; a sampled job
with a seed runs alone (its output then depends only on its seed). `emit` is called on the engine thread with
`Delta(text)`, then `Finished(reason, completion_tokens)` or `Failed(message)`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from llava_jax.data.conversation import stop_strings
from llava_jax.infer.generate import Generator, TextStreamer, next_power_of_two, token_buffer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """The engine's queue holds `max_queue` jobs already."""


class EngineStopped(Exception):
    """The engine is not running."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request. ids: prompt token ids (images expanded); pixels: float32 [3, S, S] per `<image>`."""

    ids: np.ndarray
    pixels: Sequence[np.ndarray]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = True  # text pieces as they come (else the whole text at the end)
    ignore_eos: bool = False  # go on past EOS and the template's end of turn (benchmarks; vLLM's extension)
    cancelled: bool = False  # set by the caller (client gone): the row is dropped at the next step
    queued_at: float = dataclasses.field(default_factory=time.monotonic)

    def batch_key(self) -> tuple:
        if self.temperature == 0:
            return ("greedy", self.ignore_eos)
        return ("sample", self.ignore_eos, self.temperature, self.top_p, id(self) if self.seed is not None else None)


class QueuedEngine:
    """What both engines share: the bounded queue of jobs, the thread that owns the model, start and close.
    A subclass implements `_loop` (the engine thread) and `warm_up`."""

    def __init__(self, generator: Generator, *, max_batch: int, max_queue: int, seed: int):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.template_stops = tuple(stop_strings(generator.template)) if generator.template is not None else ()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._keys = itertools.count(seed)
        self._thread = threading.Thread(target=self._loop, name="llava-engine", daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit is {self.max_queue}")
            self._waiting.append(job)
            self._cond.notify_all()
        return job


class Engine(QueuedEngine):
    """Owns `generator` on one thread; `submit` jobs from any thread.

    Args:
      generator: the model's Generator (its template's stop strings end every answer).
      max_batch: most rows decoded together.
      max_queue: most jobs waiting; `submit` raises QueueFull beyond.
      batch_window_s: how long the oldest waiting job may wait for requests on their way.
      seed: base of the sampling keys of jobs without a seed.
      max_tokens: the largest max_tokens a job may ask for: every batch decodes into one token buffer that holds
        it (`token_buffer`), so the compiled programs depend on the rows and the prompt bucket only.
    """

    def __init__(self, generator: Generator, *, max_batch: int = 16, max_queue: int = 64,
                 batch_window_s: float = 0.05, seed: int = 0, max_tokens: int = 1024):
        super().__init__(generator, max_batch=max_batch, max_queue=max_queue, seed=seed)
        self.batch_window_s = batch_window_s
        self.buffer = token_buffer(max_tokens)
        self._arriving = 0
        self._last_rows, self._idle_since = 1, time.monotonic()  # the last batch's size and end
        self.batches = self.rows = 0  # batches and rows run so far (GET /health)

    def warm_up(self, max_prompt_tokens: int | None = None, sampled: bool = False,
                progress: Callable[[str], None] | None = None) -> int:
        """Compiles (or loads from the persistent cache) every program a greedy batch (and with `sampled`, a
        sampled one) of up to `max_batch` rows, with or without images, of prompts up to `max_prompt_tokens`
        runs; call before `start`. Returns the shapes compiled. (Batches with videos compile on first use: their
        frame buckets times the rows would be too many shapes; the continuous engine compiles them.)"""
        rows = sorted({next_power_of_two(n) for n in range(1, self.max_batch + 1)})  # as make_batch pads them
        images = (0, 1) if self.generator.is_llava else (0,)
        return sum(self.generator.warm_up(rows=rows, images=images, greedy=greedy, stream=True,
                                          max_prompt_tokens=max_prompt_tokens, buffer=self.buffer, progress=progress)
                   for greedy in ((True, False) if sampled else (True,)))

    @contextlib.contextmanager
    def arriving(self):
        """Marks a request on its way (being read and prepared): batches wait for it, within the window."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    # ---------------------------------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            except Exception as e:  # a failed batch fails its jobs, never the engine
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    _send(job, Failed(f"generation failed: {e}"))

    def _next_batch(self) -> list[Job] | None:
        """Blocks for the next batch: the oldest job and its compatible followers (None once closed)."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._waiting:
                    oldest = self._waiting[0]
                    key = oldest.batch_key()
                    same = [j for j in self._waiting if j.batch_key() == key][:self.max_batch]
                    wait = max(oldest.queued_at, self._idle_since) + self.batch_window_s - time.monotonic()
                    settled = not self._arriving and len(same) >= self._last_rows
                    if len(same) >= self.max_batch or wait <= 0 or settled:
                        for job in same:
                            self._waiting.remove(job)
                        return [j for j in same if not j.cancelled]
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def _serve(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.batches += 1
        self.rows += len(batch)
        first = batch[0]
        seed = first.seed if first.seed is not None else next(self._keys)
        # One token buffer for every batch (few compiled programs); the bound is traced, rows end at their own
        # max_tokens, and no row decodes past the context.
        limit = min(max(j.max_tokens for j in batch), self.generator.context_length - min(j.ids.size for j in batch))
        stops = () if first.ignore_eos else self.template_stops
        steps = self.generator.decode_steps([j.ids for j in batch], [list(j.pixels) for j in batch],
                                            max_new_tokens=max(limit, 1), temperature=first.temperature,
                                            top_p=first.top_p, rng=seed, stop=stops, ignore_eos=first.ignore_eos,
                                            buffer=self.buffer)
        rows = [_Row(self.generator, job, stops) for job in batch]
        self._last_rows = len(batch)
        try:
            for tokens, lengths, done in steps:
                for r, row in enumerate(rows):
                    row.advance(tokens[r], int(lengths[r]), bool(done[r]))
                if all(row.finished for row in rows):
                    break
        finally:
            steps.close()
            for row in rows:  # the buffer ran out before a row's max_tokens: it ends by length
                row.finish("length")
            self._idle_since = time.monotonic()


class _Row:
    """One job's row of a batch: streams its new text, ends it at its stop, EOS or max_tokens.

    The text is decoded every step when it is streamed or a request's stop string may end the row; otherwise
    once, at the end (the device ends rows at EOS and at the template's stop tokens)."""

    def __init__(self, generator: Generator, job: Job, template_stops: tuple[str, ...]):
        self.job, self.finished, self.count, self.tokens = job, False, 0, None
        self.streamer = TextStreamer(generator, template_stops + job.stop, lambda piece: _send(job, Delta(piece)))
        self.follow = job.stream or bool(job.stop)

    def advance(self, tokens: np.ndarray, length: int, done: bool) -> None:
        if self.finished:
            return
        if self.job.cancelled:
            self.finished = True
            return
        self.count, self.tokens = min(length, self.job.max_tokens), tokens
        if self.follow:
            self.streamer.update(tokens[:self.count])
        if self.streamer.stopped or (done and length <= self.job.max_tokens):
            self.finish("stop")
        elif self.count >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.tokens is not None:
            self.streamer.update(self.tokens[:self.count])
            reason = "stop" if self.streamer.stopped else reason
        self.streamer.flush()
        _send(self.job, Finished(reason, self.count))


def _send(job: Job, event: Event) -> None:
    """Delivers an event; a caller that went away (closed event loop) cancels its job."""
    try:
        job.emit(event)
    except Exception:  # noqa: BLE001 - the receiver is gone; the engine goes on
        job.cancelled = True


__all__ = ["Engine", "Job", "Delta", "Finished", "Failed", "QueueFull", "EngineStopped"]
