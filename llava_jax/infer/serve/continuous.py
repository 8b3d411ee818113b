"""The continuous-batching engine: a fixed number of decode slots, requests joining and leaving between steps.

One thread owns the model and a `slots.Slots` state of `max_batch` rows (slots) of one KV cache. Between two decode
steps it takes waiting jobs into free slots (each one prefilled alone at its prompt bucket and inserted into its
slot: `slots.prefill_request` + `slots.insert`), then runs one decode step over all slots (`slots.generate`).
A job finishes at its EOS, the template's stop tokens, a stop string, `max_tokens` or the slot's length, and
its slot is free for the next step; a cancelled job's slot is freed at the next step. Every program has static
shapes (slots, slot length, prompt buckets; a step runs the first 1, 2, 4, ... slots, up to the last busy one) and
is compiled by `warm_up`, so nothing compiles on the request path. Free slots are taken lowest first.

A prompt that starts with the template's system prompt reuses its KV, computed once at start-up
(`shared_prefix`); only the rest is prefilled. Chunked prefill of long prompts is not done: a prompt is prefilled
whole, between two decode steps.

Each slot's text goes through its own `TextStreamer` (incremental: constant work per token); stop strings are
tokenized once per request set (`Generator._stop_ids`' cache). Sampled slots draw from their own key (the
request's seed, else the engine's counter) folded with their step, so a seeded answer depends on its seed only.
Same interface as the windowed `engine.Engine` (`submit`, `arriving`, `warm_up`, `close`, `waiting`, `alive`,
`batches`, `rows`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import jax
import numpy as np

from llava_jax.infer import slots as slot_programs
from llava_jax import vision_layout
from llava_jax.infer.generate import Generator, TextStreamer, Tiles, next_power_of_two
from llava_jax.infer.serve.engine import Delta, Failed, Finished, Job, QueuedEngine, _send

log = logging.getLogger(__name__)


class ContinuousEngine(QueuedEngine):
    """Owns `generator` on one thread; `submit` jobs from any thread.

    Args:
      generator: the model's Generator (its template's stop strings end every answer).
      max_batch: decode slots (rows decoded together).
      max_queue: most jobs waiting; `submit` raises QueueFull beyond.
      seed: base of the sampling keys of jobs without a seed.
      max_tokens: the largest max_tokens a job may ask for.
      max_prompt_tokens: the longest prompt (default: the context); with `max_tokens` it sets each slot's cache
        length: min(context, max_prompt_tokens + max_tokens), at least the longest prompt's bucket.
      share_prefix: compute the KV of the template's system prompt once (`shared_prefix`) and prefill only the
        rest of every prompt that starts with it.
      max_prefill_rows: most waiting requests prefilled together (AnyRes models: 1).
      prefill_tokens: most prompt tokens prefilled between two decode steps, which bounds the pause of the
        decoding slots: waiting requests are taken together up to it (at least one), and a prompt longer than it
        (its bucket) is prefilled in chunks (of the largest power of two within it), one between two steps.
    """

    def __init__(self, generator: Generator, *, max_batch: int = 16, max_queue: int = 64, seed: int = 0,
                 max_tokens: int = 1024, max_prompt_tokens: int | None = None, share_prefix: bool = True,
                 max_prefill_rows: int = 8, prefill_tokens: int = 1024):
        super().__init__(generator, max_batch=max_batch, max_queue=max_queue, seed=seed)
        if max_prefill_rows < 1 or prefill_tokens < 1:
            raise ValueError(f"max_prefill_rows and prefill_tokens must be >= 1, got {max_prefill_rows} and "
                             f"{prefill_tokens}")
        # AnyRes prompts are prefilled one at a time (their tile counts set the programs' shapes)
        self.max_prefill_rows = 1 if generator.is_anyres else min(max_prefill_rows, max_batch)
        self.prefill_tokens = prefill_tokens
        self.chunk = 1 << (prefill_tokens.bit_length() - 1)  # a longer prompt is prefilled in chunks of this
        self._chunking: _Chunking | None = None  # the long prompt being prefilled, a chunk between two steps
        context = generator.context_length
        self.longest_prompt = min(max_prompt_tokens or context, context)
        self.slot_length = max(min(context, self.longest_prompt + max_tokens), generator.bucket(self.longest_prompt))
        self.slots = slot_programs.empty_slots(generator.model, max_batch, self.slot_length)
        self._rows: list[_SlotRow | None] = [None] * max_batch
        self.batches = self.rows = self.steps = 0  # admission rounds, jobs admitted, decode steps (GET /health)
        self.prefills = 0  # prefill calls (a group of jobs each)
        self._blank_key = np.zeros_like(jax.random.key_data(jax.random.key(0)))  # greedy rows' key
        self.prefix_ids = shared_prefix(generator) if share_prefix else None
        self.prefix = self._prefill_prefix() if self.prefix_ids is not None else None
        self.prefix_hits = 0  # prompts that reused the prefix's KV

    def _prefill_prefix(self) -> slot_programs.Prefilled:
        gen, ids = self.generator, self.prefix_ids[None]
        static = slot_programs.SlotStatic(gen.graphdef, True)
        return slot_programs.prefill_requests(gen.state, ids, np.ones_like(ids), None, None, self._keys_of([None]),
                                              np.zeros(1, np.float32), np.ones(1, np.float32), static=static)

    def warm_up(self, max_prompt_tokens: int | None = None, sampled: bool = False,
                progress: Callable[[str], None] | None = None, video_frames: int = 32) -> int:
        """Compiles (or loads from the persistent cache) the prefill and insert of every prefill shape of prompts
        up to `max_prompt_tokens` (`prefill_shapes`), and the decode step: greedy (and with `sampled`, sampled)
        requests; OneVision models also a video of `video_frames` frames. Call before `start`. Returns the prefill
        shapes compiled."""
        shapes = self.prefill_shapes(max_prompt_tokens, video_frames)
        modes = (0.0, 1.0) if sampled else (0.0,)
        for k, (rows, vision, width, prefixed) in enumerate(shapes):
            if progress is not None:
                media = (f"{vision[0]} image tile(s), {vision[1]} video frame(s)" if isinstance(vision, tuple)
                         else f"{vision} image(s)")
                progress(f"compiling {k + 1}/{len(shapes)}: {rows} row(s), {media}, prompt bucket {width}"
                         f"{' after the system prompt' if prefixed else ''}")
            batch = self._warm_batch(rows, vision, width)
            for temperature in modes:
                jobs = [Job(ids, [], 1, lambda e: None, temperature=temperature) for ids in batch.ids]
                if width > self.prefill_tokens:  # a long prompt: in chunks
                    self._start_chunked_batch(0, jobs[0], batch, prefixed)
                    while self._chunking is not None:
                        self._next_chunk()
                    self._rows[0] = None
                else:
                    self._prefill_and_insert(batch, [0] * rows, jobs, self.prefix if prefixed else None)
        for temperature in modes:
            for rows in self.step_rows:
                self._decode_step(np.arange(self.max_batch) < rows, greedy=temperature == 0)
        self.prefix_hits = self.prefills = 0
        return len(shapes)

    def prefill_shapes(self, max_prompt_tokens: int | None = None, video_frames: int = 32) -> list[tuple]:
        """(rows, vision, prompt bucket, after the prefix) of every prefill a request of up to
        `max_prompt_tokens` tokens takes: LLaVA / text models a prompt with 0 or 1 image (vision: its image count)
        in groups of 1, 2, 4, .. `max_prefill_rows` rows within `prefill_tokens`; AnyRes models one prompt at a
        time with an image's tile buckets or (OneVision) a video's frame buckets (vision: (tiles, frames);
        `Generator.anyres_shapes`). Prompts with several images or videos take other shapes, compiled on first
        use."""
        gen = self.generator
        longest = min(max_prompt_tokens or self.longest_prompt, self.longest_prompt)
        n0 = 0 if self.prefix_ids is None else self.prefix_ids.size
        # the whole prompt, and (with a shared prefix) the rest after it: up to longest - n0 tokens
        starts = [(False, longest)] + ([(True, longest - n0)] if n0 else [])
        if gen.is_anyres:  # an image, or (OneVision) a video
            media = [((0, 1), (0,))] + ([((0,), (1,))] if gen.video_token_index is not None else [])
            shapes = sorted({(1, (tiles, frames), width, prefixed) for prefixed, most in starts
                             for images, videos in media for _, tiles, frames, width in
                             gen.anyres_shapes((1,), images, videos, video_frames, most)})
        else:
            rows = [1 << k for k in range(next_power_of_two(self.max_prefill_rows).bit_length())]
            shapes = [(r, i, width, prefixed) for prefixed, most in starts for i in ((0, 1) if gen.is_llava else (0,))
                      for width in gen.prompt_buckets(i, most) for r in rows
                      if r == 1 or r * width <= self.prefill_tokens]
        # prompts over prefill_tokens are prefilled in chunks, whose programs do not depend on their bucket
        short = [shape for shape in shapes if shape[2] <= self.prefill_tokens]
        long = {(r, vision, prefixed): width for r, vision, width, prefixed in shapes if width > self.prefill_tokens}
        return short + [(r, vision, width, prefixed) for (r, vision, prefixed), width in long.items()]

    def _warm_batch(self, rows: int, vision, width: int):
        """A batch of a prefill shape (values do not matter)."""
        gen = self.generator
        return gen._warm_batch(rows, *vision, width) if gen.is_anyres else gen._warm_llava_batch(rows, vision, width)

    @property
    def step_rows(self) -> list[int]:
        """The row counts a decode step runs (the first slots, up to the last busy one): powers of two and all."""
        return sorted({min(next_power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)})

    @property
    def busy_slots(self) -> int:
        return sum(row is not None for row in self._rows)

    @contextlib.contextmanager
    def arriving(self):
        """The windowed engine's hint (a request on its way); a continuous engine never waits for one."""
        yield

    # ---------------------------------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            admitted = self._next_jobs()
            if admitted is None:
                return
            if admitted:
                self.batches += 1
                self.rows += len(admitted)
            try:
                self._admit(admitted)
                self._next_chunk()
                if any(row is not None for row in self._rows):
                    self._step()
            except Exception as e:  # a failed step fails its jobs, never the engine
                log.exception("decode step failed")
                self._fail_all(f"generation failed: {e}")

    def _fail_all(self, message: str) -> None:
        for s, row in enumerate(self._rows):
            if row is not None:
                _send(row.job, Failed(message))
                self._rows[s] = None
        if self._chunking is not None:
            _send(self._chunking.job, Failed(message))
            self._chunking = None
        self.slots = slot_programs.empty_slots(self.generator.model, self.max_batch, self.slot_length)

    def _next_jobs(self) -> list[tuple[int, Job]] | None:
        """Waiting jobs paired with free slots, oldest first, their prompts within `prefill_tokens` (at least
        one job; a long prompt only while no other is being prefilled in chunks); waits while there is nothing to
        do; None once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._chunking and not any(self._rows):
                self._cond.wait()
            if self._closed:
                return None
            reserved = None if self._chunking is None else self._chunking.slot
            free = [s for s, row in enumerate(self._rows) if row is None and s != reserved]
            taken, tokens = [], 0
            while free and self._waiting:
                job = self._waiting[0]
                long = self._is_long(job.ids)
                if (taken and tokens + job.ids.size > self.prefill_tokens) or (long and reserved is not None):
                    break
                reserved = free[0] if long else reserved
                self._waiting.popleft()
                if not job.cancelled:
                    taken.append((free.pop(0), job))
                    tokens += job.ids.size
            return taken

    def _admit(self, admitted: list[tuple[int, Job]]) -> None:
        """Prefills the admitted jobs into their slots, in groups, and follows their first tokens; a group that
        fails is retried one job at a time, so that a bad request fails alone."""
        short = []
        for slot, job in admitted:
            if not self._is_long(job.ids):
                short.append((slot, job))
                continue
            try:
                self._start_chunked(slot, job)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                log.exception("prefill failed")
                self._chunking = None
                _send(job, Failed(f"generation failed: {e}"))
        for group in self._prefill_groups(short):
            try:
                self._start_rows(group)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                for slot, _ in group:
                    self._rows[slot] = None
                if len(group) > 1:
                    for one in group:
                        self._admit([one])
                    continue
                log.exception("prefill failed")
                _send(group[0][1], Failed(f"generation failed: {e}"))
        self._release_finished()

    def _start_chunked(self, slot: int, job: Job) -> None:
        """Starts the prefill in chunks of a long prompt (its images embedded now) into a reserved slot."""
        self._check_length(job)
        prefixed = self._uses_prefix(job.ids)
        batch = self.generator.make_batch([self._rest(job.ids)], [list(job.pixels)])
        self.prefix_hits += prefixed
        self._start_chunked_batch(slot, job, batch, prefixed)

    def _start_chunked_batch(self, slot: int, job: Job, batch, prefixed: bool) -> None:
        """The prompt left padded to one width for all (the longest prompt's bucket and a chunk, so that its
        programs compile once per image shape), its chunks ending at the last column."""
        gen = self.generator
        width, real = gen.bucket(self.longest_prompt) + self.chunk, int(batch.mask.sum())
        ids, mask = np.full((1, width), gen.pad_id, np.int32), np.zeros((1, width), np.int32)
        ids[:, -batch.ids.shape[1]:], mask[:, -batch.ids.shape[1]:] = batch.ids[:1], batch.mask[:1]
        chunked = slot_programs.start_chunked(gen.state, ids, mask, batch.pixels, batch.image_inputs,
                                              self.prefix if prefixed else None,
                                              static=slot_programs.SlotStatic(gen.graphdef, True),
                                              length=self.slot_length + self.chunk)
        starts = range(width - -(-real // self.chunk) * self.chunk, width, self.chunk)
        self._chunking = _Chunking(slot, job, chunked, list(starts))

    def _next_chunk(self) -> None:
        """Prefills the next chunk of the long prompt in progress; after its last, its first token, and the slot
        is its."""
        work = self._chunking
        if work is None:
            return
        gen, job = self.generator, work.job
        try:
            static = slot_programs.SlotStatic(gen.graphdef, True)
            work.chunked, logits = slot_programs.prefill_chunk(gen.state, work.chunked,
                                                               np.int32(work.starts.pop(0)), static=static,
                                                               size=self.chunk)
            self.prefills += 1
            if work.starts:
                return
            self._chunking = None
            keys, temperature, top_p = self._sampling([job], 1)
            prefilled = slot_programs.finish_chunked(work.chunked, logits, keys, temperature, top_p,
                                                     greedy=job.temperature == 0)
            tokens, lengths = self._insert([work.slot], prefilled, keys, temperature, top_p)
            self._follow(work.slot, job, int(tokens[0]), int(lengths[0]))
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            log.exception("prefill failed")
            self._chunking = None
            self._rows[work.slot] = None
            _send(job, Failed(f"generation failed: {e}"))
        self._release_finished()

    def _follow(self, slot: int, job: Job, token: int, length: int) -> None:
        """A prefilled job's row in its slot, from its first token."""
        stops = () if job.ignore_eos else self.template_stops
        row = _SlotRow(self.generator, job, stops, min(job.max_tokens, self.slot_length - length))
        self._rows[slot] = row
        row.advance(token)

    def _prefill_groups(self, admitted: list[tuple[int, Job]]) -> list[list[tuple[int, Job]]]:
        """The admitted jobs in prefill groups: the same use of the shared prefix and of images, at most
        `max_prefill_rows`, and (beyond one row) rows x prompt bucket within `prefill_tokens`, as `prefill_shapes`
        compiled them."""
        groups, open_groups = [], {}
        for slot, job in admitted:
            key = (self._uses_prefix(job.ids), len(job.pixels) > 0)
            group = open_groups.get(key)
            if group is not None:
                width = self.generator.bucket(max(self._rest(j.ids).size for _, j in group + [(slot, job)]))
                full = len(group) == self.max_prefill_rows
                if full or next_power_of_two(len(group) + 1) * width > self.prefill_tokens:
                    group = None
            if group is None:
                group = open_groups[key] = []
                groups.append(group)
            group.append((slot, job))
        return groups

    def _start_rows(self, group: list[tuple[int, Job]]) -> None:
        """Prefills a group's jobs into their slots and follows each one's first token."""
        gen = self.generator
        jobs = [job for _, job in group]
        for job in jobs:
            self._check_length(job)
        prefixed = self._uses_prefix(jobs[0].ids)
        batch = gen.make_batch([self._rest(j.ids) for j in jobs], [list(j.pixels) for j in jobs])
        tokens, lengths = self._prefill_and_insert(batch, [slot for slot, _ in group], jobs,
                                                   self.prefix if prefixed else None)
        self.prefix_hits += prefixed * len(jobs)
        for (slot, job), token, length in zip(group, tokens, lengths):
            self._follow(slot, job, int(token), int(length))

    def _prefill_and_insert(self, batch, slots: list[int], jobs: list[Job], prefix
                            ) -> tuple[np.ndarray, np.ndarray]:
        """Runs the prefill of `batch` (its first rows the jobs') and inserts row r into slots[r] -> the jobs'
        first tokens and prompt tokens in the cache."""
        gen = self.generator
        keys, temperature, top_p = self._sampling(jobs, batch.ids.shape[0])
        static = slot_programs.SlotStatic(gen.graphdef, not (temperature > 0).any(),
                                          gen.static(batch, True).split_prefill)
        self.prefills += 1
        prefilled = slot_programs.prefill_requests(gen.state, batch.ids, batch.mask, batch.pixels,
                                                   batch.image_inputs, keys, temperature, top_p, prefix, static=static)
        return self._insert(slots, prefilled, keys, temperature, top_p)

    def _sampling(self, jobs: list[Job], rows: int) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """The jobs' PRNG keys, temperatures and top-p, float32 [rows] (padding rows: greedy)."""
        pad = lambda values, fill: np.array(list(values) + [fill] * (rows - len(jobs)), np.float32)
        keys = self._keys_of([self._seed(j) if j.temperature > 0 else None for j in jobs] + [None] * (rows - len(jobs)))
        return keys, pad((j.temperature for j in jobs), 0), pad((j.top_p for j in jobs), 1)

    def _insert(self, slots: list[int], prefilled, keys, temperature, top_p) -> tuple[np.ndarray, np.ndarray]:
        """Inserts the first len(slots) rows of `prefilled` into `slots` -> their first tokens and lengths."""
        n = len(slots)
        slot_ids = np.array(slots + [0] * (prefilled.token.shape[0] - n), np.int32)
        self.slots = slot_programs.insert(self.slots, slot_ids, prefilled, np.int32(n), keys, temperature, top_p)
        tokens, lengths = jax.device_get((prefilled.token, prefilled.length))
        return tokens[:n], lengths[:n]

    def _check_length(self, job: Job) -> None:
        if job.ids.size > self.longest_prompt:
            raise ValueError(f"the prompt has {job.ids.size} tokens, over the engine's max_prompt_tokens "
                             f"{self.longest_prompt}")

    def _seed(self, job: Job) -> int:
        return job.seed if job.seed is not None else next(self._keys)

    def _keys_of(self, seeds: list[int | None]) -> jax.Array:
        """PRNG keys [R] of these seeds (None: a key no draw reads: greedy rows, padding)."""
        data = [self._blank_key if s is None else np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds]
        return jax.random.wrap_key_data(np.stack(data))

    def _is_long(self, ids: np.ndarray) -> bool:
        """Whether a prompt is prefilled in chunks: its bucket (after the shared prefix) is over `prefill_tokens`."""
        return self.generator.bucket(self._rest(ids).size) > self.prefill_tokens

    def _uses_prefix(self, ids: np.ndarray) -> bool:
        n0 = 0 if self.prefix_ids is None else self.prefix_ids.size
        return bool(n0) and ids.size > n0 + 1 and np.array_equal(ids[:n0], self.prefix_ids)

    def _rest(self, ids: np.ndarray) -> np.ndarray:
        """The prompt after the shared prefix when it starts with it, else all of it."""
        return ids[self.prefix_ids.size:] if self._uses_prefix(ids) else ids

    def _decode_step(self, active: np.ndarray, greedy: bool) -> np.ndarray:
        """One step over all slots -> the new last token of each slot, int32 [N]."""
        last = int(np.nonzero(active)[0].max()) + 1 if active.any() else 1
        rows = min(next_power_of_two(last), self.max_batch)
        static = slot_programs.SlotStatic(self.generator.graphdef, greedy, rows=rows)
        self.slots = slot_programs.generate(self.generator.state, self.slots, active, static=static)
        return np.asarray(jax.device_get(self.slots.tokens))

    def _step(self) -> None:
        active = np.array([row is not None for row in self._rows])
        greedy = all(row.job.temperature == 0 for row in self._rows if row is not None)
        tokens = self._decode_step(active, greedy)
        self.steps += 1
        for s, row in enumerate(self._rows):
            if row is not None:
                row.advance(int(tokens[s]))
        self._release_finished()

    def _release_finished(self) -> None:
        for s, row in enumerate(self._rows):
            if row is not None and row.finished:
                self._rows[s] = None


def shared_prefix(generator: Generator) -> np.ndarray | None:
    """The token ids every chat prompt of the generator's template starts with (its system prompt and the first
    role's name), less the last one (where a tokenizer may merge it with what follows); None without a
    template or when that is under 2 tokens."""
    if generator.template is None or generator.tokenizer is None:
        return None
    stand_in = _stand_in_image(generator)
    prompts = [generator.encode(generator.prompt(q, images), stand_in[:images])
               for q, images in (("a", 0), ("b c", 1), ("d?", 0))]
    same = min(p.size for p in prompts)
    for k in range(same):
        if len({int(p[k]) for p in prompts}) > 1:
            same = k
            break
    return prompts[0][:same - 1].astype(np.int32) if same - 1 >= 2 else None


class _Chunking:
    """A long prompt being prefilled in chunks: its reserved slot, its job, its `slots.Chunked` state and the
    start columns of the chunks left."""

    def __init__(self, slot: int, job: Job, chunked, starts: list[int]):
        self.slot, self.job, self.chunked, self.starts = slot, job, chunked, starts


def _stand_in_image(generator: Generator) -> list:
    """What `encode` expands an `<image>` by in `shared_prefix`'s prompts: nothing for LLaVA (its image token
    count is fixed), a one-tile image for AnyRes models."""
    if not generator.is_anyres:
        return [None]
    side = generator.model.config.vision.image_size
    return [Tiles(np.zeros((1, 3, side, side), np.float32), *vision_layout.gather_taps([0]))]


class _SlotRow:
    """One job in its slot: its tokens so far, its streamed text; ends it at EOS (unless ignore_eos), the
    template's stop tokens, a stop string, max_tokens or the slot's room (`limit`). As the windowed engine's rows,
    the text is decoded every step when it is streamed or a request's stop string may end the row, else once."""

    def __init__(self, generator: Generator, job: Job, template_stops: tuple[str, ...], limit: int):
        self.job, self.limit, self.finished, self.count = job, max(limit, 1), False, 0
        self.tokens = np.zeros(self.limit, np.int32)
        self.eos = () if job.ignore_eos else generator.eos_token_ids
        self.stop_ids = generator._stop_ids(template_stops)  # tokenized once (cached per stop set)
        self.streamer = TextStreamer(generator, template_stops + job.stop, lambda piece: _send(job, Delta(piece)))
        self.follow = job.stream or bool(job.stop)  # else the text is decoded once, at the end

    def advance(self, token: int) -> None:
        if self.finished:
            return
        if self.job.cancelled:  # the client is gone: the slot is freed, nothing is sent
            self.finished = True
            return
        self.tokens[self.count] = token
        self.count += 1
        if self.follow:
            self.streamer.update(self.tokens[:self.count])
        if self.streamer.stopped or token in self.eos or self._ends_with_stop_ids():
            self.finish("stop")
        elif self.count >= min(self.limit, self.job.max_tokens):
            self.finish("length")

    def _ends_with_stop_ids(self) -> bool:
        return any(self.count >= len(seq) and tuple(self.tokens[self.count - len(seq):self.count]) == seq
                   for seq in self.stop_ids)

    def finish(self, reason: str) -> None:
        self.finished = True
        self.streamer.update(self.tokens[:self.count])
        self.streamer.flush()
        _send(self.job, Finished("stop" if self.streamer.stopped else reason, self.count))


__all__ = ["ContinuousEngine"]
