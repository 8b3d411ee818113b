"""Opening a model for generation: `load_model` (a Hugging Face folder, our `convert.save` format or a finished
training workdir, with its tokenizer, image preprocessing and template) and `load_generator`, the one way chat,
serve, eval and bench open a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llava_jax.data.images import ImageConfig
from llava_jax.infer.decoding import language_model


class ModelLoadError(ValueError):
    """A model folder that cannot be used for generation; the message names the folder and what is wrong."""


def default_template(name: str, tokenizer=None, text_model_type: str | None = None) -> str:
    """The conversation template of a model, by the official CLI's rule on the model name, extended:

    "llama-3" / "llama3" in the name or a tokenizer with `<|eot_id|>` -> llama_3; "llama-2" / "llama_2" ->
    llama_2; "mistral" in the name or a Mistral text model -> mistral_instruct; "qwen" in the name, a Qwen2 text
    model or a tokenizer with chatml's `<|im_start|>` -> qwen_1_5 (LLaVA-NeXT / OneVision on Qwen, and models
    trained with it such as the OneVision demo); otherwise llava_v1 (LLaVA v1 and LLaVA-1.5 Vicuna models; the
    official CLI picks it for every name with "v1").
    """
    name = name.lower()
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if "llama-3" in name or "llama3" in name or "<|eot_id|>" in vocab:
        return "llama_3"
    if "llama-2" in name or "llama_2" in name:
        return "llama_2"
    if "mistral" in name or text_model_type == "mistral":
        return "mistral_instruct"
    if "qwen" in name or text_model_type == "qwen2" or "<|im_start|>" in vocab:
        return "qwen_1_5"
    return "llava_v1"


def load_model(path: str | os.PathLike, *, dtype=None, tokenizer: str | os.PathLike | None = None,
               quantize=None):
    """Loads a model for generation -> (model, tokenizer, image_config, template name).

    PATH is a Hugging Face LLaVA / LLaVA-NeXT / LLaVA-OneVision / LLaMA folder (config.json + weights; tokenizer
    and preprocessor_config.json read from it: CLIP's, SigLIP's or the AnyRes processors, whose grid pinpoints
    must be the model's), a folder in our format (`convert.save`: model.json + params/; the tokenizer from the same
    folder or `tokenizer`), or a finished training workdir (config.json + checkpoints/): its `export_hf` folder.
    The model comes in `decoding_layout` (per-layer weight buffers, for `Generator`; not for `convert`).
    The template is the workdir's `data.template` or `default_template(folder name)`.
    quantize: None, 8, 4 or a `models.quant.QuantConfig`: weight-only quantization at load time (a folder
    written by `convert quantize` is quantized already).
    Raises:
      ModelLoadError naming the folder.
    """
    from transformers import AutoTokenizer

    from llava_jax import convert
    from llava_jax.convert import hf_llama
    from llava_jax.models import quant

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    try:
        path, template = convert.resolve_workdir(path)
        model = convert.load_folder(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or path), trust_remote_code=False)
    except convert.FolderError as e:
        raise ModelLoadError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot load the model or its tokenizer: {e}") from e
    try:
        model = quant.as_quantized(model, quantize)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    language_model(model).model.unstack_layers()  # in place: the one copy of the weights
    image_config = None
    if hasattr(model, "embed_inputs"):
        image_config = _image_config(path, model.config.vision)
        _check_pinpoints(path, model.config, image_config)
    text = model.config.text if hasattr(model.config, "text") else model.config
    template = template or default_template(path.name, tokenizer, hf_llama.hf_model_type(text))
    return model, tokenizer, image_config, template


def _image_config(path: Path, vision) -> ImageConfig:
    """The folder's preprocessor_config.json (CLIP's shortest edge + crop, or SigLIP's / OneVision's square
    resize; LLaVA-1.5 "pad" aspect; AnyRes models read its size and normalization for their tiles) or the
    tower's defaults (its size and normalization)."""
    image_size = vision.image_size
    if not (path / "preprocessor_config.json").is_file():
        return ImageConfig.for_tower(vision, aspect="pad")
    try:
        config = ImageConfig.from_hf(path, aspect="pad")
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path / 'preprocessor_config.json'}: {e}") from e
    if config.crop_size != image_size:
        raise ModelLoadError(f"{path / 'preprocessor_config.json'}: crop size {config.crop_size} differs from the "
                             f"vision tower's image_size {image_size}")
    return config


def _check_pinpoints(path: Path, config, image_config: ImageConfig) -> None:
    """An AnyRes model's preprocessor_config.json must tile with the model's own grid pinpoints and tile size."""
    ours = getattr(config, "image_grid_pinpoints", None)
    file = path / "preprocessor_config.json"
    if ours is None or not file.is_file():
        return
    if image_config.size != config.vision.image_size:
        raise ModelLoadError(f"{file}: size {image_config.size} differs from the tile size (the vision tower's "
                             f"image_size {config.vision.image_size}); AnyRes tiles are resized to it")
    theirs = json.loads(file.read_text()).get("image_grid_pinpoints")
    if theirs is not None and [list(p) for p in theirs] != [list(p) for p in ours]:
        raise ModelLoadError(f"{file}: image_grid_pinpoints {theirs} differ from the model's "
                             f"{[list(p) for p in ours]}")


COMPILE_CACHE_ENV = "LLAVA_JAX_COMPILE_CACHE"  # a folder for JAX's persistent compilation cache; "" turns it off


def compile_cache_dir(path: str | os.PathLike) -> Path | None:
    """Where the compiled generation programs of the model at `path` are kept between runs: $LLAVA_JAX_COMPILE_CACHE
    if set ("" = nowhere), else `compile_cache/` in the training workdir or model folder (None if not writable)."""
    if COMPILE_CACHE_ENV in os.environ:
        return Path(os.environ[COMPILE_CACHE_ENV]) if os.environ[COMPILE_CACHE_ENV] else None
    path = Path(path)
    return path / "compile_cache" if path.is_dir() and os.access(path, os.W_OK) else None


def use_compile_cache(directory: str | os.PathLike | None) -> None:
    """Points JAX's persistent compilation cache at `directory` (every program, however fast it compiled), so a
    later chat, eval or serve of the same model loads its programs instead of compiling them."""
    import jax

    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_generator(path: str | os.PathLike, *, dtype=None, template: str | None = None,
                   tokenizer: str | os.PathLike | None = None, **load_options):
    """`load_model` -> a `Generator`, as chat, serve, eval and bench open a model, with JAX's persistent
    compilation cache in `compile_cache_dir(path)`.

    template: a template name that replaces the model's own (`load_model`'s); it is checked before the model
    loads. dtype, tokenizer and `load_options` go to `load_model`.
    Raises:
      ModelLoadError naming the folder, or the unknown template.
    """
    from llava_jax.data.conversation import get_template
    from llava_jax.infer.generate import Generator

    try:
        chosen = get_template(template) if template else None
    except KeyError as e:
        raise ModelLoadError(e.args[0]) from None
    use_compile_cache(compile_cache_dir(path))
    model, tokenizer, image_config, default = load_model(path, dtype=dtype, tokenizer=tokenizer, **load_options)
    return Generator(model, tokenizer, image_config=image_config, template=chosen or default)


__all__ = ["ModelLoadError", "default_template", "load_model", "load_generator", "compile_cache_dir",
           "use_compile_cache"]
