"""No compile on the request path: after a warm-up, prompts of new lengths and new max_new_tokens run the
programs compiled at start-up (counted as the jitted functions' cache entries)."""

from __future__ import annotations

import threading

import numpy as np

from llava_jax.infer import decoding
from llava_jax.infer.serve.engine import Engine, Finished, Job
from tests.infer.test_generate import ids_row, pixels, tiny  # noqa: F401 (the fixture)


def compiled() -> tuple[int, ...]:
    return tuple(f._cache_size() for f in (decoding.prefill, decoding.decode_loop, decoding.decode_one))


def test_after_the_warm_up_ten_prompt_lengths_compile_nothing(tiny):
    _, gen, _ = tiny
    shapes = gen.warm_up(rows=(1,), images=(0, 1), max_new_tokens=24, max_prompt_tokens=128)
    assert shapes == len(gen.prompt_buckets(0, 128)) + len(gen.prompt_buckets(1, 128)) == 7
    before = compiled()
    rng = np.random.default_rng(0)
    for k, length in enumerate((3, 11, 20, 37, 60, 90, 126)):  # text only, 4 buckets, 7 max_new_tokens
        gen.generate_tokens([ids_row(rng, length)], max_new_tokens=2 + 3 * k)
    for k, length in enumerate((1, 30, 100)):  # one image: 3 more lengths
        gen.generate_tokens([ids_row(rng, "img", length)], [[pixels(1, k)[0]]], max_new_tokens=24 - k)
    assert compiled() == before


def test_a_warmed_up_engine_compiles_nothing_for_ten_new_lengths(tiny):
    _, gen, _ = tiny
    engine = Engine(gen, max_batch=1, max_tokens=24)
    assert engine.warm_up(max_prompt_tokens=64) == 5  # text: 16, 32, 64; one image: 32, 64
    engine.start()
    before = compiled()
    rng = np.random.default_rng(1)
    try:
        for k, length in enumerate((2, 6, 10, 14, 20, 26, 33, 40, 50, 62)):
            finished = threading.Event()
            events = []
            job = Job(ids_row(rng, length).astype(np.int32), [], 1 + 2 * k, lambda e: (events.append(e),
                      isinstance(e, Finished) and finished.set()))
            engine.submit(job)
            assert finished.wait(120), events
            assert events[-1].completion_tokens <= 1 + 2 * k
    finally:
        engine.close()
    assert compiled() == before
