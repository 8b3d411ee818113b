"""Stage 1 (feature alignment): train the projector on image-caption pairs with the `plain` template.

    python -m llava_jax.train --config=configs/stage1.py            # LLaVA-1.5 7B recipe (LCS-558K)
    python -m llava_jax.train --config=configs/stage1.py:vicuna13b
    python -m llava_jax.train --config=configs/stage1.py:demo       # tiny model, synthetic data, CPU

Variants: vicuna7b (default), vicuna13b, llama3_8b, demo. Any field can be overridden on the command
line, e.g. --config.optim.lr=2e-3 --config.train.global_batch_size=128.
"""

from llava_jax.train.recipes import stage_config


def get_config(arg=None):
    return stage_config(1, arg)
