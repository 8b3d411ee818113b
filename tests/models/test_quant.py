"""Weight-only quantization: per-layer error bounds, greedy agreement, memory from XLA's analysis, the format."""

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.infer import quant_quality
from llava_jax.models import quant
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM

# A seed drawn per run (printed on failure): the bounds hold for any random model, not one picked seed.
SEED = secrets.randbelow(2**31)
# Relative error bounds per layer output / logits. int8 absmax per channel rounds each weight by at most
# scale / 2 = max|w| / 254 (about 0.4% of a row's largest weight); int4 in groups of 32 by max|w| / 14.
BOUNDS = {8: 0.02, 4: 0.25}


def tiny_llama(seed: int, dtype=jnp.float32, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, dtype=dtype, param_dtype=dtype), **kw})
    return LlamaForCausalLM(cfg, nnx.Rngs(seed))


def test_per_layer_errors_within_bounds():
    model = tiny_llama(SEED)
    ids = jax.random.randint(jax.random.key(SEED), (2, 24), 0, 160)
    errors = {}
    for bits in (8, 4):
        quantized = quant.quantize_model(nnx.clone(model), quant.QuantConfig(bits=bits, group_size=32))
        errors[bits] = quant_quality.layer_errors(model, quantized, ids)
        assert len(errors[bits]) == 4  # three layers and the logits
        assert max(errors[bits]) < BOUNDS[bits], (SEED, bits, errors[bits])
        assert min(errors[bits]) > 0, (SEED, bits, errors[bits])  # the weights really changed
    assert all(e8 < e4 for e8, e4 in zip(errors[8], errors[4])), (SEED, errors)


def test_bf16_model_quantized_error_against_f32():
    """int8 of a bf16 model stays within the bound of the float32 model; its scales keep the weight dtype."""
    model = tiny_llama(SEED)
    bf16 = tiny_llama(SEED, dtype=jnp.bfloat16)
    quantized = quant.quantize_model(nnx.clone(bf16), quant.QuantConfig(bits=8))
    assert quantized.lm_head.weight.scale.dtype == jnp.bfloat16
    ids = jax.random.randint(jax.random.key(SEED + 1), (1, 16), 0, 160)
    bf16_errors = quant_quality.layer_errors(model, bf16, ids)
    int8_errors = quant_quality.layer_errors(model, quantized, ids)
    assert max(int8_errors) < BOUNDS[8] + max(bf16_errors), (SEED, int8_errors, bf16_errors)


def test_quantized_params_shapes_axes_and_groups():
    model = quant.quantize_model(tiny_llama(0, intermediate_size=96), quant.QuantConfig(bits=4, group_size=64))
    down = model.model.layers.mlp.down_proj.weight  # stacked [L, out=64, in=96]: groups of 48 (96 % 64 != 0)
    assert isinstance(down, quant.QuantizedWeight)
    assert down.qvalue.shape == (3, 64, 96) and down.qvalue.dtype == jnp.int4
    assert down.scale.shape == (3, 64, 2)
    assert down.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    assert down.scale.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    assert isinstance(model.lm_head.weight, quant.QuantizedWeight)
    assert isinstance(model.model.embed_tokens.weight, nnx.Param)  # the embedding table stays float
    assert quant.group_for(97, 128) == 97 and quant.group_for(96, 64) == 48 and quant.group_for(4096, 128) == 128
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(model, quant.QuantConfig(bits=8))


def test_dequantize_restores_float_params():
    model = tiny_llama(SEED)
    quantized = quant.quantize_model(nnx.clone(model), quant.QuantConfig(bits=8))
    restored = quant.dequantize_model(nnx.clone(quantized))
    assert quant.quantization_of(restored) is None
    w, w0 = restored.model.layers.self_attn.q_proj.weight, model.model.layers.self_attn.q_proj.weight
    assert isinstance(w, nnx.Param) and w.get_metadata()["out_sharding"] == ("layers", "heads", "embed")
    scale = np.abs(np.asarray(w0[...])).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(np.asarray(w[...]) - np.asarray(w0[...])) <= scale / 2 + 1e-7)
    ids = jnp.arange(10)[None]
    np.testing.assert_allclose(restored(ids), quantized(ids), rtol=1e-5, atol=1e-5)


def test_decode_memory_halves_and_quarters():
    """XLA's memory analysis of a decode step: the quantized weights take 1/2 (int8) and about 1/4 (int4,
    plus one scale per group) of their bf16 bytes."""
    model = tiny_llama(0, dtype=jnp.bfloat16, vocab_size=64, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
    linear_bytes = sum(v.size * 2 for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                       if p[-1] == "weight" and ("proj" in str(p[-2]) or p[0] == "lm_head"))
    memory = {16: quant_quality.decode_memory(model)}
    for bits in (8, 4):
        memory[bits] = quant_quality.decode_memory(
            quant.quantize_model(nnx.clone(model), quant.QuantConfig(bits=bits, group_size=128)))
    other = memory[16]["weights"] - linear_bytes  # the embedding table and the norms stay bf16
    assert memory[8]["cache"] == memory[16]["cache"]
    for bits, share in ((8, 0.5), (4, 0.25)):
        quantized_linear = memory[bits]["weights"] - other
        assert share <= quantized_linear / linear_bytes < share * 1.1, (bits, memory)


def test_greedy_agreement_metric():
    assert quant_quality.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert quant_quality.agreement([1, 2], [1, 2, 3]) == 1.0
    assert quant_quality.agreement([1, 2, 3, 4], [1, 2]) == 0.5
    assert quant_quality.greedy_agreement([[1], [1, 2]], [[1], [3, 2]]) == 0.5
