"""First answer to new questions against a repeat, on a random model of the demo's size (CPU).

    PYTHONPATH=. python launch/first_answer_latency.py [--questions 20] [--max-new-tokens 32]

Builds the demo's LLaVA (random weights, its word tokenizer, 32 px images), then, in one process: without a
warm-up, the first answer to each of N free-text questions of different lengths and a repeat of the last one;
then the same after `Generator.warm_up` on a fresh compile cache. Prints the times (the issue's goal: a new
question within 2x of a repeat).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def build_generator(tmp: str):
    from flax import nnx
    from transformers import AutoTokenizer

    from llava_jax.data import synthetic
    from llava_jax.infer.generate import Generator
    from llava_jax.train.model_init import demo_model_config
    from llava_jax.models.llava import LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(synthetic.build_tokenizer(tmp)))
    config = demo_model_config(len(tokenizer), 32, tokenizer.convert_tokens_to_ids("<image>"))
    return Generator(LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0)), tokenizer, template="llava_v1")


def questions(n: int, seed: int = 0) -> list[str]:
    from llava_jax.data import synthetic

    words = sorted({w for text in synthetic.corpus() for w in text.replace("?", " ").split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, 3 + 9 * k)) + "?" for k in range(n)]  # 3 .. 174 words


def answer_time(gen, question: str, image, max_new_tokens: int) -> float:
    start = time.perf_counter()
    gen.generate([gen.prompt(question, 1)], [[image]], max_new_tokens=max_new_tokens, stream=lambda r, p: None)
    return time.perf_counter() - start


def run(gen, qs, image, max_new_tokens: int) -> tuple[list[float], float]:
    firsts = [answer_time(gen, q, image, max_new_tokens) for q in qs]
    return firsts, statistics.median(answer_time(gen, qs[-1], image, max_new_tokens) for _ in range(3))


def main() -> None:
    import jax
    from PIL import Image

    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        gen = build_generator(tmp)
        cold, repeat = run(gen, questions(args.questions, 0), image, args.max_new_tokens)
        print(f"no warm-up:   first answers median {statistics.median(cold):.3f} s, max {max(cold):.3f} s; "
              f"repeat {repeat:.3f} s; median / repeat {statistics.median(cold) / repeat:.1f}x")
        jax.clear_caches()
        gen = build_generator(tmp)
        start = time.perf_counter()
        shapes = gen.warm_up(images=(1,), max_new_tokens=args.max_new_tokens, stream=True)
        warm_s = time.perf_counter() - start
        warm, repeat = run(gen, questions(args.questions, 1), image, args.max_new_tokens)
        print(f"warm-up ({shapes} shapes, {warm_s:.1f} s): first answers median {statistics.median(warm):.3f} s, "
              f"max {max(warm):.3f} s; repeat {repeat:.3f} s; max / repeat {max(warm) / repeat:.1f}x")


if __name__ == "__main__":
    main()
