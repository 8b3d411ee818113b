"""Data: LLaVA sources, images, prompts and labels, the grain training pipeline, TFDS shards, demo data,
GPT-assisted instruction data (`generate`, `instruct`, `coco_context`, `llm_client`) and ScienceQA conversion.

Public names are imported lazily from their modules on first use, so that `import llava_jax.data` (and
every grain worker process) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "errors": ("BadSample", "DataFileError"),
    "paths": ("resolve_inside",),
    "conversation": ("Template", "TEMPLATES", "get_template", "render", "generation_prompt", "stop_strings"),
    "tokenize": ("IGNORE_INDEX", "TokenizedSample", "add_image_token", "tokenize_conversation",
                 "validate_conversations"),
    "images": ("ImageConfig", "load_image", "expand_to_square", "preprocess"),
    "sources": ("LlavaJsonSource",),
    "check": ("Report", "check_dataset"),
    "grouping": ("group_by_modality_length", "padding_fraction"),
    "pipeline": ("PipelineConfig", "TrainIterator", "LlavaSampleProcessor", "make_train_iterator"),
    "anyres_samples": ("AnyResLayouts", "AnyResSampleProcessor"),
    "tfds_builder": ("LlavaDataset", "TfdsLlavaSource"),
    "synthetic": ("SyntheticPaths", "build_tokenizer"),
}
# `llava_jax.data.generate` is the instruction-data generator module; the demo data generator is an alias.
_ALIASES = {"build_tfds_dataset": ("tfds_builder", "build"), "generate_synthetic": ("synthetic", "generate")}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_MODULE_OF, *_ALIASES])


def __getattr__(name: str):
    if name in _MODULE_OF:
        module, attribute = _MODULE_OF[name], name
    elif name in _ALIASES:
        module, attribute = _ALIASES[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from llava_jax.data.anyres_samples import AnyResLayouts, AnyResSampleProcessor
    from llava_jax.data.check import Report, check_dataset
    from llava_jax.data.conversation import (TEMPLATES, Template, generation_prompt, get_template, render,
                                             stop_strings)
    from llava_jax.data.errors import BadSample, DataFileError
    from llava_jax.data.grouping import group_by_modality_length, padding_fraction
    from llava_jax.data.images import ImageConfig, expand_to_square, load_image, preprocess
    from llava_jax.data.paths import resolve_inside
    from llava_jax.data.pipeline import LlavaSampleProcessor, PipelineConfig, TrainIterator, make_train_iterator
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.synthetic import SyntheticPaths, build_tokenizer
    from llava_jax.data.synthetic import generate as generate_synthetic
    from llava_jax.data.tfds_builder import LlavaDataset, TfdsLlavaSource
    from llava_jax.data.tfds_builder import build as build_tfds_dataset
    from llava_jax.data.tokenize import (IGNORE_INDEX, TokenizedSample, add_image_token, tokenize_conversation,
                                         validate_conversations)
