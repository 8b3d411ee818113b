"""llava_jax: LLaVA and LLaVA-1.5 in JAX / Flax NNX.

    import llava_jax as lj

    model = lj.from_hf("llava-1.5-7b-hf")                 # or lj.from_clip_and_llm(clip, llm)
    logits = model(input_ids, pixel_values=pixels, attention_mask=mask)
    lj.to_hf(model, "out/llava-hf", tokenizer=tokenizer)
    model, tokenizer, image_config, template = lj.load_model("out/llava-hf")   # as chat, eval and bench do
    generator = lj.Generator(model, tokenizer, image_config=image_config, template=template)

Names are imported lazily on first use, so `python -m llava_jax.<tool>` and data worker processes stay
cheap to start.
"""

from __future__ import annotations

import importlib
import logging
import re

# transformers' notices that do not apply to a JAX project, dropped before transformers is first imported (every
# entry point imports this package first): it says "PyTorch was not found. Models won't be available ..." (we
# use its tokenizers and configs only) and, without torchvision, for every image processor (CLIP, SigLIP, LLaVA-NeXT,
# OneVision), "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`
# ..." (the PIL processors are the ones our preprocessing equals).
FOREIGN_NOTICES = (re.compile(r"PyTorch was not found\. Models won't be available"),
                   re.compile(r"`\w+` requires torchvision \(not installed\); falling back to `\w+Pil`"))


class _DropForeignNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice.match(str(record.msg)) for notice in FOREIGN_NOTICES)


for _logger in ("transformers", "transformers.utils.import_utils"):
    if not any(isinstance(f, _DropForeignNotices) for f in logging.getLogger(_logger).filters):
        logging.getLogger(_logger).addFilter(_DropForeignNotices())

_EXPORTS = {
    "llava_jax.models": ("CLIPVisionConfig", "CLIPVisionModel", "LlamaConfig", "LlamaForCausalLM", "LlavaConfig",
                         "LlavaForConditionalGeneration", "PRESETS"),
    "llava_jax.convert": ("from_hf", "from_clip_and_llm", "from_original_llava", "to_hf", "save", "load"),
    "llava_jax.infer.generate": ("Generator", "load_model"),
    "llava_jax.infer.evaluate": ("evaluate",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value
