"""LLaMA-family decoder (LLaMA / Vicuna, LLaMA-3.x, Mistral, Qwen2-style biases), mirroring transformers'
LlamaForCausalLM.

Parameter names equal the Hugging Face state dict with the decoder layers stacked on a leading `layers`
axis: `model.embed_tokens.weight`, `model.layers.self_attn.{q,k,v,o}_proj.{weight,bias}`,
`model.layers.mlp.{gate,up,down}_proj.weight`, `model.layers.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight` (absent when the embeddings are tied), so
`llava_jax.convert.params.load_state_dict(model, hf_model.state_dict())` loads a transformers model.

Two entry points, both pure functions of the `nnx.split` state under `jax.jit`:
- `model(input_ids, attention_mask=...)`: full causal forward (training, scoring).
- `model.init_cache(...)` + `model.decode(cache, ...)`: KV-cache prefill and one-token steps. Cache slots
  are written in order; `cache.mask` marks the slots that hold real tokens, so left-padded batches work.
  The cache [L, B, K, S, head_dim] rides in the layer loop's carry and each layer writes its new slots in place;
  a one-token step attends on the cache layout directly, so a donated step costs one read of the weights and
  the cache. `LlamaModel.unstack_layers()` gives each layer its own weight buffers (fastest GPU decoding).
Positions are `cumsum(attention_mask) - 1` (what transformers' `generate` uses), so a padded row gives
the logits its unpadded sequence would get.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax.models import attention as attention_lib
from llava_jax.models import layers
from llava_jax.models.layers import Embedding, Linear, RMSNorm
from llava_jax.sharding import BTD, BTF, BTHK, BTKK, BTV, constrain

ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (Hugging Face field names and defaults) plus runtime fields.

    rope_scaling: None or the Hugging Face dict, {"rope_type": "linear", "factor": f} or
      {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}.
    attention_bias: biases on q/k/v_proj; o_proj_bias (None: same as attention_bias, as in transformers'
      Llama; False for Qwen2, which has q/k/v biases only).
    sliding_window: Mistral's local attention window (a query sees the last `sliding_window` tokens), or None.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    o_proj_bias: bool | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    # Runtime fields (not part of the checkpoint).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    # Training / prefill attention kernel (`llava_jax.models.attention`): None / "xla", "cudnn", "splash".
    attention_impl: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.o_proj_bias is None:
            set_("o_proj_bias", self.attention_bias)
        if self.rope_scaling is not None:
            set_("rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.attention_impl not in (None, *attention_lib.IMPLS):
            raise ValueError(f"LlamaConfig: attention_impl {self.attention_impl!r} is not None or one of "
                             f"{attention_lib.IMPLS}")
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"LlamaConfig: remat {self.remat!r} is not one of {sorted(layers.REMAT_POLICIES)}")

    def __hash__(self):
        scaling = None if self.rope_scaling is None else tuple(sorted(self.rope_scaling.items()))
        fields = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_scaling"]
        return hash((*fields, scaling))

    @property
    def rope(self) -> tuple:
        """Hashable rotary settings: (head_dim, theta, ((key, value), ...) of the scaling dict)."""
        scaling = () if self.rope_scaling is None else tuple(sorted(self.rope_scaling.items()))
        return (self.head_dim, float(self.rope_theta), scaling)


def _normalize_rope_scaling(scaling: Mapping[str, Any]) -> dict | None:
    """Validates a Hugging Face rope scaling dict; accepts the legacy key `type`; 'default' -> None."""
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig: rope_scaling rope_type {rope_type!r} is not supported "
                         f"(supported: {ROPE_TYPES})")
    if rope_type == "default":
        return None
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"LlamaConfig: rope_scaling of type {rope_type!r} lacks {missing}")
    return {"rope_type": rope_type, **{k: scaling[k] for k in _ROPE_KEYS[rope_type]}}


PRESETS: dict[str, LlamaConfig] = {
    # lmsys/vicuna-7b-v1.5 and -13b-v1.5 (LLaMA-2 architecture).
    "vicuna_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                             max_position_embeddings=4096),
    "vicuna_13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    # meta-llama/Llama-3.1-8B.
    "llama3_1_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                               rope_theta=500000.0, max_position_embeddings=131072,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # mistralai/Mistral-7B-v0.1.
    "mistral_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                              rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096),
}


# ----------------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, computed step by step as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    params = dict(scaling)
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, rope: tuple, dtype) -> tuple[jax.Array, jax.Array]:
    """positions int [B, T] -> (cos, sin) [B, T, head_dim] in `dtype` (angles in float32)."""
    inv_freq = jnp.asarray(rope_inv_freq(*rope))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, head_dim], cos/sin [B, T, head_dim] -> x rotated (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------------------------
# Modules


class KVCache(NamedTuple):
    """Decoding state. key/value: [L, B, K, S, head_dim] (per head, the slots are contiguous: a decode step
    reads them as one [S, head_dim] matrix); mask: bool [B, S] (slot holds a real token); index: int32 []
    (next slot to write) or int32 [B] (each row's own next slot: rows of different lengths, as the serving
    engine's decode slots)."""

    key: jax.Array
    value: jax.Array
    mask: jax.Array
    index: jax.Array


def cached_attention(q: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of a few new queries over cache slots, on the cache's own layout (no relayout, no copy).

    q [B, T, N, head_dim]; key/value [B, K, S, head_dim] (K divides N); mask bool [B|1, 1, T, S].
    Scores and softmax in float32. Returns [B, T, N, head_dim] in q's dtype.
    """
    b, t, n, d = q.shape
    k = key.shape[1]
    q = q.reshape(b, t, k, n // k, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, key.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(d).astype(np.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T, S] over [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, value.astype(q.dtype), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, n, d)


class LlamaAttention(nnx.Module):
    """Grouped-query attention with rotary embeddings; K = num_kv_heads divides N = num_heads."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 o_bias: bool, implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.implementation = implementation
        self.q_proj = Linear(hidden_size, num_heads * head_dim, axes=("heads", "embed"), use_bias=qkv_bias, **kw)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, axes=("kv", "embed"), use_bias=qkv_bias, **kw)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, axes=("kv", "embed"), use_bias=qkv_bias, **kw)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, axes=("embed", "heads"), use_bias=o_bias, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None, *,
                 cache: tuple[jax.Array, jax.Array] | None = None, layer: jax.Array | None = None,
                 index: jax.Array | None = None, segment_ids: jax.Array | None = None):
        """x [B, T, D]; mask bool [B|1, 1, T, S] or None (plain causal); segment_ids int [B, T] (packed
        samples, 0 = padding; used when mask is None).

        With cache = (key, value) of all layers [L, B, K, S, head_dim], this layer's new keys/values are
        written in place at [layer, :, :, index:index + T] and attention runs over all S slots of the layer:
        one-token steps read the cache where it lies (`cached_attention`), longer inputs (prefill) use
        `jax.nn.dot_product_attention`.
        Returns (out [B, T, D], updated cache or None).
        """
        b, t, _ = x.shape
        heads = lambda y, n: y.reshape(b, t, n, self.head_dim)
        q = constrain(apply_rope(heads(_named(self.q_proj(x), "query_proj"), self.num_heads), cos, sin), BTHK)
        k = constrain(apply_rope(heads(_named(self.k_proj(x), "key_proj"), self.num_kv_heads), cos, sin), BTKK)
        v = constrain(heads(_named(self.v_proj(x), "value_proj"), self.num_kv_heads), BTKK)
        dense_impl = "cudnn" if self.implementation == "cudnn" else None  # masked / cached paths
        if cache is None and mask is None:
            out = constrain(attention_lib.attention(q, k, v, segment_ids=segment_ids, causal=True,
                                                    impl=self.implementation), BTHK)
        elif cache is None:
            out = constrain(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=dense_impl), BTHK)
        else:
            key, value = (_write_layer(c, new, layer, index) for c, new in zip(cache, (k, v)))
            layer_k, layer_v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (key, value))
            if t == 1:
                out = cached_attention(q, layer_k, layer_v, mask)
            else:
                layer_k, layer_v = (c.swapaxes(1, 2).astype(q.dtype) for c in (layer_k, layer_v))
                out = jax.nn.dot_product_attention(q, layer_k, layer_v, mask=mask, implementation=dense_impl)
            cache = (key, value)
        out = _named(out, "attention_out").reshape(b, t, self.num_heads * self.head_dim)
        return _named(self.o_proj(out), "out_proj"), cache


def _named(x: jax.Array, name: str) -> jax.Array:
    """Tags an activation for the remat policies (`layers.REMAT_POLICIES`)."""
    return checkpoint_name(x, name)


def _write_layer(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """cache [L, B, K, S, head_dim] with new [B, T, K, head_dim] written at [layer, :, :, index:index + T];
    index int32 [] or [B] (each row at its own slot: the serving engine's decode slots)."""
    update = new.swapaxes(1, 2)[None].astype(cache.dtype)
    zero = jnp.zeros((), jnp.int32)
    if jnp.ndim(index) == 1:
        write_row = lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (layer.astype(jnp.int32), zero, i, zero))
        return jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)(cache, update, index.astype(jnp.int32))
    return jax.lax.dynamic_update_slice(cache, update, (layer.astype(jnp.int32), zero, zero,
                                                        jnp.asarray(index, jnp.int32), zero))


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("mlp", "embed"), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        hidden = jax.nn.silu(_named(self.gate_proj(x), "mlp_gate")) * _named(self.up_proj(x), "mlp_up")
        return _named(self.down_proj(constrain(hidden, BTF)), "mlp_out")


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 *, rms_norm_eps: float, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 attention_impl: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = LlamaAttention(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias,
                                        o_bias=o_bias, implementation=attention_impl, **kw)
        self.mlp = LlamaMLP(hidden_size, intermediate_size, use_bias=mlp_bias, **kw)
        self.input_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, mask, *, cache=None, layer=None, index=None, segment_ids=None):
        """x [B, T, D] -> (x [B, T, D], cache); see LlamaAttention for mask / cache / layer / index / segments."""
        x = constrain(x, BTD)
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache, layer=layer,
                                     index=index, segment_ids=segment_ids)
        x = constrain(x + attn, BTD)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), BTD), cache


def attention_mask_4d(key_valid: jax.Array | None, num_queries: int, query_start, num_keys: int,
                      sliding_window: int | None) -> jax.Array | None:
    """Boolean mask [B or 1, 1, T, S]: key slot <= query slot, key holds a real token, within the window.

    Query t sits at slot query_start + t (query_start int, int32 [] or, one per row, int32 [B]). Returns None
    when plain top-left causal masking suffices.
    """
    if key_valid is None and sliding_window is None and isinstance(query_start, int) and query_start == 0 \
            and num_queries == num_keys:
        return None
    per_row = jnp.ndim(query_start) == 1
    start = jnp.asarray(query_start)[:, None, None] if per_row else query_start
    query_slot = start + jnp.arange(num_queries)[:, None]
    key_slot = jnp.arange(num_keys)[None, :]
    allowed = key_slot <= query_slot
    if sliding_window is not None:
        allowed &= key_slot > query_slot - sliding_window
    allowed = allowed[:, None] if per_row else allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid.astype(bool)[:, None, None, :]
    return allowed


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """attention_mask [B, T] -> positions int32 [B, T]: start + (real tokens before this one); pads get the
    position of the previous real token (clamped at start)."""
    counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.asarray(start, jnp.int32)[..., None] + jnp.maximum(counts, 0)


class LlamaModel(nnx.Module):
    """Embeddings, stacked decoder layers, final RMSNorm."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                      rngs=rngs)
        layer = lambda r: LlamaDecoderLayer(
            c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            rms_norm_eps=c.rms_norm_eps, qkv_bias=c.attention_bias, o_bias=c.o_proj_bias, mlp_bias=c.mlp_bias,
            attention_impl=c.attention_impl, dtype=c.dtype, param_dtype=c.param_dtype, rngs=r)
        self.layers = layers.make_stack(layer, c.num_hidden_layers, rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                            rngs=rngs)
        self.rope, self.dtype = c.rope, c.dtype
        self.scan_layers, self.remat = c.scan_layers, c.remat

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, mask: jax.Array | None, *,
                 cache: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
                 segment_ids: jax.Array | None = None):
        """inputs_embeds [B, T, D], positions int [B, T], mask bool [B|1, 1, T, S] or None.

        segment_ids int [B, T]: packed samples (0 = padding); attention stays inside each segment.

        cache: (key, value) [L, B, K, S, head_dim] to write at slots index.. (see LlamaAttention). The
          cache rides in the layer loop's carry, so each layer updates its slots in place (no per-step copy
          of the cache when the caller donates it).
        Returns (hidden [B, T, D] after the final norm, updated (key, value) or None).
        """
        cos, sin = rope_cos_sin(positions, self.rope, self.dtype)
        x = constrain(inputs_embeds.astype(self.dtype), BTD)
        if isinstance(self.layers, nnx.List):  # unstacked (`unstack_layers`): each layer reads its own buffers
            for i, layer in enumerate(self.layers):
                x, cache = layer(x, cos, sin, mask, cache=cache, layer=jnp.int32(i), index=index)
            return self.norm(x), cache
        if cache is None:
            def step(layer, x, _):
                return layer(x, cos, sin, mask, segment_ids=segment_ids)[0], None

            x, _ = layers.run_stack(self.layers, step, x, scan=self.scan_layers, remat=self.remat)
            return self.norm(x), None

        def cached_step(layer, carry, layer_index):
            x, kv = carry
            return layer(x, cos, sin, mask, cache=kv, layer=layer_index, index=index), None

        num_layers = cache[0].shape[0]
        (x, cache), _ = layers.run_stack(self.layers, cached_step, (x, tuple(cache)),
                                         jnp.arange(num_layers, dtype=jnp.int32), scan=self.scan_layers)
        return self.norm(x), cache


    def unstack_layers(self) -> None:
        """Replaces the stacked layers by a list of per-layer modules (one device buffer per weight), in place.

        For decoding on GPUs: a layer loop over stacked weights slices each layer's weights out of the stack
        every step (a copy on XLA:GPU / CPU), which doubles the bytes a memory-bound step moves. The parameter
        names change (`layers.0...`), so convert / save the model before, not after.
        """
        if isinstance(self.layers, nnx.List):
            return
        graphdef, state = nnx.split(self.layers)
        count = jax.tree.leaves(state)[0].shape[0]
        self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                                for i in range(count)])
        for _, variable in nnx.iter_graph(self.layers):  # drop the `layers` logical axis from the metadata
            if isinstance(variable, nnx.Variable) and variable.get_metadata().get("out_sharding", ())[:1] == (
                    "layers",):
                variable.set_metadata("out_sharding", variable.get_metadata()["out_sharding"][1:])


class LlamaForCausalLM(nnx.Module):
    """LLaMA-family causal LM: `model` (LlamaModel) and `lm_head` (None when tied to the embeddings)."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = config
        self.config = c
        self.model = LlamaModel(c, rngs)
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, axes=("vocab", "embed"), dtype=c.dtype, param_dtype=c.param_dtype,
            rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids int [B, T] -> token embeddings [B, T, D] in the compute dtype."""
        return constrain(self.model.embed_tokens(input_ids), BTD)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits float32 [..., V]."""
        if self.lm_head is None:
            return constrain(self.model.embed_tokens.attend(hidden), BTV)
        dtype = self.config.dtype
        logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), self.lm_head.weight[...].astype(dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, BTV) if logits.ndim == 3 else logits

    def _inputs(self, input_ids, inputs_embeds) -> jax.Array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LlamaForCausalLM: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            return self.embed(input_ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"LlamaForCausalLM: inputs_embeds must be [B, T, {self.config.hidden_size}], "
                             f"got {inputs_embeds.shape}")
        return inputs_embeds

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Full causal forward: `hidden_states` then the output head. Returns logits float32 [B, T, V]."""
        return self.logits(self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                              positions=positions, segment_ids=segment_ids))

    def hidden_states(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """Full causal forward up to the final norm: hidden [B, T, D].

        input_ids int [B, T] or inputs_embeds [B, T, D]; attention_mask [B, T] (1 = real token, 0 = pad;
        left or right padding); positions int [B, T] (default cumsum(attention_mask) - 1, or the index within
        the segment). Right-padded training batches may leave attention_mask None: causal masking alone
        already keeps real tokens off the pads that follow them, and the unmasked causal kernel is the fastest.
        segment_ids int [B, T]: several samples packed in a row (0 = padding); attention stays in each sample.
        """
        x = self._inputs(input_ids, inputs_embeds)
        b, t, _ = x.shape
        if positions is None and segment_ids is not None:
            positions = attention_lib.positions_from_segments(segment_ids)
        if positions is None:
            positions = (positions_from_mask(attention_mask) if attention_mask is not None
                         else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        mask = attention_mask_4d(attention_mask, t, 0, t, self.config.sliding_window)
        if mask is not None and segment_ids is not None:
            mask = mask & attention_lib.segment_mask(segment_ids)
        hidden, _ = self.model(x, positions, mask, segment_ids=segment_ids)
        return hidden

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """Empty cache for `batch` rows of up to `max_length` tokens (prompt + generated)."""
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_length, c.head_dim)
        dtype = dtype or c.dtype
        return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype),
                       mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))

    def decode(self, cache: KVCache, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Appends T tokens to the cache (a prompt prefill or a one-token step) and returns their logits.

        input_ids int [B, T] or inputs_embeds [B, T, D]; attention_mask [B, T] for these tokens (0 = pad,
        e.g. the left padding of a prompt; default all ones). Positions continue from the real tokens
        already cached. Returns (logits float32 [B, T, V], updated cache). The caller keeps
        cache.index + T <= max_length (checked here when the index is concrete).
        """
        x = self._inputs(input_ids, inputs_embeds)
        b, t, _ = x.shape
        max_length = cache.mask.shape[1]
        if not isinstance(cache.index, jax.core.Tracer) and int(np.max(cache.index)) + t > max_length:
            raise ValueError(f"LlamaForCausalLM.decode: {int(np.max(cache.index))} cached + {t} new tokens exceed "
                             f"the cache length {max_length}")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        positions = positions_from_mask(attention_mask, jnp.sum(cache.mask, axis=1, dtype=jnp.int32))
        if jnp.ndim(cache.index) == 1:  # each row writes at its own slot
            write = lambda m, new, i: jax.lax.dynamic_update_slice_in_dim(m, new, i, 0)
            key_valid = jax.vmap(write)(cache.mask, attention_mask.astype(bool), cache.index)
        else:
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(bool), cache.index, 1)
        mask = attention_mask_4d(key_valid, t, cache.index, max_length, self.config.sliding_window)
        hidden, (key, value) = self.model(x, positions, mask, cache=(cache.key, cache.value), index=cache.index)
        return self.logits(hidden), KVCache(key, value, key_valid, cache.index + t)


def count_params(config: LlamaConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    state = jax.eval_shape(lambda: nnx.state(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
