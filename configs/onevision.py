"""LLaVA-OneVision (SigLIP so400m-patch14-384 + Qwen2, the qwen_1_5 template): anyres_max_9 images over grids
1x1..6x6 of 384 px tiles, multi-image samples as single tiles, videos of 32 frames (2 x 2 pooled).

    python -m llava_jax.train --config=configs/onevision.py:stage1           # projector on LCS-558K, lr 1e-3
    python -m llava_jax.train --config=configs/onevision.py:stage1_5         # full model: tower 2e-6, rest 1e-5
    python -m llava_jax.train --config=configs/onevision.py:si               # single-image stage (default)
    python -m llava_jax.train --config=configs/onevision.py:ov               # images, multi-image, video
    python -m llava_jax.train --config=configs/onevision.py:si,qwen0_5b
    python -m llava_jax.train --config=configs/onevision.py:ov,demo          # tiny model, synthetic data, CPU

Variants: stage1 / stage1_5 / si (default) / ov, qwen7b (default) / qwen0_5b / demo, optionally `lora`.
stage1_5 starts from `--config.model.stage1_workdir=DIR`; si and ov from the previous stage's Hugging Face
export (`--config.model.llava_path=DIR`). Any field can be overridden on the command line.
"""

from llava_jax.train.anyres_recipes import onevision_config


def get_config(arg=None):
    return onevision_config(arg)
