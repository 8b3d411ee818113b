"""Shared building blocks: parameters with logical axis names, Linear, norms, embeddings, layer stacks.

Conventions (the whole project relies on them):
- Parameter leaves use Hugging Face names and orientations: `Linear.weight` is [out, in], norms have
  `weight` (and `bias`), embeddings have `weight` [vocab, embed]. Conversion is then a renaming table.
- Every `nnx.Param` carries its logical axis names in the metadata field `out_sharding` (one name or
  None per dimension), created with `eager_sharding=False`; `llava_jax.sharding` maps the names to
  mesh axes with one rules table.
- Repeated layers are stored stacked: each leaf gets a leading `layers` axis of size num_layers
  (`make_stack`), and `run_stack` applies them with `jax.lax.scan` or a Python loop, optionally
  rematerialized.
- `param_dtype` is the storage dtype, `dtype` the compute dtype; matmuls accumulate in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.sharding import constrain

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    """A parameter of `shape` annotated with logical `axes` (len(axes) == len(shape))."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def normal(stddev: float = 0.02) -> Initializer:
    return jax.nn.initializers.normal(stddev)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


class Linear(nnx.Module):
    """y = x @ weight.T + bias.   weight: [out, in], bias: [out].

    An optional LoRA adapter (attached by `llava_jax.train.lora.add_adapters`, absent by default) adds
    lora_scale * dropout(x) @ lora_a.T @ lora_b.T with lora_a [r, in], lora_b [out, r].

    Args:
      axes: logical names of (out, in), e.g. ("mlp", "embed").
    """

    # LoRA adapter: class-level defaults, so a Linear without one carries nothing extra.
    lora_a: nnx.Param | None = None
    lora_b: nnx.Param | None = None
    lora_scale: float = 0.0
    lora_dropout: nnx.Dropout | None = None

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 init: Initializer | None = None, rngs: nnx.Rngs | None = None):
        self.dtype = dtype
        self.weight = param(rngs, init or normal(), (out_features, in_features), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_features,), axes[:1], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in the compute dtype."""
        x = x.astype(self.dtype)
        # Output in the compute dtype (accumulated in float32 by the backends): the backward pass then
        # multiplies by the weight in the compute dtype too, so FSDP gathers it in bf16 both ways.
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(self.dtype), preferred_element_type=self.dtype)
        if self.bias is not None:
            y = y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        if self.lora_a is not None:
            y = y + self.lora_scale * self._lora_update(x)
        return y.astype(self.dtype)

    def _lora_update(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> dropout(x) @ lora_a.T @ lora_b.T [..., out] in float32."""
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        low = jnp.einsum("...i,ri->...r", x, self.lora_a[...].astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return jnp.einsum("...r,or->...o", low.astype(self.dtype), self.lora_b[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm, computed in float32: weight * x / sqrt(mean(x^2) + eps).   weight: [dim]."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(rngs, ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply.
        return (self.weight[...].astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32.   weight, bias: [dim]."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embedding(nnx.Module):
    """Token embedding table.   weight: [num_embeddings, dim] with axes (vocab, embed)."""

    def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.dtype = dtype
        self.weight = param(rngs, normal(), (num_embeddings, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int [...] -> [..., dim]. The table is gathered whole over `fsdp` (in its stored dtype; a
        training step casts it to the compute dtype first), so each device looks up its own rows' ids."""
        table = constrain(self.weight[...], ("activation_vocab", "activation_embed"))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x [..., dim] -> logits [..., vocab] in float32."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.weight[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


def make_stack(factory: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` copies of `factory(rngs)` stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs):
        return factory(layer_rngs)

    return build(rngs)


# Activations the decoder layers name with `jax.ad_checkpoint.checkpoint_name` (in the compute dtype, bf16
# in training): q/k/v projections, attention output (before o_proj), o_proj output, MLP gate / up / down.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
ATTENTION_NAMES = QKV_NAMES + ("attention_out", "out_proj")
MLP_NAMES = ("mlp_gate", "mlp_up", "mlp_out")
_save = jax.checkpoint_policies.save_only_these_names

# Which activations the backward pass keeps (the rest is recomputed). `dots*` save the float32 outputs of
# every matmul; the named policies save bf16 projection outputs (MaxText style).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": _save(*QKV_NAMES),
    "save_dot_except_mlp": _save(*ATTENTION_NAMES),
    "save_attention_out": _save("attention_out", "out_proj"),
    "save_proj_bf16": _save(*ATTENTION_NAMES, *MLP_NAMES),
}


def run_stack(stack: nnx.Module, step: Callable, carry: Any, xs: Any = None, *, num_layers: int | None = None,
              scan: bool = True, remat: str = "none"):
    """Applies stacked layers in order: `carry, y = step(layer, carry, x)` for each layer.

    Args:
      stack: module from `make_stack`; every leaf has a leading layers axis.
      step: function (layer module, carry, per-layer input) -> (carry, per-layer output).
      xs: per-layer inputs (leading layers axis) or None.
      num_layers: apply only the first `num_layers` layers (default: all).
      scan: jax.lax.scan (one compiled body, fast compiles) or an unrolled Python loop.
      remat: a key of REMAT_POLICIES.
    Returns:
      (final carry, stacked per-layer outputs).
    """
    graphdef, state = nnx.split(stack)
    total = jax.tree.leaves(state)[0].shape[0]
    n = total if num_layers is None else num_layers
    if n < total:
        state = jax.tree.map(lambda a: a[:n], state)
        xs = None if xs is None else jax.tree.map(lambda a: a[:n], xs)

    def body(c, layer_in):
        layer_state, x = layer_in
        return step(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, (state, xs))
    outs = []
    for i in range(n):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        outs.append(y)
    stacked = None if not outs or outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return carry, stacked
