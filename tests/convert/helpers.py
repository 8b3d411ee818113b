"""Tiny random transformers checkpoints and a tiny tokenizer for the conversion tests."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

VOCAB = 211
IMAGE_SIZE, PATCH = 30, 6
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 25


def clip_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=97, num_hidden_layers=3,
                                         num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=PATCH)


def llama_config(**kw) -> transformers.LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=56, intermediate_size=97, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**fields, **kw})


def llava_config(image_token_index: int = VOCAB - 1) -> transformers.LlavaConfig:
    return transformers.LlavaConfig(vision_config=clip_config(), text_config=llama_config(),
                                    image_token_index=image_token_index, image_seq_length=NUM_PATCHES)


def save_tiny_llava(path: Path, seed: int = 0, **save_kw) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(llava_config()).eval()
    model.save_pretrained(path, **save_kw)
    return model


def save_tiny_clip(path: Path, seed: int = 1, full: bool = False):
    """A CLIPVisionModel, or (full) a CLIPModel with a small text tower too."""
    torch.manual_seed(seed)
    if full:
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=clip_config().to_dict(),
                                                               text_config=text, projection_dim=24))
    else:
        model = transformers.CLIPVisionModel(clip_config())
    model.eval().save_pretrained(path)
    return model


def save_tiny_llama(path: Path, seed: int = 2, dtype=torch.float32, **config_kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(**config_kw)).to(dtype).eval()
    model.save_pretrained(path)
    return model


def save_tiny_tokenizer(path: Path, size: int) -> Path:
    """A word-level tokenizer of `size` tokens: <unk>, <s>, </s>, w3 ... w{size-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<unk>")
    fast.save_pretrained(path)
    return path


def image_ids(text_before: list[int], text_after: list[int], image_token_index: int) -> np.ndarray:
    """[1, T] ids with one image expanded to NUM_PATCHES image tokens (transformers' convention)."""
    return np.array([text_before + [image_token_index] * NUM_PATCHES + text_after])


def pixels(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def official_llava_llama():
    """llava-torch's LlavaLlamaForCausalLM (the official model class); skips when llava-torch is absent."""
    spec = importlib.util.find_spec("llava")
    if spec is None:
        pytest.skip("llava-torch is not installed")
    stub = sys.modules.get("llava.model")
    if stub is not None and not hasattr(stub, "__path__"):
        # Another test helper stubbed the package; let its real submodules import.
        stub.__path__ = [os.path.join(os.path.dirname(spec.origin), "model")]
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    return LlavaConfig, LlavaLlamaForCausalLM


@functools.cache
def _jitted_forward():
    from flax import nnx

    return nnx.jit(lambda model, ids, pix: model(ids, pix))


def forward(model, ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
    """Logits of our LLaVA model, jit-compiled (much faster than eager dispatch on CPU)."""
    import jax.numpy as jnp

    return np.asarray(_jitted_forward()(model, jnp.asarray(ids), jnp.asarray(pix)))
