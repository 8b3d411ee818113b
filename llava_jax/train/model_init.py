"""Where a run's model and tokenizer come from: Hugging Face towers, a stage-1 run, a finished LLaVA, or
random (demo), placed directly into their shardings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections as mlc
from flax import nnx

import jax
import numpy as np

from llava_jax.models import clip_vit, layers, llama
from llava_jax.models.dtypes import DTYPES  # also read as model_init.DTYPES by setup, inputs and plan
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from llava_jax.models.siglip import SiglipVisionConfig
from llava_jax.models.llava_next import (AnyResLlava, LlavaNextConfig, LlavaNextForConditionalGeneration,
                                        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration)
from llava_jax import sharding

# config.model.family -> (config class, model class); "llava" (LLaVA-1.5) is the default.
ANYRES_FAMILIES = {"llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
                   "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration)}
FAMILIES = ("llava",) + tuple(ANYRES_FAMILIES)


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


def family(c: mlc.ConfigDict) -> str:
    """The run's model family: "llava" (LLaVA-1.5), "llava_next" or "llava_onevision" (AnyRes)."""
    return c.model.get("family", "llava")


def anyres_config(c: mlc.ConfigDict, vision, text, *, image_token_index: int, video_token_index: int | None = None,
                  vision_feature_layer=None) -> LlavaNextConfig:
    """The AnyRes config of the run (config.model's grid_pinpoints, select strategy, OneVision's aspect ratio)
    around its towers' configs."""
    m = c.model
    config_class = ANYRES_FAMILIES[family(c)][0]
    fields = dict(vision=vision, text=text, projector=m.projector, image_token_index=image_token_index,
                  image_grid_pinpoints=tuple(tuple(p) for p in m.grid_pinpoints),
                  vision_feature_layer=m.vision_feature_layer if vision_feature_layer is None else vision_feature_layer,
                  vision_feature_select_strategy=m.vision_feature_select_strategy)
    if config_class is LlavaOnevisionConfig:
        if video_token_index is None:
            raise ValueError("config.model.family 'llava_onevision' needs the tokenizer's <video> id")
        fields.update(video_token_index=video_token_index, vision_aspect_ratio=m.vision_aspect_ratio)
    return config_class(**fields)


def demo_anyres_config(c: mlc.ConfigDict, vocab_size: int, image_token_index: int,
                       video_token_index: int | None = None) -> LlavaNextConfig:
    """The demo's tiny LLaVA (`demo_model_config`) as the config's AnyRes family: tiles of c.demo.image_size."""
    base = demo_model_config(vocab_size, c.demo.image_size, image_token_index, c.demo.patch_size)
    vision = base.vision
    if c.demo.get("tower", "clip") == "siglip":  # the same size, SigLIP's layout (strategy "full")
        vision = SiglipVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                                    num_hidden_layers=vision.num_hidden_layers,
                                    num_attention_heads=vision.num_attention_heads, image_size=vision.image_size,
                                    patch_size=vision.patch_size)
    return anyres_config(c, vision, base.text, image_token_index=image_token_index,
                         video_token_index=video_token_index, vision_feature_layer=base.vision_feature_layer)


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


def with_runtime(cfg, c: mlc.ConfigDict):
    """A LLaVA or AnyRes config with the run's dtypes, scan, remat and attention kernel."""
    rt = runtime_fields(c)
    # The frozen vision tower runs in the compute dtype, never rematerialized (no backward pass); a trained
    # one (LLaVA-NeXT / OneVision stage 2) takes the run's remat policy like the decoder.
    vision = dataclasses.replace(cfg.vision, dtype=rt["dtype"], param_dtype=rt["param_dtype"],
                                 scan_layers=rt["scan_layers"], attention_impl=rt["attention_impl"],
                                 **({"remat": rt["remat"]} if rules_train_tower(c) else {}))
    text = dataclasses.replace(cfg.text, **rt)
    return dataclasses.replace(cfg, vision=vision, text=text)


def rules_train_tower(c: mlc.ConfigDict) -> bool:
    """Whether a trainable rule gives vision-tower parameters a group (the config's rules, before resolving)."""
    return any(group is not None and str(pattern).startswith("vision_tower") for pattern, group in c.trainable)


def build_model(c: mlc.ConfigDict, mesh, *, image_token_index: int, vocab_size: int | None = None,
                image_size: int | None = None, video_token_index: int | None = None) -> nnx.Module:
    """The run's initial model, sharded over `mesh` (before any stage-1 projector is restored): a LLaVA, or
    for config.model.family llava_next / llava_onevision an AnyRes model.

    image_token_index: the tokenizer's `<image>` id; an LLM whose vocabulary lacks it grows by a row.
    video_token_index: the tokenizer's `<video>` id (OneVision).
    """
    if family(c) != "llava":
        return build_anyres_model(c, mesh, image_token_index=image_token_index, vocab_size=vocab_size,
                                  video_token_index=video_token_index)
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


def build_anyres_model(c: mlc.ConfigDict, mesh, *, image_token_index: int, vocab_size: int | None,
                       video_token_index: int | None) -> AnyResLlava:
    """An AnyRes model: random (demo), a Hugging Face LLaVA-NeXT / OneVision folder (model.llava_path), or
    the towers (model.clip_path: CLIP or SigLIP, model.llm_path) with a fresh projector and image_newline."""
    from llava_jax import convert

    rt = runtime_fields(c)
    if c.model.preset == "demo":
        cfg = with_runtime(demo_anyres_config(c, vocab_size, image_token_index, video_token_index), c)
        model_class = ANYRES_FAMILIES[family(c)][1]
        return sharding.create_sharded(lambda: model_class(cfg, rngs=nnx.Rngs(c.train.seed)), mesh)
    if c.model.llava_path:
        model = convert.from_hf(c.model.llava_path, mesh=mesh, **rt)
        check_anyres_checkpoint(c, model, image_token_index, video_token_index)
        return model
    base = convert.from_clip_and_llm(c.model.clip_path, c.model.llm_path, projector=c.model.projector,
                                     vision_feature_layer=c.model.vision_feature_layer,
                                     vision_feature_select_strategy=c.model.vision_feature_select_strategy,
                                     image_token_index=image_token_index, seed=c.train.seed, mesh=mesh, **rt)
    cfg = anyres_config(c, base.config.vision, base.config.text, image_token_index=image_token_index,
                        video_token_index=video_token_index)
    return with_towers_of(base, cfg, mesh, c.train.seed)


def with_towers_of(base: LlavaForConditionalGeneration, cfg: LlavaNextConfig, mesh, seed: int) -> AnyResLlava:
    """An AnyRes model of `cfg` holding `base`'s tower, projector and language model (no copies) and a fresh
    image_newline [D] (normal, std 1 / sqrt(D), as the model's own init) in its sharding."""
    model = nnx.eval_shape(lambda: ANYRES_FAMILIES_BY_CONFIG[type(cfg)](cfg, rngs=nnx.Rngs(seed)))
    model.vision_tower, model.multi_modal_projector = base.vision_tower, base.multi_modal_projector
    model.language_model = base.language_model
    hidden, dtype = cfg.text.hidden_size, cfg.text.param_dtype
    target = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("embed",), shape=(hidden,), mesh=mesh))
    value = jax.jit(lambda key: layers.normal(1 / np.sqrt(hidden))(key, (hidden,), dtype), out_shardings=target)
    model.image_newline = nnx.Param(value(jax.random.key(seed)), out_sharding=("embed",), eager_sharding=False)
    return model


ANYRES_FAMILIES_BY_CONFIG = {config: model for config, model in ANYRES_FAMILIES.values()}


def check_anyres_checkpoint(c: mlc.ConfigDict, model: nnx.Module, image_token_index: int,
                            video_token_index: int | None) -> None:
    """A model.llava_path checkpoint must be of the config's family and use the tokenizer's <image> / <video>."""
    config_class = ANYRES_FAMILIES[family(c)][0]
    if type(model.config) is not config_class:
        raise ValueError(f"{c.model.llava_path}: a {type(model.config).__name__} checkpoint, but config.model.family "
                         f"is {family(c)!r}")
    for name, ours in (("image_token_index", image_token_index), ("video_token_index", video_token_index)):
        theirs = getattr(model.config, name, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"{c.model.llava_path}: {name} {theirs} differs from the tokenizer's id {ours}")


def load_tokenizer(c: mlc.ConfigDict, fallback: str | os.PathLike | None = None):
    """The LLM checkpoint's tokenizer (or data.tokenizer), with `<image>` added when missing (and `<video>` for
    LLaVA-OneVision)."""
    from transformers import AutoTokenizer

    from llava_jax.data.tokenize import add_image_token

    path = c.data.tokenizer or c.model.llava_path or c.model.llm_path or fallback
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never code from a folder
    add_image_token(tokenizer)
    if family(c) == "llava_onevision":
        video_token_id(tokenizer)
    return tokenizer


VIDEO_TOKEN = "<video>"


def video_token_id(tokenizer) -> int:
    """The id of `<video>` (LLaVA-OneVision's video placeholder), added as a special token when missing."""
    from transformers import AddedToken

    ids = tokenizer(VIDEO_TOKEN, add_special_tokens=False).input_ids
    if len(ids) != 1:
        tokenizer.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
        ids = tokenizer(VIDEO_TOKEN, add_special_tokens=False).input_ids
    return ids[0]
