"""Importers, one per source: a Hugging Face folder (LLaVA, LLaMA family, CLIP, SigLIP), a tower + an LLM
(stage-1 start), and the official LLaVA layout. Weights stream tensor by tensor into an abstractly created
model, each straight into its sharding when a mesh is given."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from llava_jax.convert import hf_original
from llava_jax.convert.build import load_params, plan_sources, vocab_transforms, with_runtime
from llava_jax.convert.checkpoint_io import CheckpointError, CheckpointReader, read_config
from llava_jax.convert.families import CLIP, LLAMA, VISION_TOWERS, Family, of_hf_config
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration

def _dtypes(reader: CheckpointReader, dtype, param_dtype) -> dict:
    param_dtype = param_dtype or dtype or reader.float_dtype()
    return {"param_dtype": jnp.dtype(param_dtype), "dtype": jnp.dtype(dtype or param_dtype)}


def from_hf(path: str | os.PathLike, dtype=None, param_dtype=None, mesh=None, **runtime) -> nnx.Module:
    """Imports a Hugging Face checkpoint folder, detecting what it holds from config.json.

    - an original LLaVA config (`mm_*` fields) -> `from_original_llava(path)`;
    - otherwise the row of `convert.families` that claims its model_type (or, for LLaMA-family causal LMs,
      its architectures): 'llava' -> LlavaForConditionalGeneration (classic, 4.52+ and 5.x tensor layouts),
      'clip_vision_model' / 'clip' -> CLIPVisionModel, 'siglip_vision_model' / 'siglip' -> SiglipVisionModel
      (vision part only, without SigLIP's attention-pool head), llama / mistral / qwen2 ->
      LlamaForCausalLM.
    Args:
      dtype, param_dtype: see the module docstring. runtime: scan_layers, remat.
      mesh: a `jax.sharding.Mesh`; each parameter is placed directly in its sharding (logical axis rules of
        `llava_jax.sharding`) as it is read, so no device holds the whole unsharded model.
    Raises:
      FileNotFoundError / CheckpointError / ValueError naming the file (and tensor) on bad input.
    """
    path = Path(path)
    config = read_config(path)
    if hf_original.is_original_llava(config):
        return from_original_llava(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **runtime)
    family = of_hf_config(config)
    if family is None:
        raise CheckpointError(f"{path / 'config.json'}: unknown model_type {config.get('model_type')!r} / "
                              f"architectures {config.get('architectures')}; expected a LLaVA, CLIP, SigLIP or "
                              f"LLaMA-family checkpoint")
    with CheckpointReader(path) as reader:
        cfg = _config(family, path, config, **_dtypes(reader, dtype, param_dtype), **runtime)
        create = lambda: family.model(cfg, rngs=nnx.Rngs(0))
        sources = plan_sources(nnx.eval_shape(create), reader, _checked(reader, family.rename), ignore=family.ignore)
        return load_params(create, sources, mesh=mesh)


def _config(family: Family, path: Path, config: dict, **runtime):
    """Our config of a family from a Hugging Face config dict, with runtime fields; errors name the file."""
    try:
        cfg = family.config_from_hf(config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    return with_runtime(cfg, **runtime)


def _checked(reader: CheckpointReader, rename: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """`rename` with its ValueError re-raised naming the checkpoint file."""

    def wrapped(name):
        try:
            return rename(name)
        except ValueError as e:
            raise CheckpointError(f"{reader.file_of(name)}: {e}") from e

    return wrapped

def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _grow_vocab(text_cfg, image_token_index: int | None, pad_to_multiple_of: int | None):
    """(text config with room for the image token, image token id, vocab growth in rows)."""
    vocab = text_cfg.vocab_size
    if image_token_index is None:
        image_token_index = vocab  # The id `<image>` gets when added to the LLM's tokenizer.
    new_vocab = _round_up(max(vocab, image_token_index + 1), pad_to_multiple_of)
    return dataclasses.replace(text_cfg, vocab_size=new_vocab), image_token_index, new_vocab - vocab

def _make_llava_config(vision, text, *, projector: str, image_token_index: int, vision_feature_layer,
                       vision_feature_select_strategy: str, multimodal_projector_bias: bool = True):
    return LlavaConfig(vision=vision, text=text, projector=projector, image_token_index=image_token_index,
                       image_seq_length=None, vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy,
                       multimodal_projector_bias=multimodal_projector_bias)


def from_clip_and_llm(clip_path: str | os.PathLike, llm_path: str | os.PathLike, projector: str = "mlp2x_gelu",
                      vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default",
                      image_token_index: int | None = None, pad_vocab_to_multiple_of: int | None = None,
                      dtype=None, param_dtype=None, seed: int = 0, mesh=None, **runtime) -> nnx.Module:
    """LLaVA from a CLIP or SigLIP checkpoint (the vision model or the full model: vision part only) and a
    LLaMA-family causal LM checkpoint, with a freshly initialized projector (how stage 1 starts).

    The LLM's tokenizer has no `<image>` token: by default it gets id `vocab_size` (the id it receives when
    `to_hf` adds it to the tokenizer) and the embedding table and lm_head grow by one row (the mean row),
    rounded up to `pad_vocab_to_multiple_of` rows. Pass `image_token_index` for a tokenizer that has one.
    Args:
      seed: rng seed of the projector initialization.
    """
    clip_path, llm_path = Path(clip_path), Path(llm_path)
    clip_config, llm_config = read_config(clip_path), read_config(llm_path)
    with CheckpointReader(clip_path) as clip, CheckpointReader(llm_path) as llm:
        dtypes = _dtypes(llm, dtype, param_dtype)
        tower = _vision_family(clip_path, clip_config)
        vision = _config(tower, clip_path, clip_config, **dtypes, **runtime)
        text, image_token_index, grow = _grow_vocab(_config(LLAMA, llm_path, llm_config, **dtypes, **runtime),
                                                    image_token_index, pad_vocab_to_multiple_of)
        cfg = _make_llava_config(vision, text, projector=projector, image_token_index=image_token_index,
                                 vision_feature_layer=vision_feature_layer,
                                 vision_feature_select_strategy=vision_feature_select_strategy)
        create = lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))
        abstract = nnx.eval_shape(create)
        sources = {**plan_sources(abstract, clip, _checked(clip, tower.rename), prefix="vision_tower."),
                   **plan_sources(abstract, llm, _checked(llm, LLAMA.rename), prefix="language_model.",
                                  ignore=LLAMA.ignore)}
        return load_params(create, sources, fresh=lambda n: n.startswith("multi_modal_projector."),
                           transform=vocab_transforms("language_model.", grow, text.tie_word_embeddings),
                           mesh=mesh)


def _vision_family(path: Path, config: dict) -> Family:
    """The vision tower row (CLIP or SigLIP) of a checkpoint's config.json; CheckpointError otherwise."""
    family = of_hf_config(config)
    if family not in VISION_TOWERS:
        raise CheckpointError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a vision "
                              f"tower (expected one of {[t for f in VISION_TOWERS for t in f.hf_model_types]})")
    return family


def from_original_llava(path: str | os.PathLike, clip_path: str | os.PathLike | None = None,
                        image_token_index: int | None = None, pad_vocab_to_multiple_of: int | None = 64,
                        dtype=None, param_dtype=None, mesh=None, **runtime) -> nnx.Module:
    """LLaVA from an original checkpoint (`model.mm_projector.*`, `LlavaLlamaForCausalLM` config).

    The vision tower comes from the checkpoint when it holds `model.vision_tower.*`, otherwise from the CLIP
    checkpoint at `clip_path` (the official `mm_vision_tower`, e.g. openai/clip-vit-large-patch14-336).
    The tower's config comes from `clip_path`, else from `mm_vision_tower` when that is a local folder, else
    it is inferred from the tensor shapes (64-wide heads, as in every OpenAI CLIP ViT).
    Like transformers' conversion, `<image>` gets id `vocab_size` (32000 for Vicuna) and the vocabulary is
    padded to a multiple of `pad_vocab_to_multiple_of` (64) with mean-embedding rows.
    """
    path = Path(path)
    config = read_config(path)
    with CheckpointReader(path) as reader:
        rename = _checked(reader, hf_original.original_tensor_name_to_ours)
        ours = {rename(n): n for n in reader.names() if rename(n) is not None}
        has_tower = any(n.startswith("vision_tower.") for n in ours)
        tower_dir = Path(config.get("mm_vision_tower") or "/nonexistent")
        if clip_path is None and (tower_dir / "config.json").is_file():
            clip_path = tower_dir  # A local copy of the tower the checkpoint names.
        if not has_tower and clip_path is None:
            raise CheckpointError(f"{path}: the checkpoint has no vision tower tensors "
                                  f"('model.vision_tower.vision_tower.*'); pass clip_path, the CLIP checkpoint "
                                  f"named by mm_vision_tower={config.get('mm_vision_tower')!r}")
        dtypes = _dtypes(reader, dtype, param_dtype)
        if clip_path is not None:
            vision = _config(CLIP, Path(clip_path), read_config(clip_path), **dtypes, **runtime)
        else:
            shapes = {o: reader.shape(n) for o, n in ours.items() if o.startswith("vision_tower.")}
            vision = with_runtime(CLIP.config_from_hf(hf_original.vision_config_from_tensors(shapes)), **dtypes,
                                  **runtime)
        text, image_token_index, grow = _grow_vocab(
            _config(LLAMA, path, hf_original.text_config(config), **dtypes, **runtime), image_token_index,
            pad_vocab_to_multiple_of)
        projector = hf_original.projector_type(config)
        cfg = _make_llava_config(vision, text, projector=projector, image_token_index=image_token_index,
                                 vision_feature_layer=hf_original.feature_layer(config),
                                 vision_feature_select_strategy=hf_original.feature_strategy(config))
        create = lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        abstract = nnx.eval_shape(create)
        sources = plan_sources(abstract, reader, rename, ignore=LLAMA.ignore)
        if not has_tower:
            with CheckpointReader(clip_path) as clip:
                sources.update(plan_sources(abstract, clip, _checked(clip, CLIP.rename),
                                            prefix="vision_tower."))
                return load_params(create, sources, mesh=mesh,
                                   transform=vocab_transforms("language_model.", grow, text.tie_word_embeddings))
        return load_params(create, sources, mesh=mesh,
                           transform=vocab_transforms("language_model.", grow, text.tie_word_embeddings))
