"""LLaVA: vision tower (CLIP or SigLIP, `towers.py`) -> projector -> LLaMA-family decoder, mirroring transformers'
LlavaForConditionalGeneration in the classic on-disk layout (`vision_tower.vision_model.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`).

Inputs follow transformers: `input_ids` holds `image_seq_length` copies of `image_token_index` per image,
and the k-th group of image tokens (counted over the whole batch, row by row) receives the k-th image.
Training batches pass images row-aligned instead, pixel_values [B, I, 3, H, W] with image_mask [B, I]: row
b's image tokens receive row b's real images, so with the batch sharded each device encodes and merges
its own rows' images (no collective over the batch's features).
The merge uses static shapes only (cumsum over image-token positions + gather), so it runs under jit; the
count check (tokens vs images) runs when the inputs are concrete.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import clip_vit, llama, towers
from llava_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from llava_jax.models.projector import Projector, num_linears
from llava_jax.sharding import BTD, constrain


class VisionFeatures:
    """What a composite config derives from its `vision` tower and `vision_feature_layer` (LLaVA, NeXT, OneVision)."""

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else layer

    @property
    def vision_feature_dim(self) -> int:
        """Projector input width: vision hidden size times the number of feature layers."""
        return self.vision.hidden_size * len(self.feature_layers)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(VisionFeatures):
    """vision / text: tower configs (their runtime fields set dtype, scan and remat per tower); the vision
      tower is chosen by its config's type (`towers.TOWERS`: CLIPVisionConfig, SiglipVisionConfig).

    image_seq_length: tokens per image; None derives it from the tower (`vision.num_tokens(strategy)`).
    vision_feature_layer: transformers hidden_states index (-2: second-to-last layer) or a tuple of them
      (features concatenated on the channel axis).
    freeze_vision_tower: runtime field; stop gradients at the tower output (LLaVA never trains it).
    """

    vision: towers.VisionConfig = dataclasses.field(default_factory=lambda: clip_vit.PRESETS["clip_l14_336"])
    text: LlamaConfig = dataclasses.field(default_factory=lambda: llama.PRESETS["vicuna_7b"])
    projector: str = "mlp2x_gelu"
    image_token_index: int = 32000
    image_seq_length: int | None = None
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    freeze_vision_tower: bool = True

    def __post_init__(self):
        towers.check_vision_config(self.vision, "LlavaConfig.vision")
        layer = self.vision_feature_layer
        if not isinstance(layer, int):
            object.__setattr__(self, "vision_feature_layer", tuple(int(i) for i in layer))
        for i in self.feature_layers:
            clip_vit.resolve_layer(i, self.vision.num_hidden_layers)
        if self.vision_feature_select_strategy not in clip_vit.FEATURE_STRATEGIES:
            raise ValueError(f"LlavaConfig: vision_feature_select_strategy must be one of "
                             f"{clip_vit.FEATURE_STRATEGIES}, got {self.vision_feature_select_strategy!r}")
        num_linears(self.projector)
        tokens = self.vision.num_tokens(self.vision_feature_select_strategy)
        if self.image_seq_length is None:
            object.__setattr__(self, "image_seq_length", tokens)
        elif self.image_seq_length != tokens:
            raise ValueError(f"LlavaConfig: image_seq_length {self.image_seq_length} differs from the "
                             f"{tokens} tokens the vision tower gives per image (image_size "
                             f"{self.vision.image_size}, patch_size {self.vision.patch_size}, strategy "
                             f"{self.vision_feature_select_strategy!r})")


def _with_vocab(text: LlamaConfig, vocab_size: int) -> LlamaConfig:
    return dataclasses.replace(text, vocab_size=vocab_size)


# llava-hf conversions: vocabulary + <image> (32000) + <pad> (32001), padded to a multiple of 64.
PRESETS: dict[str, LlavaConfig] = {
    # LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, -13b-hf): CLIP-336, mlp2x_gelu, layer -2, 576 tokens.
    "llava_1_5_7b": LlavaConfig(vision=clip_vit.PRESETS["clip_l14_336"],
                                text=_with_vocab(llama.PRESETS["vicuna_7b"], 32064)),
    "llava_1_5_13b": LlavaConfig(vision=clip_vit.PRESETS["clip_l14_336"],
                                 text=_with_vocab(llama.PRESETS["vicuna_13b"], 32064)),
    # LLaVA v1 (Vicuna-7B v1.1, LLaMA-1: 2048 positions, eps 1e-6): CLIP-224, linear, 256 tokens.
    "llava_7b_v1": LlavaConfig(vision=clip_vit.PRESETS["clip_l14"], projector="linear",
                               text=dataclasses.replace(llama.PRESETS["vicuna_7b"], vocab_size=32064,
                                                        max_position_embeddings=2048, rms_norm_eps=1e-6)),
    # LLaVA-1.5 recipe on LLaMA-3.1-8B: <image> = 128256, vocabulary padded to 128320.
    "llava_llama3_8b": LlavaConfig(vision=clip_vit.PRESETS["clip_l14_336"],
                                   text=_with_vocab(llama.PRESETS["llama3_1_8b"], 128320),
                                   image_token_index=128256),
}


def build_vision_tower(config, rngs: nnx.Rngs | None) -> nnx.Module:
    """The vision tower of a composite config (its `vision` field), chosen by the config's type (`towers.py`)."""
    return towers.vision_tower(config.vision, rngs=rngs)


def build_projector(config, rngs: nnx.Rngs | None) -> Projector:
    """`multi_modal_projector` of a composite config (projector, vision_feature_dim, text, bias fields)."""
    return Projector(config.projector, config.vision_feature_dim, config.text.hidden_size,
                     use_bias=config.multimodal_projector_bias, dtype=config.text.dtype,
                     param_dtype=config.text.param_dtype, rngs=rngs)


def project_image_features(tower: nnx.Module, projector: Projector, config, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [N, 3, H, W] -> tower features (feature layers, select strategy; gradient stopped for a
    frozen tower) -> projector -> [N, tokens per tile, D_text]."""
    features = tower.features(pixel_values, config.vision_feature_layer, config.vision_feature_select_strategy)
    if config.freeze_vision_tower:
        features = jax.lax.stop_gradient(features)
    return projector(features.astype(config.text.dtype))


def embed_placeholders(language_model: LlamaForCausalLM, input_ids: jax.Array, is_placeholder: jax.Array
                       ) -> jax.Array:
    """Token embeddings [B, T, D]; placeholder positions embed id 0 instead (an image token id may lie
    outside the vocabulary, e.g. the official -200), to be overwritten by the merge."""
    return language_model.embed(jnp.where(is_placeholder, 0, input_ids))


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None when it is traced (inside jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_image_tokens(input_ids, image_token_index: int, image_seq_length: int, num_images) -> None:
    """Raises ValueError when the image tokens of input_ids [B, T] do not make exactly `num_images` groups of
    `image_seq_length` (checked only when the values are concrete)."""
    ids, count = _concrete(input_ids), _concrete(num_images)
    if ids is None or count is None:
        return
    per_row = (ids == image_token_index).sum(axis=1)
    total, count = int(per_row.sum()), int(count)
    if total != count * image_seq_length:
        raise ValueError(f"input_ids hold {total} image tokens (id {image_token_index}; per row "
                         f"{per_row.tolist()}) but {count} images were given, which need {count} x "
                         f"{image_seq_length} = {count * image_seq_length}")
    bad = np.nonzero(per_row % image_seq_length)[0]
    if bad.size:
        raise ValueError(f"input_ids row {int(bad[0])} holds {int(per_row[bad[0]])} image tokens, not a multiple "
                         f"of image_seq_length {image_seq_length}")


def merge_image_features(inputs_embeds: jax.Array, is_image: jax.Array, features: jax.Array,
                         image_mask: jax.Array | None = None) -> jax.Array:
    """Writes image features into the image-token positions, in order (static shapes, jit-friendly).

    inputs_embeds [B, T, D]; is_image bool [B, T]; features [N, P, D]; image_mask bool [N] (True = real
    image, False = padding to skip; the k-th group of P image tokens gets the k-th real image).
    Returns [B, T, D].
    """
    n, p, d = features.shape
    if image_mask is not None:  # real images first, in their order
        features = features[jnp.argsort(jnp.logical_not(image_mask).astype(jnp.int32), stable=True)]
    slot = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1  # index among all image tokens
    slot = jnp.clip(slot, 0, n * p - 1).reshape(is_image.shape)
    gathered = jnp.take(features.reshape(n * p, d), slot, axis=0)
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


def merge_row_features(inputs_embeds: jax.Array, is_image: jax.Array, features: jax.Array,
                       image_mask: jax.Array | None = None) -> jax.Array:
    """Row-local merge: row b's image tokens receive row b's real images, in order.

    inputs_embeds [B, T, D]; is_image bool [B, T]; features [B, I, P, D]; image_mask bool [B, I] or None.
    Returns [B, T, D]; every gather stays within its row (batch-sharded inputs need no collective).
    """
    b, i, p, d = features.shape
    if image_mask is not None:  # each row's real images first, in their order
        order = jnp.argsort(jnp.logical_not(image_mask).astype(jnp.int32), axis=1, stable=True)
        features = jnp.take_along_axis(features, order[:, :, None, None], axis=1)
    slot = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1, 0, i * p - 1)
    gathered = jnp.take_along_axis(features.reshape(b, i * p, d), slot[..., None], axis=1)
    return constrain(jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds), BTD)


def check_row_image_tokens(input_ids, image_token_index: int, image_seq_length: int, image_mask) -> None:
    """Row-aligned images: raises ValueError when a row's image tokens differ from its images x
    `image_seq_length` (checked only when the values are concrete)."""
    ids, mask = _concrete(input_ids), _concrete(image_mask)
    if ids is None or mask is None:
        return
    tokens, need = (ids == image_token_index).sum(axis=1), mask.sum(axis=1) * image_seq_length
    bad = np.nonzero(tokens != need)[0]
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"input_ids row {row} holds {int(tokens[row])} image tokens (id {image_token_index}) "
                         f"but its {int(mask[row].sum())} images need {int(need[row])}")


class LlavaForConditionalGeneration(nnx.Module):
    """`vision_tower` (a `towers.VisionTower`), `multi_modal_projector` (Projector), `language_model`
    (LlamaForCausalLM)."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.vision_tower = build_vision_tower(config, rngs)
        self.multi_modal_projector = build_projector(config, rngs)
        self.language_model = LlamaForCausalLM(config.text, rngs=rngs)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, 3, H, W] -> projected image features [N, image_seq_length, D_text]."""
        return project_image_features(self.vision_tower, self.multi_modal_projector, self.config, pixel_values)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     image_mask: jax.Array | None = None, *, check_counts: bool = True) -> jax.Array:
        """Token embeddings with the image features merged in: input_ids [B, T] -> [B, T, D_text].

        pixel_values [N, 3, H, W] or None; image_mask bool [N] (False = padding image) or None (all real);
        or row-aligned pixel_values [B, I, 3, H, W] with image_mask [B, I] (see the module docstring).
        check_counts: raise when image tokens and images disagree (concrete inputs only). Without pixels,
        every token keeps its own embedding (as in transformers' decoding steps).
        """
        c = self.config
        if pixel_values is not None and pixel_values.ndim == 5:
            return self._embed_row_aligned(input_ids, pixel_values, image_mask, check_counts)
        num_images = 0 if pixel_values is None else (
            pixel_values.shape[0] if image_mask is None else jnp.sum(image_mask))
        if check_counts:
            check_image_tokens(input_ids, c.image_token_index, c.image_seq_length, num_images)
        if pixel_values is None:
            return self.language_model.embed(input_ids)
        is_image = input_ids == c.image_token_index
        embeds = embed_placeholders(self.language_model, input_ids, is_image)
        return merge_image_features(embeds, is_image, self.get_image_features(pixel_values), image_mask)

    def _embed_row_aligned(self, input_ids, pixel_values, image_mask, check_counts: bool) -> jax.Array:
        """input_ids [B, T], pixel_values [B, I, 3, H, W], image_mask [B, I] -> [B, T, D_text]."""
        c = self.config
        b, i = pixel_values.shape[:2]
        if image_mask is None:
            image_mask = jnp.ones((b, i), bool)
        if check_counts:
            check_row_image_tokens(input_ids, c.image_token_index, c.image_seq_length, image_mask)
        is_image = input_ids == c.image_token_index
        embeds = embed_placeholders(self.language_model, input_ids, is_image)
        features = self.get_image_features(pixel_values.reshape((b * i,) + pixel_values.shape[2:]))
        return merge_row_features(embeds, is_image, features.reshape((b, i) + features.shape[1:]), image_mask)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, image_mask: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Full forward: input_ids [B, T] (left or right padded, attention_mask [B, T]) -> logits [B, T, V].

        Positions follow the attention mask (cumsum - 1), as in transformers' generate. Packed rows (several
        samples per row, each with its own images) pass segment_ids [B, T] (0 = padding) and positions that
        restart per sample; the images of a row are listed in the order of its samples.
        """
        return self.language_model.logits(self.hidden_states(input_ids, pixel_values, attention_mask, image_mask,
                                                             segment_ids=segment_ids, positions=positions))

    def hidden_states(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, image_mask: jax.Array | None = None, *,
                      segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """As `__call__`, up to the decoder's final norm: hidden [B, T, D] (the training loss applies the head
        itself, in chunks)."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_mask)
        return self.language_model.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask,
                                                 segment_ids=segment_ids, positions=positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits float32 [..., V] (the language model's head)."""
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """Empty KV cache for `batch` rows of up to `max_length` tokens (image tokens included)."""
        return self.language_model.init_cache(batch, max_length, dtype)

    def decode(self, cache: KVCache, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               image_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Appends input_ids [B, T] to the cache: a prefill (with images) or a one-token step.

        Token counts are checked only with pixel_values (a step may emit the image token id).
        Returns (logits float32 [B, T, V], updated cache).
        """
        embeds = self.embed_inputs(input_ids, pixel_values, image_mask, check_counts=pixel_values is not None)
        return self.language_model.decode(cache, inputs_embeds=embeds, attention_mask=attention_mask)


def count_params(config: LlavaConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    state = jax.eval_shape(lambda: nnx.state(LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))


__all__ = ["LlavaConfig", "LlavaForConditionalGeneration", "PRESETS", "build_projector", "build_vision_tower",
           "check_image_tokens", "embed_placeholders", "project_image_features",
           "check_row_image_tokens", "merge_image_features", "merge_row_features", "count_params"]
