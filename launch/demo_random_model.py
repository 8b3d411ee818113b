"""Writes a random LLaVA of the demo's size (the demo's word tokenizer, 32 px images) as a model folder that
`python -m llava_jax.serve` and its benchmark open, without training the demo first.

    PYTHONPATH=. python launch/demo_random_model.py /tmp/llava_demo_random
    python -m llava_jax.infer.serve.bench --model /tmp/llava_demo_random --poisson 4,8,16
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    from flax import nnx
    from transformers import AutoTokenizer

    from llava_jax import convert
    from llava_jax.data import synthetic
    from llava_jax.models.llava import LlavaForConditionalGeneration
    from llava_jax.train.model_init import demo_model_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(synthetic.build_tokenizer(tmp)))
    config = demo_model_config(len(tokenizer), 32, tokenizer.convert_tokens_to_ids("<image>"))
    out = convert.save(LlavaForConditionalGeneration(config, rngs=nnx.Rngs(args.seed)), args.out)
    tokenizer.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main()
