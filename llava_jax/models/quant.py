"""Weight-only quantization for inference and QLoRA: int8 per output channel, int4 in groups along the input.

    quantize_model(model, QuantConfig(bits=4, group_size=128))   # in place; returns model

Every `layers.Linear` of the language model (decoder layers and the untied output head) gets, in place of its
`weight` Param, a `QuantizedWeight` with two Params:

    weight.qvalue  int8 / int4, the weight's shape        ([L,] out, in), the weight's logical axes
    weight.scale   the weight's float dtype, ([L,] out, in / group) (int8: group = in, so [..., out, 1]),
                   the same logical axes (an axis that does not divide the mesh stays replicated)

`weight[...]` dequantizes (qvalue * scale, in the scale's dtype), so the modules that read `self.weight[...]`
(Linear, the output head in `LlamaForCausalLM.logits`, CLIP's `PatchConv`) are the seam and need no second
code path. With `include_vision`, the vision tower's Linears, its patch embedding (per output channel at both
widths) and the projector are quantized too. Tied output heads (the embedding table) stay in float.

Numerics are qwix's (`qwix.quantize`: symmetric absmax, round to nearest; `qwix.dequantize`). The product is
qwix's choice for a float activation and a quantized weight too: dequantize, then a float matmul, which XLA
fuses (the int8 x int8 dot would need the activations quantized, a W8A8 scheme, not weight-only). Each layer
dequantizes its own weights inside the layer (in the scan body, or per layer with `unstack_layers`), so only
one layer's float weights exist at a time and the stored model holds 1 / 2 (int8) or about 1 / 4 (int4) of
the bf16 bytes.

Group size: int4 groups run along the input dimension; when `group_size` does not divide it, the largest
divisor of the input size not above `group_size` is used.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from llava_jax.models.clip_vit import PatchConv
from llava_jax.models.layers import Linear

BITS = {8: jnp.int8, 4: jnp.int4}
VISION_PREFIXES = ("vision_tower", "multi_modal_projector")
_CONTRACTING = {Linear: 1, PatchConv: 3}  # quantizable modules -> trailing input axes of their weight


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """bits 8 (per output channel) or 4 (groups of `group_size` inputs); `include_vision`: also the vision tower
    and the projector (default: the language model only)."""

    bits: int = 8
    group_size: int = 128
    include_vision: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantization bits must be one of {sorted(BITS)}, got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError(f"quantization group_size must be a positive integer, got {self.group_size!r}")


def group_for(in_features: int, group_size: int) -> int:
    """The group length used for an input dimension: the largest divisor of it that is <= group_size."""
    return next(g for g in range(min(group_size, in_features), 0, -1) if in_features % g == 0)


class QuantizedWeight(nnx.Module):
    """A quantized weight that reads like the Param it replaces: `w[...]` (dequantized), `w.shape`, `w.ndim`,
    `w.dtype` (the float dtype it dequantizes to) and `w.get_metadata()` (the logical axes)."""

    def __init__(self, qvalue: nnx.Param, scale: nnx.Param, qtype):
        self.qvalue, self.scale = qvalue, scale
        self.qtype = jnp.dtype(qtype)

    def qarray(self) -> qwix.QArray:
        return qwix.QArray(self.qvalue[...], self.scale[...], qtype=self.qtype)

    def __getitem__(self, index) -> jax.Array:
        if index is not Ellipsis:
            raise IndexError("a QuantizedWeight is read whole: weight[...]")
        return qwix.dequantize(self.qarray())

    shape = property(lambda self: self.qvalue.shape)
    ndim = property(lambda self: len(self.qvalue.shape))
    dtype = property(lambda self: self.scale.dtype)

    def get_metadata(self) -> dict:
        return self.qvalue.get_metadata()


def quantize_param(weight: nnx.Param, config: QuantConfig, contracting: int = 1) -> QuantizedWeight:
    """A float Param [..., out, *in] (`contracting` trailing input axes) -> QuantizedWeight; axes kept.

    int8 and multi-axis inputs: one scale per output channel; int4 on one input axis: groups along it."""
    value = weight[...]
    axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * value.ndim)
    channelwise = tuple(range(value.ndim - contracting))
    tiled = {}
    if config.bits == 4 and contracting == 1:
        tiled = {value.ndim - 1: group_for(value.shape[-1], config.group_size)}
    q = qwix.quantize(value.astype(jnp.float32), BITS[config.bits], channelwise_axes=channelwise, tiled_axes=tiled)
    as_param = lambda a: nnx.Param(a, out_sharding=axes, eager_sharding=False)
    return QuantizedWeight(as_param(q.qvalue), as_param(q.scale.astype(value.dtype)), BITS[config.bits])


def _targets(model: nnx.Module, config: QuantConfig) -> Iterator[tuple[nnx.Module, int]]:
    """(module, number of contracting weight axes) for each float weight the config quantizes."""
    for path, node in nnx.iter_graph(model):
        if type(node) not in _CONTRACTING or not isinstance(getattr(node, "weight", None), nnx.Param):
            continue
        vision = bool(path) and str(path[0]) in VISION_PREFIXES
        if vision and not config.include_vision:
            continue
        yield node, _CONTRACTING[type(node)]


def quantize_model(model: nnx.Module, config: QuantConfig) -> nnx.Module:
    """Quantizes the model's weights in place (see the module docstring) and records `model.quantization =
    config`; returns `model`. Works on abstract models (`nnx.eval_shape`) too: that is how a quantized folder
    is restored."""
    if quantization_of(model) is not None:
        raise ValueError(f"the model is already quantized ({quantization_of(model)})")
    for module, contracting in list(_targets(model, config)):
        module.weight = quantize_param(module.weight, config, contracting)
    model.quantization = config
    return model


def dequantize_model(model: nnx.Module) -> nnx.Module:
    """Replaces every QuantizedWeight by a float Param (the dequantized values, its logical axes), in place."""
    owners = [node for _, node in nnx.iter_graph(model) if isinstance(getattr(node, "weight", None), QuantizedWeight)]
    for module in owners:
        quantized = module.weight
        module.weight = nnx.Param(quantized[...], out_sharding=quantized.get_metadata().get("out_sharding"),
                                  eager_sharding=False)
    if "quantization" in vars(model):
        del model.quantization
    return model


def as_quantized(model: nnx.Module, quantize: "int | QuantConfig | None") -> nnx.Module:
    """`model` quantized by `quantize` (None: as it is; 8 / 4: `QuantConfig(bits)`); a model quantized already
    is returned when it matches, else ValueError."""
    if quantize is None:
        return model
    config = quantize if isinstance(quantize, QuantConfig) else QuantConfig(bits=int(quantize))
    if quantization_of(model) is not None and quantization_of(model) != config:
        raise ValueError(f"already quantized ({quantization_of(model)}), asked for {config}")
    return model if quantization_of(model) is not None else quantize_model(model, config)


def add_quantize_argument(parser) -> None:
    """The `--quantize 8|4` flag of the chat, eval, serve and bench command lines (for `load_model`)."""
    parser.add_argument("--quantize", type=int, choices=sorted(BITS, reverse=True),
                        help="weight-only quantization at load time: int8 per channel or int4 in groups of "
                             "128 (a folder from `convert quantize` needs none)")


def quantization_of(model: nnx.Module) -> QuantConfig | None:
    """The QuantConfig `quantize_model` applied to `model`, or None."""
    return getattr(model, "quantization", None)


__all__ = ["QuantConfig", "QuantizedWeight", "quantize_model", "dequantize_model", "quantize_param", "group_for",
           "quantization_of", "as_quantized",
           "add_quantize_argument"]
