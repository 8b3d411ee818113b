"""Stage 2 (visual instruction tuning): train the projector and the LLM (or LoRA adapters) with `v1`.

    python -m llava_jax.train --config=configs/stage2.py            # LLaVA-1.5 7B recipe (mix665k)
    python -m llava_jax.train --config=configs/stage2.py:vicuna13b
    python -m llava_jax.train --config=configs/stage2.py:lora       # LoRA r128 alpha256, lr 2e-4
    python -m llava_jax.train --config=configs/stage2.py:demo       # tiny model, synthetic data, CPU

Variants: vicuna7b (default), vicuna13b, llama3_8b, demo, each optionally with `lora`
(e.g. `:vicuna13b,lora`). Stage 2 starts from `--config.model.stage1_workdir=DIR` (projector) or
`--config.model.llava_path=DIR` (a Hugging Face LLaVA). Any field can be overridden on the command line.
"""

from llava_jax.train.recipes import stage_config


def get_config(arg=None):
    return stage_config(2, arg)
