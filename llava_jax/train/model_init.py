"""Where a run's model and tokenizer come from: Hugging Face towers, a stage-1 run, a finished LLaVA, or
random (demo), placed directly into their shardings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections as mlc
from flax import nnx

from llava_jax.models import clip_vit, llama
from llava_jax.models.dtypes import DTYPES  # also read as model_init.DTYPES by setup, inputs and plan
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from llava_jax import sharding


class MissingInputs(SystemExit):
    """The run cannot start: weights or data are not on this machine (message says what to do)."""


def demo_model_config(vocab_size: int, image_size: int, image_token_index: int,
                      patch_size: int = 8) -> LlavaConfig:
    """A tiny LLaVA for the CPU demo: a 3-layer tower of width 64, hidden 128, 3 decoder layers."""
    vision = clip_vit.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = llama.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                             max_position_embeddings=512, rms_norm_eps=1e-5)
    return LlavaConfig(vision=vision, text=text, projector="mlp2x_gelu", image_token_index=image_token_index,
                       vision_feature_layer=-2)


def missing_inputs(c: mlc.ConfigDict, config_name: str) -> list[str]:
    """What a non-demo run needs and this machine lacks, one line each."""
    if c.model.preset == "demo":
        return []
    problems = []
    if c.model.llava_path:
        if not Path(c.model.llava_path, "config.json").is_file():
            problems.append(f"model.llava_path={c.model.llava_path!r}: no Hugging Face LLaVA folder there")
    else:
        for field, hint in (("clip_path", "a CLIP checkpoint"), ("llm_path", "a LLaMA-family checkpoint")):
            value = c.model[field]
            if not Path(value, "config.json").is_file():
                problems.append(f"model.{field}={value!r}: {hint} folder (Hugging Face format) is not there")
    if c.stage == 2 and not c.model.llava_path and c.model.stage1_workdir and \
            not Path(c.model.stage1_workdir, "checkpoints").is_dir():
        problems.append(f"model.stage1_workdir={c.model.stage1_workdir!r}: no stage-1 checkpoints there")
    if not (c.data.tfds_dir or Path(c.data.json).is_file()):
        problems.append(f"data.json={c.data.json!r}: the dataset annotation file is not there")
    elif not c.data.tfds_dir and not Path(c.data.images).exists():
        problems.append(f"data.images={c.data.images!r}: the image folder or zip is not there")
    return problems


def explain_missing(problems: list[str], config_name: str, stage: int) -> str:
    return "\n".join([
        f"{config_name}: this run needs weights and data that are not on this machine:",
        *(f"  - {p}" for p in problems),
        "Download them first (for example `huggingface-cli download openai/clip-vit-large-patch14-336 "
        "--local-dir ckpt/clip` and `huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir ckpt/vicuna`), "
        "then point the config at them:",
        f"  python -m llava_jax.train --config={config_name} --config.model.clip_path=ckpt/clip "
        "--config.model.llm_path=ckpt/vicuna --config.data.json=... --config.data.images=...",
        "To try the project without downloads, run the demo on the embedded synthetic data:",
        f"  python -m llava_jax.train --config=configs/stage{stage}.py:demo --workdir=/tmp/llava_demo",
    ])


def runtime_fields(c: mlc.ConfigDict) -> dict:
    return dict(dtype=DTYPES[c.model.dtype], param_dtype=DTYPES[c.model.param_dtype],
                scan_layers=c.model.scan_layers, remat=c.model.remat,
                attention_impl=c.model.get("attention_impl", "xla"))


def with_runtime(cfg: LlavaConfig, c: mlc.ConfigDict) -> LlavaConfig:
    rt = runtime_fields(c)
    # The frozen vision tower runs in the compute dtype, never rematerialized (no backward pass).
    vision = dataclasses.replace(cfg.vision, dtype=rt["dtype"], param_dtype=rt["param_dtype"],
                                 scan_layers=rt["scan_layers"], attention_impl=rt["attention_impl"])
    text = dataclasses.replace(cfg.text, **rt)
    return dataclasses.replace(cfg, vision=vision, text=text)


def build_model(c: mlc.ConfigDict, mesh, *, image_token_index: int, vocab_size: int | None = None,
                image_size: int | None = None) -> LlavaForConditionalGeneration:
    """The run's initial model, sharded over `mesh` (before any stage-1 projector is restored).

    image_token_index: the tokenizer's `<image>` id; an LLM whose vocabulary lacks it grows by a row.
    """
    from llava_jax import convert

    rt = runtime_fields(c)
    if c.model.preset == "demo":
        cfg = with_runtime(demo_model_config(vocab_size, image_size, image_token_index, c.demo.patch_size), c)
        return sharding.create_sharded(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(c.train.seed)),
                                       mesh)
    # Each tensor streams from the checkpoint straight into its sharding over `mesh`.
    if c.model.llava_path:
        model = convert.from_hf(c.model.llava_path, mesh=mesh, **rt)
        if model.config.image_token_index != image_token_index:
            raise ValueError(f"{c.model.llava_path}: image_token_index {model.config.image_token_index} differs "
                             f"from the tokenizer's <image> id {image_token_index}")
        return model
    return convert.from_clip_and_llm(c.model.clip_path, c.model.llm_path, projector=c.model.projector,
                                     vision_feature_layer=c.model.vision_feature_layer,
                                     image_token_index=image_token_index, seed=c.train.seed, mesh=mesh, **rt)


def load_tokenizer(c: mlc.ConfigDict, fallback: str | os.PathLike | None = None):
    """The LLM checkpoint's tokenizer (or data.tokenizer), with `<image>` added when missing."""
    from transformers import AutoTokenizer

    from llava_jax.data.tokenize import add_image_token

    path = c.data.tokenizer or c.model.llava_path or c.model.llm_path or fallback
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never code from a folder
    add_image_token(tokenizer)
    return tokenizer
