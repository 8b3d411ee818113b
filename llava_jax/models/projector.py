"""Multimodal projectors: vision features [N, P, D_vision] -> language-model embeddings [N, P, D_text].

Types (as in the official LLaVA `build_vision_projector`):
- `linear` (LLaVA v1): one Linear.
- `mlp{N}x_gelu` (LLaVA-1.5: mlp2x_gelu): Linear, then (N - 1) times [exact erf GELU, Linear].
- `identity`: features unchanged (D_vision must equal D_text).

Parameter names: Linear k (1-based) is `linear_{k}`, so mlp2x_gelu is exactly transformers'
LlavaMultiModalProjector (`linear_1`, `linear_2`); `linear` is `linear_1` alone; `identity` has none.
The official checkpoints name them `mm_projector.{2 * (k - 1)}` (Sequential indices; see
`llava_jax.convert.hf_llava.llava_tensor_name_to_ours`).
"""

from __future__ import annotations

import re

import jax
from flax import nnx

from llava_jax.models.layers import Linear
from llava_jax.sharding import BTD, BTF, constrain

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def num_linears(projector_type: str) -> int:
    """Number of Linear layers of a projector type; raises ValueError for an unknown type."""
    if projector_type == "linear":
        return 1
    if projector_type == "identity":
        return 0
    match = _MLP_GELU.match(projector_type)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector type {projector_type!r}: expected 'linear', 'identity' or "
                         f"'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')")
    return int(match.group(1))


class Projector(nnx.Module):
    """features [..., in_features] -> [..., out_features]."""

    def __init__(self, projector_type: str, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None):
        n = num_linears(projector_type)
        if n == 0 and in_features != out_features:
            raise ValueError(f"identity projector: vision features have {in_features} channels but the "
                             f"language model expects {out_features}")
        self.projector_type = projector_type
        self.num_linears = n
        kw = dict(use_bias=use_bias, rngs=rngs)
        if dtype is not None:
            kw["dtype"] = dtype
        if param_dtype is not None:
            kw["param_dtype"] = param_dtype
        for k in range(1, n + 1):
            # Hidden widths shard like an MLP; the last Linear writes the model dimension.
            out_axis = "embed" if k == n else "mlp"
            in_axis = None if k == 1 else "mlp"
            setattr(self, f"linear_{k}", Linear(in_features if k == 1 else out_features, out_features,
                                                 axes=(out_axis, in_axis), **kw))

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [N, P, in_features] -> [N, P, out_features] (N images: the batch dimension)."""
        x = features
        for k in range(1, self.num_linears + 1):
            if k > 1:
                x = constrain(jax.nn.gelu(x, approximate=False), BTF)
            x = getattr(self, f"linear_{k}")(x)
        return constrain(x, BTD) if x.ndim == 3 else x
