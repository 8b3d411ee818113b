"""Hugging Face import and export.

Import (weights stream tensor by tensor into an abstractly created model; bfloat16 stays bfloat16 unless a
dtype is given):
- `from_hf(path)`: a Hugging Face LLaVA folder (every on-disk layout), a LLaMA-family causal LM folder, a
  CLIP folder (vision tower), or an original LLaVA folder.
- `from_clip_and_llm(clip_path, llm_path)`: LLaVA from a CLIP tower + an LLM, with a fresh projector.
- `from_original_llava(path, clip_path=None)`: the official `model.mm_projector.*` layout.

Export: `to_hf(model, path, tokenizer=None)` writes a folder that transformers' `from_pretrained` and
`AutoProcessor.from_pretrained` load. Our own format: `save(model, dir)` / `load(dir)` (Orbax + JSON).

dtypes: `param_dtype` is the storage dtype (default: the checkpoint's), `dtype` the compute dtype
(default: `param_dtype`); `from_hf(path, dtype=jnp.float32)` also stores float32 when `param_dtype` is None.
Sharding: every importer and `load` take `mesh=`; each parameter then goes straight into its sharding
(logical axis rules of `llava_jax.sharding`) as it is read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.convert import hf_original
from llava_jax.convert.io import (CheckpointError, CheckpointReader, load, load_params, plan_sources,
                                  read_config, save, with_runtime)

__all__ = ["from_hf", "from_clip_and_llm", "from_original_llava", "to_hf", "save", "load", "CheckpointError",
           "CheckpointReader", "IMAGE_TOKEN"]

IMAGE_TOKEN = "<image>"
# OpenAI CLIP normalization (CLIPImageProcessor defaults, REFERENCE.md).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------- import


def _dtypes(reader: CheckpointReader, dtype, param_dtype) -> dict:
    param_dtype = param_dtype or dtype or reader.float_dtype()
    return {"param_dtype": jnp.dtype(param_dtype), "dtype": jnp.dtype(dtype or param_dtype)}


def _ignore_tied_head(name: str) -> bool:
    # Some tied-embedding checkpoints also store lm_head.weight; transformers ignores it too.
    return name.endswith("lm_head.weight")


def from_hf(path: str | os.PathLike, dtype=None, param_dtype=None, mesh=None, **runtime) -> nnx.Module:
    """Imports a Hugging Face checkpoint folder, detecting what it holds from config.json.

    - model_type 'llava' -> LlavaForConditionalGeneration (classic, 4.52+ and 5.x tensor layouts);
    - an original LLaVA config (`mm_*` fields) -> `from_original_llava(path)`;
    - 'clip_vision_model' / 'clip' -> CLIPVisionModel (vision part only);
    - a LLaMA-family causal LM -> LlamaForCausalLM.
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
    model_type = config.get("model_type")
    if model_type == "llava":
        return _import_llava(path, config, dtype, param_dtype, mesh, runtime)
    if model_type in ("clip", "clip_vision_model"):
        return _import_clip(path, config, dtype, param_dtype, mesh, runtime)
    from llava_jax.convert.hf_llama import SUPPORTED_MODEL_TYPES

    if model_type in SUPPORTED_MODEL_TYPES or any(a.endswith("ForCausalLM") for a in config.get("architectures") or ()):
        return _import_llama(path, config, dtype, param_dtype, mesh, runtime)
    raise CheckpointError(f"{path / 'config.json'}: unknown model_type {model_type!r} / architectures "
                          f"{config.get('architectures')}; expected a LLaVA, CLIP or LLaMA-family checkpoint")


def _llama_config(path: Path, config: dict, **runtime):
    from llava_jax.convert.hf_llama import llama_config_from_hf

    try:
        cfg = llama_config_from_hf(config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    return with_runtime(cfg, **runtime)


def _clip_config(path: Path, config: dict, **runtime):
    from llava_jax.convert.hf_clip import clip_config_from_hf

    try:
        return with_runtime(clip_config_from_hf(config), **runtime)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e


def _import_llama(path, config, dtype, param_dtype, mesh, runtime):
    from llava_jax.models.llama import LlamaForCausalLM

    with CheckpointReader(path) as reader:
        cfg = _llama_config(path, config, **_dtypes(reader, dtype, param_dtype), **runtime)
        create = lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        sources = plan_sources(nnx.eval_shape(create), reader, _skip_buffers, ignore=_ignore_tied_head)
        return load_params(create, sources, mesh=mesh)


def _skip_buffers(name: str) -> str | None:
    return None if name.endswith(".rotary_emb.inv_freq") else name


def _import_clip(path, config, dtype, param_dtype, mesh, runtime):
    from llava_jax.convert.hf_clip import clip_tensor_name_to_ours
    from llava_jax.models.clip_vit import CLIPVisionModel

    with CheckpointReader(path) as reader:
        cfg = _clip_config(path, config, **_dtypes(reader, dtype, param_dtype), **runtime)
        create = lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
        sources = plan_sources(nnx.eval_shape(create), reader, _checked(reader, clip_tensor_name_to_ours))
        return load_params(create, sources, mesh=mesh)


def _checked(reader: CheckpointReader, rename: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """`rename` with its ValueError re-raised naming the checkpoint file."""

    def wrapped(name):
        try:
            return rename(name)
        except ValueError as e:
            raise CheckpointError(f"{reader.file_of(name)}: {e}") from e

    return wrapped


def _import_llava(path, config, dtype, param_dtype, mesh, runtime):
    from llava_jax.convert.hf_llava import llava_config_from_hf, llava_tensor_name_to_ours
    from llava_jax.models.llava import LlavaForConditionalGeneration

    with CheckpointReader(path) as reader:
        try:
            cfg = llava_config_from_hf(config)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        cfg = with_runtime(cfg, **_dtypes(reader, dtype, param_dtype), **runtime)
        create = lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        sources = plan_sources(nnx.eval_shape(create), reader, _checked(reader, _skip(llava_tensor_name_to_ours)),
                               ignore=_ignore_tied_head)
        return load_params(create, sources, mesh=mesh)


def _skip(rename):
    return lambda name: None if name.endswith(".rotary_emb.inv_freq") else rename(name)


def _pad_rows(new_rows: int) -> Callable[[np.ndarray], np.ndarray]:
    """[V, D] -> [V + new_rows, D]; new rows are the mean row (transformers' conversion samples around it)."""

    def pad(table: np.ndarray) -> np.ndarray:
        mean = table.astype(np.float32).mean(axis=0, keepdims=True).astype(table.dtype)
        return np.concatenate([table, np.repeat(mean, new_rows, axis=0)], axis=0)

    return pad


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _grow_vocab(text_cfg, image_token_index: int | None, pad_to_multiple_of: int | None):
    """(text config with room for the image token, image token id, vocab growth in rows)."""
    vocab = text_cfg.vocab_size
    if image_token_index is None:
        image_token_index = vocab  # The id `<image>` gets when added to the LLM's tokenizer.
    new_vocab = _round_up(max(vocab, image_token_index + 1), pad_to_multiple_of)
    return dataclasses.replace(text_cfg, vocab_size=new_vocab), image_token_index, new_vocab - vocab


def _vocab_transforms(prefix: str, grow: int, tied: bool) -> dict:
    if not grow:
        return {}
    names = [prefix + "model.embed_tokens.weight"] + ([] if tied else [prefix + "lm_head.weight"])
    return {n: _pad_rows(grow) for n in names}


def _make_llava_config(vision, text, *, projector: str, image_token_index: int, vision_feature_layer,
                       vision_feature_select_strategy: str, multimodal_projector_bias: bool = True):
    from llava_jax.models.llava import LlavaConfig

    patches = (vision.image_size // vision.patch_size) ** 2
    seq = patches + (1 if vision_feature_select_strategy == "full" else 0)
    return LlavaConfig(vision=vision, text=text, projector=projector, image_token_index=image_token_index,
                       image_seq_length=seq, vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy,
                       multimodal_projector_bias=multimodal_projector_bias)


def from_clip_and_llm(clip_path: str | os.PathLike, llm_path: str | os.PathLike, projector: str = "mlp2x_gelu",
                      vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default",
                      image_token_index: int | None = None, pad_vocab_to_multiple_of: int | None = None,
                      dtype=None, param_dtype=None, seed: int = 0, mesh=None, **runtime) -> nnx.Module:
    """LLaVA from a CLIP checkpoint (CLIPVisionModel or full CLIPModel: vision part only) and a LLaMA-family
    causal LM checkpoint, with a freshly initialized projector (how stage 1 starts).

    The LLM's tokenizer has no `<image>` token: by default it gets id `vocab_size` (the id it receives when
    `to_hf` adds it to the tokenizer) and the embedding table and lm_head grow by one row (the mean row),
    rounded up to `pad_vocab_to_multiple_of` rows. Pass `image_token_index` for a tokenizer that has one.
    Args:
      seed: rng seed of the projector initialization.
    """
    from llava_jax.convert.hf_clip import clip_tensor_name_to_ours
    from llava_jax.models.llava import LlavaForConditionalGeneration

    clip_path, llm_path = Path(clip_path), Path(llm_path)
    clip_config, llm_config = read_config(clip_path), read_config(llm_path)
    with CheckpointReader(clip_path) as clip, CheckpointReader(llm_path) as llm:
        dtypes = _dtypes(llm, dtype, param_dtype)
        vision = _clip_config(clip_path, clip_config, **dtypes, **runtime)
        text, image_token_index, grow = _grow_vocab(_llama_config(llm_path, llm_config, **dtypes, **runtime),
                                                    image_token_index, pad_vocab_to_multiple_of)
        cfg = _make_llava_config(vision, text, projector=projector, image_token_index=image_token_index,
                                 vision_feature_layer=vision_feature_layer,
                                 vision_feature_select_strategy=vision_feature_select_strategy)
        create = lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))
        abstract = nnx.eval_shape(create)
        sources = {**plan_sources(abstract, clip, _checked(clip, clip_tensor_name_to_ours), prefix="vision_tower."),
                   **plan_sources(abstract, llm, _skip_buffers, prefix="language_model.", ignore=_ignore_tied_head)}
        return load_params(create, sources, fresh=lambda n: n.startswith("multi_modal_projector."),
                           transform=_vocab_transforms("language_model.", grow, text.tie_word_embeddings),
                           mesh=mesh)


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
    from llava_jax.convert.hf_clip import clip_config_from_hf, clip_tensor_name_to_ours
    from llava_jax.models.llava import LlavaForConditionalGeneration

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
            vision = _clip_config(Path(clip_path), read_config(clip_path), **dtypes, **runtime)
        else:
            shapes = {o: reader.shape(n) for o, n in ours.items() if o.startswith("vision_tower.")}
            vision = with_runtime(clip_config_from_hf(hf_original.vision_config_from_tensors(shapes)), **dtypes,
                                  **runtime)
        text, image_token_index, grow = _grow_vocab(
            _llama_config(path, hf_original.text_config(config), **dtypes, **runtime), image_token_index,
            pad_vocab_to_multiple_of)
        projector = hf_original.projector_type(config)
        cfg = _make_llava_config(vision, text, projector=projector, image_token_index=image_token_index,
                                 vision_feature_layer=hf_original.feature_layer(config),
                                 vision_feature_select_strategy=hf_original.feature_strategy(config))
        create = lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        abstract = nnx.eval_shape(create)
        sources = plan_sources(abstract, reader, rename, ignore=_ignore_tied_head)
        if not has_tower:
            with CheckpointReader(clip_path) as clip:
                sources.update(plan_sources(abstract, clip, _checked(clip, clip_tensor_name_to_ours),
                                            prefix="vision_tower."))
                return load_params(create, sources, mesh=mesh,
                                   transform=_vocab_transforms("language_model.", grow, text.tie_word_embeddings))
        return load_params(create, sources, mesh=mesh,
                           transform=_vocab_transforms("language_model.", grow, text.tie_word_embeddings))


# ------------------------------------------------------------------------------------------------- export


def _model_kind(model: nnx.Module) -> str:
    from llava_jax.models.clip_vit import CLIPVisionModel
    from llava_jax.models.llama import LlamaForCausalLM
    from llava_jax.models.llava import LlavaForConditionalGeneration

    for cls, kind in ((LlavaForConditionalGeneration, "llava"), (LlamaForCausalLM, "llama"),
                      (CLIPVisionModel, "clip")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"to_hf: cannot export a {type(model).__name__} (expected LlavaForConditionalGeneration, "
                    f"LlamaForCausalLM or CLIPVisionModel)")


def _hf_config(model: nnx.Module, kind: str) -> dict:
    """Our config -> Hugging Face config dict (with architectures and dtype)."""
    cfg = model.config
    if kind == "llava":
        from llava_jax.convert.hf_llava import llava_config_to_hf

        d, arch = llava_config_to_hf(cfg), "LlavaForConditionalGeneration"
        d["text_config"] = {k: v for k, v in d["text_config"].items() if k != "architectures"}
    elif kind == "llama":
        from llava_jax.convert.hf_llama import llama_config_to_hf

        d = llama_config_to_hf(cfg)
        arch = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type"),
                                                                                 "LlamaForCausalLM")
    else:
        from llava_jax.convert.hf_clip import clip_config_to_hf

        d, arch = clip_config_to_hf(cfg), "CLIPVisionModel"
    param_dtype = cfg.text.param_dtype if kind == "llava" else cfg.param_dtype
    return {**d, "architectures": [arch], "dtype": jnp.dtype(param_dtype).name}


def _text_config_dict(hf_config: dict, kind: str) -> dict:
    return hf_config["text_config"] if kind == "llava" else hf_config


def _write_hf_config(hf_config: dict, path: Path) -> None:
    """Writes config.json through transformers' own config class, so it is in the canonical form."""
    from transformers import AutoConfig

    d = dict(hf_config)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    config.save_pretrained(path)


def _load_tokenizer(tokenizer):
    import copy

    from transformers import AutoTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(str(tokenizer))
    return copy.deepcopy(tokenizer)  # The caller's tokenizer is left unchanged.


def add_image_token(tokenizer, image_token_index: int):
    """Ensures `<image>` is a special token with id `image_token_index` (adding it when absent).

    Raises:
      ValueError when the tokenizer already maps `<image>` elsewhere, or adding it cannot give that id.
    """
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN in vocab:
        if vocab[IMAGE_TOKEN] != image_token_index:
            raise ValueError(f"tokenizer: {IMAGE_TOKEN!r} has id {vocab[IMAGE_TOKEN]} but the model's "
                             f"image_token_index is {image_token_index}")
        return tokenizer
    if len(tokenizer) != image_token_index:
        raise ValueError(f"tokenizer: it has {len(tokenizer)} tokens and no {IMAGE_TOKEN!r}; adding it gives id "
                         f"{len(tokenizer)}, but the model's image_token_index is {image_token_index}")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _default_image_processor(vision_cfg):
    """CLIPImageProcessor of OpenAI CLIP at the tower's resolution (resize shortest side, center crop)."""
    from transformers import CLIPImageProcessor

    size = vision_cfg.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD), do_convert_rgb=True)


def _load_image_processor(image_processor, vision_cfg):
    from transformers import AutoImageProcessor

    if image_processor is None:
        return _default_image_processor(vision_cfg)
    if isinstance(image_processor, (str, os.PathLike)):
        image_processor = AutoImageProcessor.from_pretrained(str(image_processor))
    crop = getattr(image_processor, "crop_size", None) or {}
    if crop and (crop.get("height"), crop.get("width")) != (vision_cfg.image_size,) * 2:
        raise ValueError(f"image processor: crop size {crop} does not match the vision tower's image_size "
                         f"{vision_cfg.image_size}")
    return image_processor


def to_hf(model: nnx.Module, path: str | os.PathLike, tokenizer=None, image_processor=None,
          max_shard_size: int | str = "5GB", chat_template: str | None = None) -> Path:
    """Exports a model to a Hugging Face folder, streaming tensors shard by shard.

    Writes config.json, `model.safetensors` or sharded `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json` in the classic layout (LLaVA: `vision_tower.vision_model.*`,
    `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`), and:
    - LLaVA: preprocessor_config.json (CLIPImageProcessor at the tower's resolution unless `image_processor`
      is given); with a tokenizer also the tokenizer files (with `<image>` added as a special token at
      `image_token_index`) and processor_config.json (LlavaProcessor: patch size, select strategy,
      num_additional_image_tokens=1 for the CLS token). When the tokenizer outgrows the vocabulary,
      embed_tokens and lm_head are padded with mean rows and text_config.vocab_size follows.
    - LLaMA: the tokenizer files when given. CLIP: preprocessor_config.json.
    Args:
      tokenizer: a folder or a transformers tokenizer (not modified), or None.
      image_processor: a folder or a transformers image processor, or None for the CLIP default.
      max_shard_size: bytes or a string like '5GB' / '500MB'.
      chat_template: a Jinja chat template stored with the tokenizer / processor, or None.
    Returns:
      The output folder.
    """
    from llava_jax.convert.io import model_tensors, tensor_specs, write_safetensors

    path = Path(path)
    kind = _model_kind(model)
    hf_config = _hf_config(model, kind)
    tensors, specs = model_tensors(model), tensor_specs(model)
    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and kind != "clip":
        if kind == "llava":
            add_image_token(tok, model.config.image_token_index)
        if chat_template is not None:
            tok.chat_template = chat_template
        text = _text_config_dict(hf_config, kind)
        grow = len(tok) - text["vocab_size"]
        if grow > 0:
            prefix = "language_model." if kind == "llava" else ""
            for name, pad in _vocab_transforms(prefix, grow, text.get("tie_word_embeddings", False)).items():
                tensors[name] = (lambda thunk, pad: lambda: pad(thunk()))(tensors[name], pad)
                shape = specs[name].shape
                specs[name] = type(specs[name])((shape[0] + grow,) + tuple(shape[1:]), specs[name].dtype)
            text["vocab_size"] = len(tok)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, specs, path, max_shard_size=max_shard_size)
    _write_hf_config(hf_config, path)
    _write_preprocessing(model, kind, path, tok, image_processor, chat_template)
    return path


def _write_preprocessing(model, kind: str, path: Path, tokenizer, image_processor, chat_template) -> None:
    if kind == "llama":
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return
    vision_cfg = model.config.vision if kind == "llava" else model.config
    processor = _load_image_processor(image_processor, vision_cfg)
    if kind == "clip" or tokenizer is None:
        processor.save_pretrained(path)
        return
    from transformers import LlavaProcessor

    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   chat_template=chat_template, image_token=IMAGE_TOKEN,
                   num_additional_image_tokens=1).save_pretrained(path)
