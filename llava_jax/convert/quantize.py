"""`python -m llava_jax.convert quantize`: a model folder -> a weight-only quantized folder in our format.

The input is a Hugging Face folder or one in our format; the output is our format (model.json records the
`QuantConfig`, params/ holds int8 / int4 values and their scales; see `llava_jax.models.quant`), with the input's
tokenizer and preprocessor files copied beside it, so `load_model` and every CLI read it like any model folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax.numpy as jnp

from llava_jax.convert.native import MODEL_JSON, PARAMS_DIR, load, save
from llava_jax.models.quant import QuantConfig, quantization_of, quantize_model

# Files of a model folder that are weights or configs we rewrite; every other top-level file (tokenizer,
# preprocessor, chat template) is copied.
_NOT_COPIED = ("config.json", MODEL_JSON, "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def read_model(path: str | os.PathLike, **dtypes):
    """A stacked model from a folder in our format (model.json) or a Hugging Face folder (config.json)."""
    from llava_jax.convert.importers import from_hf

    path = Path(path)
    if (path / MODEL_JSON).is_file():
        return load(path, **{k: jnp.dtype(v) for k, v in dtypes.items() if v is not None})
    if (path / "config.json").is_file():
        return from_hf(path, **dtypes)
    raise FileNotFoundError(f"{path}: not a model folder (no config.json or {MODEL_JSON})")


def quantize_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: QuantConfig, *,
                    dtype=None, param_dtype=None) -> Path:
    """Reads `model_dir` (`dtype` / `param_dtype`: as the importers; the scales and the unquantized weights
    keep the storage dtype), quantizes it with `config` and saves it to `out_dir` (our format) with the
    tokenizer and preprocessor files. Returns the output folder."""
    model_dir = Path(model_dir)
    model = read_model(model_dir, dtype=dtype, param_dtype=param_dtype)
    if quantization_of(model) is not None:
        raise ValueError(f"{model_dir}: already quantized ({quantization_of(model)})")
    out = save(quantize_model(model, config), out_dir)
    for item in sorted(model_dir.iterdir()):
        if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, out / item.name)
    return out


def param_bytes(path: str | os.PathLike) -> int:
    """Bytes of a saved folder's params/ (on disk)."""
    return sum(f.stat().st_size for f in (Path(path) / PARAMS_DIR).rglob("*") if f.is_file())


__all__ = ["quantize_folder", "read_model", "param_bytes"]
