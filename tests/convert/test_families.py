"""The families table: import, export and our format find a family by its row, not by its name."""

from __future__ import annotations

import pytest
from flax import nnx

from llava_jax.convert import families, native
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
from llava_jax.models.quant import QuantConfig


def test_hf_configs_find_their_row():
    assert families.of_hf_config({"model_type": "llava"}) is families.LLAVA
    assert families.of_hf_config({"model_type": "clip_vision_model"}) is families.CLIP
    assert families.of_hf_config({"model_type": "clip"}) is families.CLIP
    assert families.of_hf_config({"model_type": "siglip_vision_model"}) is families.SIGLIP
    assert families.of_hf_config({"model_type": "siglip"}) is families.SIGLIP
    for model_type in ("llama", "mistral", "qwen2"):
        assert families.of_hf_config({"model_type": model_type}) is families.LLAMA
    # an unknown decoder model_type is still a causal LM by its architecture (its config then says what fails)
    assert families.of_hf_config({"model_type": "phi", "architectures": ["PhiForCausalLM"]}) is families.LLAMA
    assert families.of_hf_config({"model_type": "llava_next"}) is families.LLAVA_NEXT
    assert families.of_hf_config({"model_type": "llava_onevision"}) is families.LLAVA_ONEVISION
    assert families.of_hf_config({"model_type": "llava_next_video",
                                  "architectures": ["LlavaNextVideoForConditionalGeneration"]}) is None


def test_models_find_their_row_and_others_are_refused():
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    assert families.of_model(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))) is families.LLAMA
    with pytest.raises(TypeError, match="cannot export a Linear .expected LlavaForConditionalGeneration, "
                                        "LlavaNextForConditionalGeneration, "
                                        "LlavaOnevisionForConditionalGeneration, "
                                        "LlamaForCausalLM, CLIPVisionModel or SiglipVisionModel"):
        families.of_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_our_formats_allow_lists_are_the_rows_classes_and_quant_config():
    assert set(native.MODEL_TYPES.values()) == {f.model for f in families.FAMILIES}
    # and the quantization settings a quantized folder's model.json carries
    assert set(native.CONFIG_TYPES.values()) == {f.config for f in families.FAMILIES} | {QuantConfig}
    assert all(name.startswith("llava_jax.models.") for name in [*native.MODEL_TYPES, *native.CONFIG_TYPES])
