"""The continuous-batching engine on a tiny LLaVA: greedy answers under concurrent arrivals equal one-by-one
`Generator` answers, a cancelled job frees its slot, a seeded sampled answer depends on its seed only, and
after the warm-up ten new prompt lengths compile nothing."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from llava_jax.infer import slots
from llava_jax.infer.serve.continuous import ContinuousEngine
from llava_jax.infer.serve.engine import Delta, Failed, Finished, Job
from tests.infer.test_generate import ids_row, pixels, tiny  # noqa: F401 (the fixture)

TIMEOUT = 120


class Answer:
    """A job's events: its text, its end."""

    def __init__(self):
        self.pieces, self.end, self.done, self.started = [], None, threading.Event(), threading.Event()

    def __call__(self, event):
        self.started.set()
        if isinstance(event, Delta):
            self.pieces.append(event.text)
        else:
            self.end = event
            self.done.set()

    @property
    def text(self) -> str:
        assert self.done.wait(TIMEOUT), "no answer"
        assert isinstance(self.end, Finished), self.end
        return "".join(self.pieces)


def requests(rng, count: int):
    """(ids, pixels, max_tokens): text prompts of 4..31 tokens and prompts with an image, 2..16 new tokens."""
    out = []
    for k in range(count):
        if k % 3 == 2:
            out.append((ids_row(rng, "img", 1 + k % 6).astype(np.int32), [pixels(1, k)[0]], 2 + (5 * k) % 15))
        else:
            out.append((ids_row(rng, 3 + 7 * k % 28).astype(np.int32), [], 2 + (7 * k) % 15))
    return out


def compiled() -> tuple[int, ...]:
    return tuple(f._cache_size() for f in (slots.prefill_requests, slots.insert, slots.generate))


@pytest.fixture(scope="module")
def engine(tiny):
    """A started engine of 4 slots, warmed up for greedy and sampled prompts of up to 32 tokens; `.compiled`:
    the programs' cache sizes right after the warm-up."""
    engine = ContinuousEngine(tiny[1], max_batch=4, max_tokens=24, max_prompt_tokens=32, share_prefix=False)
    assert engine.warm_up(sampled=True) == 9  # 1, 2, 4 rows x (text: 16, 32; one image: 32)
    engine.compiled = compiled()
    yield engine.start()
    engine.close()


def test_greedy_answers_under_concurrent_arrivals_equal_one_by_one(tiny, engine):
    _, gen, _ = tiny
    jobs = requests(np.random.default_rng(0), 12)
    expected = [(gen.generate([ids], [px], max_new_tokens=m)[0], gen.generate_tokens([ids], [px], max_new_tokens=m)[0])
                for ids, px, m in jobs]
    answers = [Answer() for _ in jobs]
    busy_at_submit = []
    rows, steps = engine.rows, engine.steps

    def client(k: int):
        if k % 2 == 1:  # after the streamed job before it has its first token: while it decodes
            answers[k - 1].started.wait(TIMEOUT)
        busy_at_submit.append(engine.busy_slots)
        ids, px, m = jobs[k]
        engine.submit(Job(ids, px, m, answers[k], stream=k % 2 == 0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join(TIMEOUT)
    assert [(a.text, a.end.completion_tokens) for a in answers] == [(text, t.size) for text, t in expected]
    assert sum(busy > 0 for busy in busy_at_submit) >= 3  # jobs arrived while others were decoding
    assert engine.rows - rows == len(jobs)
    assert engine.steps - steps < sum(t.size for _, t in expected) - len(jobs)  # slots decoded together


def test_jobs_waiting_together_are_prefilled_together(tiny, engine):
    """Four jobs queued while the engine is held (three text prompts, one with an image) start in one
    admission round and two prefill calls (text rows together, the image row apart), with one-by-one answers."""
    _, gen, _ = tiny
    rng = np.random.default_rng(7)
    jobs = [(ids_row(rng, 5 + 6 * k).astype(np.int32), [], 6) for k in range(3)]
    jobs.append((ids_row(rng, "img", 3).astype(np.int32), [pixels(1, 5)[0]], 6))
    expected = [gen.generate([ids], [px], max_new_tokens=m)[0] for ids, px, m in jobs]
    answers = [Answer() for _ in jobs]
    batches, prefills = engine.batches, engine.prefills
    with engine._cond:  # the engine thread cannot take a job before all four wait
        for (ids, px, m), answer in zip(jobs, answers):
            engine.submit(Job(ids, px, m, answer))
    assert [a.text for a in answers] == expected
    assert (engine.batches - batches, engine.prefills - prefills) == (1, 2)


def test_a_cancelled_job_frees_its_slot(engine):
    ids = ids_row(np.random.default_rng(1), 12).astype(np.int32)
    gone_events = [[] for _ in range(engine.max_batch)]

    def gone(k: int, event):
        gone_events[k].append(event)
        if len(gone_events[k]) == 2:
            jobs[k].cancelled = True

    jobs = [Job(ids, [], 24, lambda e, k=k: gone(k, e), ignore_eos=True) for k in range(engine.max_batch)]
    stays = Answer()
    steps = engine.steps
    for job in jobs + [Job(ids, [], 5, stays, ignore_eos=True)]:  # every slot taken, then one more job
        engine.submit(job)
    assert stays.text and stays.end == Finished("length", 5)
    assert engine.steps - steps < 12  # it ran in a freed slot, long before a 24-token job could end
    assert all(len(e) <= 3 and all(isinstance(x, Delta) for x in e) for e in gone_events)


def test_a_seeded_sampled_answer_depends_on_its_seed_only(tiny, engine):
    _, gen, _ = tiny
    rng = np.random.default_rng(2)
    ids = ids_row(rng, 20).astype(np.int32)
    expected = gen.generate([ids], max_new_tokens=12, temperature=1.5, top_p=0.9, rng=7)[0]
    answers = []
    for others in ([], requests(rng, 3)):  # alone, then next to greedy jobs in the other slots
        for other_ids, px, m in others:
            engine.submit(Job(other_ids, px, m, Answer()))
        answers.append(Answer())
        engine.submit(Job(ids, [], 12, answers[-1], temperature=1.5, top_p=0.9, seed=7))
        assert answers[-1].text is not None
    other_seed = Answer()
    engine.submit(Job(ids, [], 12, other_seed, temperature=1.5, top_p=0.9, seed=8))
    assert answers[0].text == answers[1].text == expected
    assert other_seed.text != expected


def test_after_the_warm_up_ten_prompt_lengths_compile_nothing(engine):
    rng = np.random.default_rng(3)
    answers = []
    for k, length in enumerate((1, 3, 6, 9, 12, 15, 19, 23, 27, 30)):
        answers.append(Answer())
        engine.submit(Job(ids_row(rng, length).astype(np.int32), [], 1 + 2 * k, answers[-1]))
    answers.append(Answer())
    engine.submit(Job(ids_row(rng, "img", 5).astype(np.int32), [pixels(1, 0)[0]], 8, answers[-1]))
    for k, answer in enumerate(answers[:-1]):
        assert answer.text is not None and answer.end.completion_tokens <= 1 + 2 * k
    assert answers[-1].text is not None
    assert compiled() == engine.compiled


def test_a_bad_request_fails_alone(engine):
    rng = np.random.default_rng(4)
    bad, good = Answer(), Answer()
    engine.submit(Job(ids_row(rng, "img", 3).astype(np.int32), [], 4, bad))  # an image placeholder, no pixels
    engine.submit(Job(ids_row(rng, 5).astype(np.int32), [], 4, good))
    assert bad.done.wait(TIMEOUT) and isinstance(bad.end, Failed) and "image" in bad.end.message
    assert good.text is not None and good.end.completion_tokens >= 1


@pytest.mark.slow  # 35 s on the shared CPU: its own programs compile
def test_prompts_after_the_system_prompt_reuse_its_kv(tiny):
    """Chat prompts start with the template's system prompt: its KV is computed once, the rest prefilled after
    it, and the answers equal one-by-one Generator answers."""
    _, gen, _ = tiny
    engine = ContinuousEngine(gen, max_batch=2, max_tokens=8, max_prompt_tokens=80)
    assert gen.tokenizer.decode(engine.prefix_ids).startswith("<s> A chat between a curious human")
    prompts = [(gen.encode(gen.prompt(q, n)), pixels(n, k)) for k, (q, n) in
               enumerate((("What color is the shape?", 0), ("How many shapes?", 1), ("Where is it?", 0)))]
    expected = [gen.generate([ids], [list(px)], max_new_tokens=8)[0] for ids, px in prompts]
    answers = [Answer() for _ in prompts]
    engine.start()
    try:
        for (ids, px), answer in zip(prompts, answers):
            engine.submit(Job(ids, list(px), 8, answer))
        assert [a.text for a in answers] == expected
    finally:
        engine.close()
    assert engine.prefix_hits == 3


def prefill(gen, prompts, images=None):
    """prefill_requests of greedy prompts -> (Prefilled, keys, temperature, top_p)."""
    batch = gen.make_batch(prompts, images)
    rows = batch.ids.shape[0]
    static = slots.SlotStatic(gen.graphdef, True, gen.static(batch, True).split_prefill)
    keys, temperature, top_p = jax.random.split(jax.random.key(0), rows), np.zeros(rows, np.float32), np.ones(rows)
    prefilled = slots.prefill_requests(gen.state, batch.ids, batch.mask, batch.pixels, batch.image_inputs, keys,
                                       temperature, top_p.astype(np.float32), static=static)
    return prefilled, keys, temperature, top_p.astype(np.float32)


@pytest.mark.parametrize("slot, rows", [(0, None), (2, None), (1, 2)])
def test_slot_programs_match_the_generator(tiny, slot, rows):
    """prefill_requests + insert + generate on one slot (of 3; a step over all of them or the first `rows`) gives
    Generator's greedy tokens, and leaves the other slots' lengths alone."""
    _, gen, _ = tiny
    ids = ids_row(np.random.default_rng(5), 17)
    expected = gen.generate_tokens([ids], max_new_tokens=6)[0]
    prefilled, *settings = prefill(gen, [ids])
    state = slots.empty_slots(gen.model, 3, 64)
    state = slots.insert(state, np.array([slot], np.int32), prefilled, np.int32(1), *settings)
    tokens = [int(prefilled.token[0])]
    active = np.arange(3) == slot
    for _ in range(5):
        state = slots.generate(gen.state, state, active, static=slots.SlotStatic(gen.graphdef, True, rows=rows))
        tokens.append(int(state.tokens[slot]))
    assert tokens[:expected.size] == expected.tolist() and expected.size >= 2
    assert state.cache.index.tolist() == [18 + 5 if s == slot else 0 for s in range(3)]


def test_requests_prefilled_together_equal_one_by_one(tiny):
    """Three prompts of different lengths (one with an image) prefilled in one call (4 rows, one of padding)
    and inserted into slots 3, 0, 2 of 4 decode to Generator's greedy tokens of each; the padding row is not
    inserted (slot 1 stays empty)."""
    _, gen, _ = tiny
    rng = np.random.default_rng(6)
    prompts = [ids_row(rng, 9), ids_row(rng, "img", 4), ids_row(rng, 21)]
    images = [[], [pixels(1, 3)[0]], []]
    expected = [gen.generate_tokens([ids], [px], max_new_tokens=5)[0] for ids, px in zip(prompts, images)]
    prefilled, *settings = prefill(gen, prompts, images)
    assert prefilled.token.shape == (4,)
    state = slots.empty_slots(gen.model, 4, 64)
    order = np.array([3, 0, 2, 0], np.int32)
    state = slots.insert(state, order, prefilled, np.int32(3), *settings)
    assert state.cache.index.tolist() == [int(prefilled.length[1]), 0, int(prefilled.length[2]),
                                          int(prefilled.length[0])]
    tokens = [[int(t)] for t in prefilled.token[:3]]
    active = np.array([True, False, True, True])
    for _ in range(4):
        state = slots.generate(gen.state, state, active, static=slots.SlotStatic(gen.graphdef, True))
        for r, slot in enumerate(order[:3]):
            tokens[r].append(int(state.tokens[slot]))
    for got, want in zip(tokens, expected):
        assert got[:want.size] == want.tolist() and want.size >= 2


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(tiny):
    """With a prefill budget of 16 tokens, prompts of 17-31 tokens (a text one, one with an image) are prefilled
    in chunks of 16, one chunk between two decode steps of a job already decoding, and every answer equals the
    one-by-one Generator answer; after the warm-up nothing compiles."""
    _, gen, _ = tiny
    engine = ContinuousEngine(gen, max_batch=2, max_tokens=12, max_prompt_tokens=32, share_prefix=False,
                              prefill_tokens=16)
    assert engine.chunk == 16
    engine.warm_up()
    programs = [slots.start_chunked, slots.prefill_chunk, slots.finish_chunked, slots.prefill_requests, slots.insert,
                slots.generate]
    warm = [f._cache_size() for f in programs]
    rng = np.random.default_rng(8)
    jobs = [(ids_row(rng, 6).astype(np.int32), [], 12), (ids_row(rng, 29).astype(np.int32), [], 6),
            (ids_row(rng, "img", 3).astype(np.int32), [pixels(1, 7)[0]], 6)]
    assert [bool(engine._is_long(ids)) for ids, _, _ in jobs] == [False, True, True]
    expected = [gen.generate([ids], [px], max_new_tokens=m)[0] for ids, px, m in jobs]
    answers = [Answer() for _ in jobs]
    engine.start()
    try:
        engine.submit(Job(*jobs[0], answers[0]))
        answers[0].started.wait(TIMEOUT)  # decoding when the long prompts arrive
        steps, prefills = engine.steps, engine.prefills
        for job, answer in zip(jobs[1:], answers[1:]):
            engine.submit(Job(*job, answer))
        assert [a.text for a in answers] == expected
    finally:
        engine.close()
    assert engine.prefills - prefills >= 4  # two chunks each
    assert engine.steps > steps
    assert [f._cache_size() for f in programs] == warm
