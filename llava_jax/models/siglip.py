"""SigLIP vision transformer (the tower of LLaVA-OneVision and other LLaVA variants), mirroring transformers'
SiglipVisionModel in the classic layout (`vision_model.embeddings.patch_embedding.{weight,bias}`,
`vision_model.embeddings.position_embedding.weight`, `vision_model.encoder.layers.{i}.*`,
`vision_model.post_layernorm.*`), the encoder layers stacked on a leading `layers` axis.

The encoder is CLIP's (same pre-norm block, attention and MLP; `clip_vit.py`); SigLIP differs around it:
the patch convolution has a bias, there is no class token and no pre-LayerNorm, and the activation is
`gelu_pytorch_tanh`. `hidden_states[0]` is the embedding output, `hidden_states[i]` the output of layer i
(before `post_layernorm`, as in transformers).

The attention-pool head (`vision_model.head.*`, transformers' `vision_use_head`) is not part of this model:
LLaVA reads hidden states, never the pooled output. Import skips its tensors and export writes
`vision_use_head: false`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.clip_vit import (CLIPEncoder, PatchConv, PositionEmbedding, ViTFeatures, check_pixels,
                                       check_tower_config, num_tokens)
from llava_jax.models.layers import LayerNorm
from llava_jax.sharding import BTD, constrain

# SigLIP's image processor normalizes to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # Runtime fields (not part of the checkpoint).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str | None = None   # `llava_jax.models.attention` kernel: None / "xla", "cudnn", "splash"

    image_mean: ClassVar[tuple[float, float, float]] = SIGLIP_MEAN
    image_std: ClassVar[tuple[float, float, float]] = SIGLIP_STD

    def __post_init__(self):
        # 384 px at patch 14 is 27 x 27 patches, the last 6 pixel rows and columns unused (a "valid" conv).
        check_tower_config(self, whole_patches=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens of a hidden state: the patches (no class token)."""
        return self.num_patches

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_tokens(self, strategy: str = "default") -> int:
        """Feature vectors per image: all patches ("full") or all but the first ("default", as transformers'
        LLaVA drops token 0 whatever the tower)."""
        return num_tokens(self.num_positions, strategy)


PRESETS = {
    # google/siglip-so400m-patch14-384 (LLaVA-OneVision's tower): 27 x 27 = 729 patches.
    "siglip_so400m_p14_384": SiglipVisionConfig(),
}


class SiglipVisionEmbeddings(nnx.Module):
    """Patch embedding (a stride-P convolution with bias) + learned positions, no class token."""

    def __init__(self, cfg: SiglipVisionConfig, rngs: nnx.Rngs | None):
        d, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
        self.image_size, self.num_channels, self.dtype = cfg.image_size, c, cfg.dtype
        self.patch_embedding = PatchConv(d, c, p, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                         use_bias=True)
        self.position_embedding = PositionEmbedding(cfg.num_positions, d, param_dtype=cfg.param_dtype,
                                                    rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, C, H, W] -> embeddings [N, P, D]."""
        check_pixels(pixel_values, self.num_channels, self.image_size)
        patches = self.patch_embedding(pixel_values)
        return (patches + self.position_embedding.weight[...].astype(self.dtype)).astype(self.dtype)


class SiglipVisionTransformer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, rngs: nnx.Rngs):
        self.embeddings = SiglipVisionEmbeddings(cfg, rngs)
        self.encoder = CLIPEncoder(cfg, rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)


class SiglipVisionModel(ViTFeatures, nnx.Module):
    """SigLIP ViT image encoder without the attention-pool head.   pixel_values: [N, C, H, W] (NCHW)."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs | None = None):
        self.config = config
        self.vision_model = SiglipVisionTransformer(config, rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """-> last_hidden_state [N, P, D] = post_layernorm(output of the last layer), transformers'
        `last_hidden_state`."""
        vm = self.vision_model
        last = vm.encoder.run(self._embed(pixel_values), 0, self.config.num_hidden_layers)
        return vm.post_layernorm(last)

    def _embed(self, pixel_values: jax.Array) -> jax.Array:
        """hidden_states[0]: [N, P, D]."""
        pixel_values = constrain(pixel_values, ("activation_batch", None, None, None))
        return constrain(self.vision_model.embeddings(pixel_values), BTD)


__all__ = ["SiglipVisionConfig", "SiglipVisionModel", "PRESETS", "SIGLIP_MEAN", "SIGLIP_STD"]
