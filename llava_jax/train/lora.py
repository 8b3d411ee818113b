"""LoRA for stage 2: low-rank adapters on every Linear of the language model except lm_head.

This is what the official LLaVA trains with peft (`find_all_linear_names`: every nn.Linear of the LLM
but lm_head; r 128, alpha 256, dropout 0.05, bias "none"). Each adapted `layers.Linear` gets

    lora_a [r, in]  (stacked: [L, r, in]),  logical axes (layers,) "lora", <in axis>;  kaiming-uniform(a=sqrt(5))
    lora_b [out, r] (stacked: [L, out, r]), logical axes (layers,) <out axis>, "lora";  zeros
    lora_scale = alpha / r,  lora_dropout = nnx.Dropout on the adapter input (None when the rate is 0)

and computes y = x W^T + b + lora_scale * dropout(x) A^T B^T. The rank axis maps to fsdp, so each adapter is
split over fsdp (on its rank, or on its model dimension where that already takes fsdp), tensor-split like its
base weight, and its gradients and Adam state are sharded too. The dropout starts switched off
(deterministic): the train step switches it on with a fresh key per step (`llava_jax.train.step`), so
direct calls, evaluation and generation never drop anything. `model.train()` / `model.eval()` switch it
for direct calls.

Trainable rules: `recipes.STAGE2_LORA_RULES` selects `language_model/.*/lora_[ab]`. Before a Hugging
Face export, `merged(model)` folds the adapters into the base weights: W + lora_scale * B @ A.

QLoRA (`lora.quantize_base` 8 / 4): `quantized_base` stores the language model's Linear weights int8 / int4
(`llava_jax.models.quant`) before the adapters are attached; each layer dequantizes its weights inside the
step (the scan body), the adapters and their optimizer state stay float32, and `merged` dequantizes the base
(to the scales' dtype) before folding the adapters in, so the export is an ordinary float folder.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import layers, quant
from llava_jax.models.layers import Linear

LORA_AXIS = "lora"
EXCLUDED = ("lm_head",)  # the official recipe never adapts the output head


def kaiming_uniform(num_batch_axes: int) -> layers.Initializer:
    """torch's kaiming_uniform_(a=sqrt(5)) on [..., r, in]: U(-1/sqrt(in), 1/sqrt(in)), leading axes batched."""
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2,
                                                batch_axis=tuple(range(num_batch_axes)))


def language_model(model: nnx.Module) -> nnx.Module:
    """The LLM of a LLaVA model (`language_model`), or the model itself (a LlamaForCausalLM)."""
    return getattr(model, "language_model", model)


def adapted_linears(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """('model/layers/self_attn/q_proj', Linear) for each Linear of the LLM that carries an adapter."""
    for path, node in nnx.iter_graph(language_model(model)):
        if isinstance(node, Linear) and node.lora_a is not None:
            yield "/".join(str(p) for p in path), node


def _target_linears(llm: nnx.Module) -> list[tuple[str, Linear]]:
    targets = []
    for path, node in nnx.iter_graph(llm):
        if isinstance(node, Linear) and path and str(path[0]) not in EXCLUDED:
            targets.append(("/".join(str(p) for p in path), node))
    return targets


def _dropout(rate: float, num_layers: int | None, key: jax.Array) -> nnx.Dropout:
    """A switched-off dropout with its own 'dropout' stream (stacked: one stream per layer)."""
    rngs = nnx.Rngs(dropout=key)
    if num_layers is None:
        return nnx.Dropout(rate, deterministic=True, rngs=rngs)
    return layers.make_stack(lambda r: nnx.Dropout(rate, deterministic=True, rngs=r), num_layers, rngs)


def _attach(linear: Linear, rank: int, scale: float, dropout: float, rngs: nnx.Rngs) -> None:
    """Adds lora_a [*lead, r, in], lora_b [*lead, out, r] (lead: the stacked layers axis, if any)."""
    weight = linear.weight
    axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * weight.ndim)
    lead, (out_dim, in_dim) = weight.shape[:-2], weight.shape[-2:]
    lead_axes, (out_axis, in_axis) = axes[:-2], axes[-2:]
    linear.lora_a = layers.param(rngs, kaiming_uniform(len(lead)), (*lead, rank, in_dim),
                                 (*lead_axes, LORA_AXIS, in_axis), jnp.float32)
    linear.lora_b = layers.param(rngs, layers.zeros, (*lead, out_dim, rank), (*lead_axes, out_axis, LORA_AXIS),
                                 jnp.float32)
    linear.lora_scale = scale
    if dropout > 0:
        if len(lead) > 1:
            raise ValueError(f"LoRA dropout supports one stacked layers axis, weight has shape {weight.shape}")
        linear.lora_dropout = _dropout(dropout, lead[0] if lead else None, rngs.params())


def _place_like_base(llm: nnx.Module) -> None:
    """Shards the new adapter parameters by their logical axes on the mesh the base weights live on."""
    from llava_jax import sharding

    weight = next(linear.weight[...] for _, linear in adapted_linears(llm))
    if isinstance(weight, jax.core.Tracer):  # traced (e.g. nnx.eval_shape): shardings come from the caller
        return
    mesh = getattr(weight.sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh) or mesh.size == 1:
        return
    adapters = nnx.state(llm, lambda path, _: str(path[-1]) in ("lora_a", "lora_b"))
    nnx.update(llm, jax.device_put(adapters, sharding.state_shardings(adapters, mesh)))


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Attaches LoRA adapters in place to every Linear of the language model except lm_head.

    model: LlavaForConditionalGeneration (adapters go into `language_model` only) or LlamaForCausalLM.
    rank r, alpha (scale alpha / r), dropout rate on the adapter input. Adapters are float32 (the base
    weights keep their dtype). Returns `model`.
    """
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    llm = language_model(model)
    present = [path for path, _ in adapted_linears(llm)]
    if present:
        raise ValueError(f"the model already has LoRA adapters (e.g. {present[0]}); merge them first")
    targets = _target_linears(llm)
    if not targets:
        raise ValueError(f"{type(llm).__name__} has no Linear layer to adapt")
    for path, linear in targets:
        if min(linear.weight.shape[-2:]) < rank:
            raise ValueError(f"LoRA rank {rank} exceeds the size of {path}.weight {linear.weight.shape}")
    for _, linear in targets:
        _attach(linear, rank, alpha / rank, dropout, rngs)
    _place_like_base(llm)
    return model


def quantized_base(model: nnx.Module, bits: int, group_size: int = 128) -> nnx.Module:
    """QLoRA: the language model's weights quantized in place (bits 8 / 4; 0 leaves the model float). The
    vision tower and the projector stay float. Returns `model`."""
    if not bits:
        return model
    return quant.quantize_model(model, quant.QuantConfig(bits=bits, group_size=group_size))


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its base weight (W + scale * B @ A, computed in
    float32, stored in W's dtype) and removed; a quantized base (QLoRA) is dequantized first. `model` itself
    keeps its adapters."""
    out = nnx.clone(model)
    if quant.quantization_of(out) is not None:  # QLoRA: a float base to merge into
        quant.dequantize_model(out)
    for _, linear in list(adapted_linears(out)):
        weight = linear.weight[...]
        delta = jnp.einsum("...or,...ri->...oi", linear.lora_b[...].astype(jnp.float32),
                           linear.lora_a[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        linear.weight.set_value((weight.astype(jnp.float32) + linear.lora_scale * delta).astype(weight.dtype))
        for name in ("lora_a", "lora_b", "lora_scale", "lora_dropout"):
            if name in vars(linear):  # back to the class default (no adapter)
                delattr(linear, name)
    return out


__all__ = ["add_adapters", "merged", "quantized_base", "adapted_linears", "kaiming_uniform", "LORA_AXIS"]
