"""CLIP vision transformer (the frozen LLaVA image encoder), mirroring transformers' CLIPVisionModel.

Its blocks (PatchConv, PositionEmbedding, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPEncoder) and the
feature selection (`ViTFeatures`, `num_tokens`) are shared with the SigLIP tower (`siglip.py`), whose math
is the same; a tower config needs the fields the blocks read (`check_tower_config`).

Parameter names follow the classic Hugging Face layout (`vision_model.embeddings.patch_embedding.weight`,
`vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...), with the encoder layers stacked on a
leading `layers` axis, so `llava_jax.convert.params.load_state_dict` loads a Hugging Face state dict
(see `llava_jax.convert.hf_clip.clip_tensor_name_to_ours` for the transformers 5.x names).

Hidden-state indexing follows transformers: `hidden_states[0]` is the embedding output after
`pre_layrnorm`, `hidden_states[i]` the output of encoder layer i, so there are num_hidden_layers + 1 of
them and `hidden_states[-2]` (LLaVA's feature layer) is the output of the second-to-last layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import attention, layers
from llava_jax.models.layers import LayerNorm, Linear
from llava_jax.sharding import BTD, BTF, BTHK, constrain

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

FEATURE_STRATEGIES = ("default", "full")
# OpenAI CLIP's normalization (its image processor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_tower_config(cfg, whole_patches: bool = True) -> None:
    """The checks every ViT tower config makes; a bad field raises ValueError naming the config and field.
    whole_patches: image_size must be a multiple of patch_size (else the convolution drops the remainder)."""
    name = type(cfg).__name__
    attention.check_impl(cfg.attention_impl)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{name}: hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    if whole_patches and cfg.image_size % cfg.patch_size:
        raise ValueError(f"{name}: image_size {cfg.image_size} is not divisible by "
                         f"patch_size {cfg.patch_size}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name}: unsupported hidden_act {cfg.hidden_act!r}, "
                         f"expected one of {sorted(ACTIVATIONS)}")
    if cfg.remat not in layers.REMAT_POLICIES:
        raise ValueError(f"{name}: unknown remat {cfg.remat!r}, "
                         f"expected one of {sorted(layers.REMAT_POLICIES)}")


def check_strategy(strategy: str) -> None:
    if strategy not in FEATURE_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {FEATURE_STRATEGIES}, "
                         f"got {strategy!r}")


def num_tokens(sequence_length: int, strategy: str) -> int:
    """Feature vectors per image of a tower whose hidden states hold `sequence_length` tokens: "default"
    drops the first token (CLIP's CLS; for a tower without CLS, such as SigLIP, its first patch, as
    transformers does), "full" keeps all."""
    check_strategy(strategy)
    return sequence_length - (strategy == "default")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Runtime fields (not part of the checkpoint).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str | None = None   # `llava_jax.models.attention` kernel: None / "xla", "cudnn", "splash"

    image_mean: ClassVar[tuple[float, float, float]] = CLIP_MEAN
    image_std: ClassVar[tuple[float, float, float]] = CLIP_STD

    def __post_init__(self):
        check_tower_config(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_tokens(self, strategy: str = "default") -> int:
        """Feature vectors per image: the patches ("default": CLS dropped) or 1 + patches ("full")."""
        return num_tokens(self.num_positions, strategy)


# openai/clip-vit-large-patch14 (LLaVA v1) and openai/clip-vit-large-patch14-336 (LLaVA-1.5).
PRESETS = {
    "clip_l14": CLIPVisionConfig(image_size=224),
    "clip_l14_336": CLIPVisionConfig(image_size=336),
}


def check_pixels(pixel_values: jax.Array, channels: int, image_size: int) -> None:
    """Raises ValueError unless pixel_values is [N, channels, image_size, image_size]."""
    if tuple(pixel_values.shape[1:]) != (channels, image_size, image_size) or pixel_values.ndim != 4:
        raise ValueError(f"pixel_values: expected shape [N, {channels}, {image_size}, {image_size}] (NCHW), "
                         f"got {tuple(pixel_values.shape)}")


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding (a stride-P convolution without bias) + class token + learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs | None):
        d, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
        self.patch_size = p
        self.image_size = cfg.image_size
        self.num_channels = c
        self.dtype = cfg.dtype
        self.class_embedding = layers.param(rngs, layers.normal(), (d,), ("embed",), cfg.param_dtype)
        self.patch_embedding = PatchConv(d, c, p, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.position_embedding = PositionEmbedding(cfg.num_positions, d, param_dtype=cfg.param_dtype,
                                                    rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, C, H, W] -> embeddings [N, 1 + P, D] (class token first)."""
        check_pixels(pixel_values, self.num_channels, self.image_size)
        n = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return (x + self.position_embedding.weight[...].astype(self.dtype)).astype(self.dtype)


class PatchConv(nnx.Module):
    """Conv2d with kernel = stride = patch size.   weight: [D, C, P, P] (PyTorch OIHW); bias [D] (SigLIP; CLIP
    has none)."""

    def __init__(self, dim: int, channels: int, patch: int, *, dtype, param_dtype, rngs: nnx.Rngs | None,
                 use_bias: bool = False):
        self.patch = patch
        self.dtype = dtype
        self.weight = layers.param(rngs, layers.normal(), (dim, channels, patch, patch),
                                   ("embed", None, None, None), param_dtype)
        self.bias = layers.param(rngs, layers.zeros, (dim,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, C, H, W] -> [N, (H//P)*(W//P), D], patches in row-major order like the flattened conv output
        (a "valid" convolution: rows and columns past the last whole patch are ignored)."""
        h, w = pixel_values.shape[-2:]
        if h % self.patch or w % self.patch:
            pixel_values = pixel_values[..., :h - h % self.patch, :w - w % self.patch]
        patches = einops.rearrange(pixel_values.astype(self.dtype), "n c (h p) (w q) -> n (h w) (c p q)",
                                   p=self.patch, q=self.patch)
        kernel = einops.rearrange(self.weight[...].astype(self.dtype), "d c p q -> d (c p q)")
        y = jnp.einsum("npk,dk->npd", patches, kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class PositionEmbedding(nnx.Module):
    """Learned absolute positions.   weight: [num_positions, D]."""

    def __init__(self, num_positions: int, dim: int, *, param_dtype, rngs: nnx.Rngs | None):
        self.weight = layers.param(rngs, layers.normal(), (num_positions, dim), (None, "embed"), param_dtype)


class CLIPAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, num_heads: int, *, impl: str | None, dtype, param_dtype, rngs: nnx.Rngs | None):
        self.num_heads, self.impl = num_heads, impl
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
        self.v_proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
        self.q_proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
        self.out_proj = Linear(dim, dim, axes=("embed", "heads"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, T, D] -> [N, T, D]."""
        split = lambda t: constrain(einops.rearrange(t, "n t (h k) -> n t h k", h=self.num_heads), BTHK)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = constrain(attention.attention(q, k, v, causal=False, impl=self.impl), BTHK)
        return self.out_proj(einops.rearrange(out, "n t h k -> n t (h k)"))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        self.act = act
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, hidden, axes=("mlp", "embed"), **kw)
        self.fc2 = Linear(hidden, dim, axes=("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, T, D] -> [N, T, D]."""
        return self.fc2(constrain(ACTIVATIONS[self.act](self.fc1(x)), BTF))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs | None):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, impl=cfg.attention_impl, **kw)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, T, D] -> [N, T, D]; images are the batch dimension (data-parallel over them)."""
        x = constrain(x + self.self_attn(self.layer_norm1(constrain(x, BTD))), BTD)
        return constrain(x + self.mlp(self.layer_norm2(x)), BTD)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.scan = cfg.scan_layers
        self.remat = cfg.remat
        self.layers = layers.make_stack(lambda r: CLIPEncoderLayer(cfg, r), cfg.num_hidden_layers, rngs)

    def run(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        """Applies encoder layers [start, stop) to x [N, T, D]."""
        if stop <= start:
            return x
        graphdef, state = nnx.split(self.layers)
        segment = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))
        x, _ = layers.run_stack(segment, lambda layer, h, _: (layer(h), None), x,
                                scan=self.scan, remat=self.remat)
        return x


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(cfg, rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)


def resolve_layer(index: int, num_layers: int) -> int:
    """A transformers hidden_states index (negative allowed) -> 0..num_layers (0 = embeddings)."""
    total = num_layers + 1
    if not -total <= index < total:
        raise ValueError(f"vision_feature_layer {index} is out of range for a tower with {num_layers} layers "
                         f"({total} hidden states)")
    return index % total


class ViTFeatures:
    """The tower interface LLaVA reads (`hidden_states`, `features`, `num_tokens`), shared by the CLIP and
    SigLIP towers. A tower provides `config` (a tower config), `_embed` (pixel_values -> hidden_states[0])
    and `vision_model.encoder` (a `CLIPEncoder`)."""

    def hidden_states(self, pixel_values: jax.Array, indices: Sequence[int]) -> list[jax.Array]:
        """transformers' `hidden_states[i]` for each i in `indices`, running only the layers needed.

        Returns a list of [N, T, D] (T = config.num_positions), in the order of `indices`.
        """
        resolved = [resolve_layer(i, self.config.num_hidden_layers) for i in indices]
        x, done, by_layer = self._embed(pixel_values), 0, {}
        for layer in sorted(set(resolved)):
            x = self.vision_model.encoder.run(x, done, layer)
            done = layer
            by_layer[layer] = x
        return [by_layer[i] for i in resolved]

    def features(self, pixel_values: jax.Array, vision_feature_layer: int | Sequence[int] = -2,
                 strategy: str = "default") -> jax.Array:
        """LLaVA image features: [N, num_tokens(strategy), D * n_layers] ("default" drops the first token).

        A list of layers concatenates their hidden states on the channel axis, like transformers.
        """
        check_strategy(strategy)
        indices = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
        selected = self.hidden_states(pixel_values, indices)
        if strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return jnp.concatenate(selected, axis=-1)

    def num_tokens(self, strategy: str = "default") -> int:
        """Feature vectors per image (the second axis of `features`)."""
        return self.config.num_tokens(strategy)


class CLIPVisionModel(ViTFeatures, nnx.Module):
    """CLIP ViT image encoder.   pixel_values: [N, C, H, W] (NCHW, like transformers)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs | None = None):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (last_hidden_state [N, 1 + P, D], pooled [N, D] = post_layernorm(CLS of the last layer))."""
        vm = self.vision_model
        last = vm.encoder.run(self._embed(pixel_values), 0, self.config.num_hidden_layers)
        return last, vm.post_layernorm(last[:, 0])

    def _embed(self, pixel_values: jax.Array) -> jax.Array:
        """hidden_states[0]: [N, 1 + P, D]."""
        vm = self.vision_model
        pixel_values = constrain(pixel_values, ("activation_batch", None, None, None))
        return constrain(vm.pre_layrnorm(vm.embeddings(pixel_values)), BTD)
