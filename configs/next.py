"""LLaVA-NeXT (LLaVA-1.6): AnyRes images (a base tile plus up to 2 x 2 grid tiles of 336 px, unpadded, a
newline ending each feature row).

    python -m llava_jax.train --config=configs/next.py:stage1          # projector on LCS-558K, lr 1e-3
    python -m llava_jax.train --config=configs/next.py                 # stage 2, Vicuna-7B: tower 2e-6, rest 2e-5
    python -m llava_jax.train --config=configs/next.py:stage2,vicuna13b
    python -m llava_jax.train --config=configs/next.py:stage2,mistral7b
    python -m llava_jax.train --config=configs/next.py:stage2,demo     # tiny model, synthetic data, CPU

Variants: stage1 / stage2 (default), vicuna7b (default) / vicuna13b / mistral7b / demo, optionally `lora`
(stage 2). Stage 2 starts from `--config.model.stage1_workdir=DIR` (the stage-1 projector) or
`--config.model.llava_path=DIR` (a Hugging Face LLaVA-NeXT). Any field can be overridden on the command line.
"""

from llava_jax.train.anyres_recipes import next_config


def get_config(arg=None):
    return next_config(arg)
