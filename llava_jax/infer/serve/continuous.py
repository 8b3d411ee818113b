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
from llava_jax.infer.generate import Generator, TextStreamer, next_power_of_two
from llava_jax.infer.sampling import Sampling
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
    """

    def __init__(self, generator: Generator, *, max_batch: int = 16, max_queue: int = 64, seed: int = 0,
                 max_tokens: int = 1024, max_prompt_tokens: int | None = None, share_prefix: bool = True):
        super().__init__(generator, max_batch=max_batch, max_queue=max_queue, seed=seed)
        context = generator.context_length
        self.longest_prompt = min(max_prompt_tokens or context, context)
        self.slot_length = max(min(context, self.longest_prompt + max_tokens), generator.bucket(self.longest_prompt))
        self.slots = slot_programs.empty_slots(generator.model, max_batch, self.slot_length)
        self._rows: list[_SlotRow | None] = [None] * max_batch
        self.batches = self.rows = self.steps = 0  # admission rounds, jobs admitted, decode steps (GET /health)
        self.prefix_ids = shared_prefix(generator) if share_prefix else None
        self.prefix = self._prefill_prefix() if self.prefix_ids is not None else None
        self.prefix_hits = 0  # prompts that reused the prefix's KV

    def _prefill_prefix(self) -> slot_programs.Prefilled:
        gen, ids = self.generator, self.prefix_ids[None]
        static = slot_programs.SlotStatic(gen.graphdef, True)
        return slot_programs.prefill_request(gen.state, ids, np.ones_like(ids), None, None, jax.random.key(0),
                                             Sampling().arrays(), static=static)

    def warm_up(self, max_prompt_tokens: int | None = None, sampled: bool = False,
                progress: Callable[[str], None] | None = None) -> int:
        """Compiles (or loads from the persistent cache) the prefill and insert of every prompt bucket up to
        `max_prompt_tokens`, with or without an image, and the decode step: greedy (and with `sampled`, sampled)
        requests; call before `start`. Returns the prompt shapes compiled."""
        gen = self.generator
        longest = min(max_prompt_tokens or self.longest_prompt, self.longest_prompt)
        shapes = [(i, p) for i in ((0, 1) if gen.is_llava else (0,)) for p in gen.prompt_buckets(i, longest)]
        modes = (0.0, 1.0) if sampled else (0.0,)
        starts = [np.zeros(0, np.int32)] + ([self.prefix_ids] if self.prefix_ids is not None else [])
        for k, (num_images, width) in enumerate(shapes):
            if progress is not None:
                progress(f"compiling {k + 1}/{len(shapes)}: {num_images} image(s), prompt bucket {width}")
            prompt = np.full(width, gen.pad_id, np.int32)
            prompt[1:1 + num_images * gen.image_seq_length] = gen.image_token_index or 0
            pixels = [np.zeros((3,) + (gen.model.config.vision.image_size,) * 2, np.float32)] * num_images
            for start in starts:  # without and after the shared prefix
                if start.size + num_images * gen.image_seq_length + 2 > longest:
                    continue
                ids = np.concatenate([start, prompt[:longest - start.size]])
                for temperature in modes:
                    self._prefill_into(0, Job(ids, pixels, 1, lambda e: None, temperature=temperature))
        for temperature in modes:
            for rows in self.step_rows:
                self._decode_step(np.arange(self.max_batch) < rows, greedy=temperature == 0)
        self.prefix_hits = 0
        return len(shapes)

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
                for slot, job in admitted:
                    self._admit(slot, job)
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
        self.slots = slot_programs.empty_slots(self.generator.model, self.max_batch, self.slot_length)

    def _next_jobs(self) -> list[tuple[int, Job]] | None:
        """Waiting jobs paired with free slots (waits while there is nothing to do; None once closed)."""
        with self._cond:
            while not self._closed and not self._waiting and not any(r is not None for r in self._rows):
                self._cond.wait()
            if self._closed:
                return None
            free = [s for s, row in enumerate(self._rows) if row is None]
            taken = []
            while free and self._waiting:
                job = self._waiting.popleft()
                if not job.cancelled:
                    taken.append((free.pop(0), job))
            return taken

    def _admit(self, slot: int, job: Job) -> None:
        """Prefills `job` into `slot` and follows its first token; a failure fails this job only."""
        try:
            token, length = self._prefill_into(slot, job)
            stops = () if job.ignore_eos else self.template_stops
            row = _SlotRow(self.generator, job, stops, min(job.max_tokens, self.slot_length - length))
            self._rows[slot] = row
            row.advance(token)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            log.exception("prefill failed")
            self._rows[slot] = None
            _send(job, Failed(f"generation failed: {e}"))
        self._release_finished()

    def _prefill_into(self, slot: int, job: Job) -> tuple[int, int]:
        """Runs the job's prefill and inserts it into `slot` -> (first token, prompt tokens in the cache)."""
        gen = self.generator
        if job.ids.size > self.longest_prompt:
            raise ValueError(f"the prompt has {job.ids.size} tokens, over the engine's max_prompt_tokens "
                             f"{self.longest_prompt}")
        prefix, ids = self._split_prefix(job.ids)
        batch = gen.make_batch([ids], [list(job.pixels)])
        seed = job.seed if job.seed is not None else next(self._keys)
        key = jax.random.key(seed)
        sampling = Sampling(job.temperature, 0, job.top_p)
        static = slot_programs.SlotStatic(gen.graphdef, sampling.greedy, gen.static(batch, True).split_prefill)
        prefilled = slot_programs.prefill_request(gen.state, batch.ids, batch.mask, batch.pixels, batch.image_mask,
                                                  key, sampling.arrays(), prefix, static=static)
        self.slots = slot_programs.insert(self.slots, np.int32(slot), prefilled, key, np.float32(job.temperature),
                                          np.float32(job.top_p))
        token, length = jax.device_get((prefilled.token, prefilled.length))
        return int(token), int(length)

    def _split_prefix(self, ids: np.ndarray) -> tuple[slot_programs.Prefilled | None, np.ndarray]:
        """(the shared prefix's KV, the rest of the prompt) when `ids` start with the prefix, else (None, ids)."""
        n0 = 0 if self.prefix_ids is None else self.prefix_ids.size
        if n0 and ids.size > n0 + 1 and np.array_equal(ids[:n0], self.prefix_ids):
            self.prefix_hits += 1
            return self.prefix, ids[n0:]
        return None, ids

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
    prompts = [generator.encode(generator.prompt(q, images)) for q, images in (("a", 0), ("b c", 1), ("d?", 0))]
    same = min(p.size for p in prompts)
    for k in range(same):
        if len({int(p[k]) for p in prompts}) > 1:
            same = k
            break
    return prompts[0][:same - 1].astype(np.int32) if same - 1 >= 2 else None


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
