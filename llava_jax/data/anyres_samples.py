"""Samples of images of any resolution (LLaVA-NeXT, LLaVA-OneVision) for the training pipeline.

A record (`sources.LlavaJsonSource`) -> an example with the sample's tiles and its token-aligned feature taps:

    input_ids, labels    int32 [T]            each image / video expanded to ITS token count
    pixel_values         float32 [n, 3, S, S] the tiles of all its images (or video frames), prompt order
    image_taps_index     int32 [T, TAPS]      over `[its n * tile_tokens tile features; newline]` (newline
    image_taps_weight    float32 [T, TAPS]    at row n * tile_tokens); weight 0 at text tokens

A single image takes `AnyResLayouts.image` (LLaVA-NeXT's "anyres" / OneVision's "anyres_max_N"), each image of a
multi-image sample `AnyResLayouts.multi_image` (OneVision: one padded tile + newline; None: `image` as well), a
video record's frames `AnyResLayouts.video` (its one `<image>` stands for the video, as in LLaVA-NeXT's data).
Prompts follow LLaVA-NeXT's `preprocess_multimodal`: a turn's single `<image>` moves to the front unless the turn
starts with it, several stay in place. Collate and the packer move the taps to the tile slots of their row
(`batch.place_taps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from llava_jax.data.errors import BadSample
from llava_jax.data.video import sample_frame_indices
from llava_jax.vision_layout import TAPS, ImageLayout, concat_taps


@dataclasses.dataclass(frozen=True)
class AnyResLayouts:
    """The layouts of an AnyRes model's inputs (plain data a pipeline config holds; the train floor builds
    them from the model config).

    Attributes:
      image: the layout of a sample's only image ("anyres", or "single").
      multi_image: the layout of each image of a sample with several (None: `image`).
      video: the layout of video frames (kind "video"; None: video samples are rejected, "video_unsupported").
      video_frames: frames kept of a video (uniformly sampled when the source gives more; build the source
        with as many: `LlavaJsonSource(video_frames=...)`).
      video_token_id: the id a video's `<image>` expands to (OneVision's `<video>`; None: the image token).
    """

    image: ImageLayout
    multi_image: ImageLayout | None = None
    video: ImageLayout | None = None
    video_frames: int = 8
    video_token_id: int | None = None

    def __post_init__(self):
        if self.image.kind == "video":
            raise ValueError("AnyResLayouts.image must be an 'anyres' or 'single' layout, got 'video'")
        if self.multi_image is not None and self.multi_image.kind == "video":
            raise ValueError("AnyResLayouts.multi_image must be an 'anyres' or 'single' layout, got 'video'")
        if self.video is not None and self.video.kind != "video":
            raise ValueError(f"AnyResLayouts.video must be a 'video' layout, got {self.video.kind!r}")
        if self.video_frames < 1:
            raise ValueError(f"AnyResLayouts.video_frames must be >= 1, got {self.video_frames}")
        for name in ("multi_image", "video"):
            other = getattr(self, name)
            if other is not None and (other.tile_size, other.tile_tokens) != (self.image.tile_size, self.tile_tokens):
                raise ValueError(f"AnyResLayouts.{name}: tile_size {other.tile_size} / tile_tokens {other.tile_tokens}"
                                 f" differ from the image layout's {self.image.tile_size} / {self.tile_tokens}")

    @classmethod
    def for_model(cls, config: Any, *, video_frames: int = 8) -> "AnyResLayouts":
        """The layouts of a `models.llava_next` config (read by its fields): LLaVA-NeXT's images all "anyres";
        LLaVA-OneVision's (a `video_token_index`) "anyres_max_N" alone, one tile + newline each of several, and
        videos expanded to its video token."""
        tile, patch = config.vision.image_size, config.vision.patch_size
        image = ImageLayout("anyres", tile, patch, config.image_grid_pinpoints, max_tiles=config.max_tiles)
        if image.tile_tokens != config.tile_tokens:
            raise ValueError(f"AnyResLayouts.for_model: the tower gives {config.tile_tokens} features a tile, not "
                             f"its {image.tile_tokens} patches")
        video_token = getattr(config, "video_token_index", None)
        if video_token is None:
            return cls(image, video_frames=video_frames)
        return cls(image, ImageLayout("single", tile, patch, newline=True), ImageLayout("video", tile, patch),
                   video_frames=video_frames, video_token_id=video_token)

    @property
    def tile_size(self) -> int:
        return self.image.tile_size

    @property
    def tile_tokens(self) -> int:
        """Feature rows per tile slot (the same tower for every layout)."""
        return self.image.tile_tokens

    def max_sample_tiles(self, max_images: int) -> int:
        """The most tiles a sample of at most `max_images` images (or one video) can have."""
        single = self.image.max_num_tiles
        multi = max_images * (self.multi_image or self.image).max_num_tiles if max_images > 1 else 0
        return max(single, multi, self.video_frames if self.video is not None else 0)


def image_parts(images: list, layout: ImageLayout, norm) -> tuple[list[np.ndarray], list]:
    """PIL images -> (tiles [n_i, 3, S, S] per image, own taps per image)."""
    from llava_jax.data.anyres import image_tiles

    tiles = [image_tiles(image, layout, norm) for image in images]
    return tiles, [layout.taps((image.height, image.width)) for image in images]


def token_aligned_taps(input_ids: np.ndarray, placeholder_id: int, index: np.ndarray, weight: np.ndarray,
                       sample_id: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated image taps [n_tokens, TAPS] placed at the placeholder positions of input_ids [T]
    -> (index int32 [T, TAPS], weight float32 [T, TAPS]), zeros at text tokens."""
    positions = np.flatnonzero(input_ids == placeholder_id)
    if len(positions) != len(index):
        raise BadSample("image_count_mismatch", f"{len(positions)} image token positions but the images give "
                        f"{len(index)} tokens", sample_id)
    out_index = np.zeros((len(input_ids), TAPS), np.int32)
    out_weight = np.zeros((len(input_ids), TAPS), np.float32)
    out_index[positions], out_weight[positions] = index, weight
    return out_index, out_weight


class AnyResSampleProcessor:
    """record -> example (module doc): images decoded, tiled and tapped, the conversation tokenized with each
    image's own token count. Raises BadSample for unusable samples ("too_many_tiles" over `max_tiles`)."""

    def __init__(self, tokenizer, *, template: str, layouts: AnyResLayouts, image_config, image_token_id: int,
                 max_length: int, max_images: int, max_tiles: int):
        from llava_jax.data.anyres import PixelNorm

        self.tokenizer = tokenizer
        self.template_name = template
        self.layouts = layouts
        self.image_config = image_config
        self.norm = PixelNorm(image_config.mean, image_config.std, image_config.rescale_factor,
                              image_config.resample)
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.max_images = max_images
        self.max_tiles = max_tiles

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        sample_id = record["id"]
        if record.get("video") is not None:
            tiles, taps, placeholder = self._video(record, sample_id)
        else:
            tiles, taps = self._images(record, sample_id)
            placeholder = self.image_token_id
        counts = [len(index) for index, _ in taps]
        num_tiles = sum(len(t) for t in tiles)
        if num_tiles > self.max_tiles:
            raise BadSample("too_many_tiles", f"{num_tiles} tiles, at most {self.max_tiles} per row", sample_id)
        tokens = self._tokenize(record["conversations"], counts, placeholder, sample_id)
        index, weight = concat_taps(taps, [len(t) for t in tiles], self.layouts.tile_tokens)
        index, weight = token_aligned_taps(tokens.input_ids, placeholder, index, weight, sample_id)
        size = self.layouts.tile_size
        return {"id": sample_id, "input_ids": np.asarray(tokens.input_ids, np.int32),
                "labels": np.asarray(tokens.labels, np.int32),
                "pixel_values": np.concatenate(tiles) if tiles else np.zeros((0, 3, size, size), np.float32),
                "image_taps_index": index, "image_taps_weight": weight}

    def _tokenize(self, conversations, counts: list[int], placeholder: int, sample_id):
        from llava_jax.data.conversation import get_template
        from llava_jax.data.tokenize import tokenize_conversation

        return tokenize_conversation(conversations, self.tokenizer, get_template(self.template_name),
                                     image_token_id=self.image_token_id, image_seq_length=counts,
                                     max_length=self.max_length, sample_id=sample_id, placeholder_id=placeholder,
                                     image_placement="next")

    def _images(self, record: Mapping[str, Any], sample_id) -> tuple[list[np.ndarray], list]:
        from llava_jax.data.images import load_image

        num_images = len(record["images"])
        if num_images > self.max_images:
            raise BadSample("too_many_images", f"{num_images} images, at most {self.max_images} per sample",
                            sample_id)
        names = record.get("image_paths") or [None] * num_images
        images = [load_image(data, sample_id=sample_id, name=name, max_pixels=self.image_config.max_pixels)
                  for data, name in zip(record["images"], names)]
        layout = self.layouts.image if num_images == 1 else (self.layouts.multi_image or self.layouts.image)
        return image_parts(images, layout, self.norm)

    def _video(self, record: Mapping[str, Any], sample_id) -> tuple[list[np.ndarray], list, int]:
        from llava_jax.data.anyres import video_tiles

        layouts = self.layouts
        if layouts.video is None:
            raise BadSample("video_unsupported", "a video sample, but the pipeline has no video layout", sample_id)
        if record["images"]:
            raise BadSample("image_count_mismatch", "a sample with both images and a video", sample_id)
        frames = np.asarray(record["video"])
        frames = frames[sample_frame_indices(len(frames), layouts.video_frames)]
        try:
            tiles = video_tiles(frames, layouts.video, self.norm)
        except ValueError as e:
            raise BadSample("corrupt_video", f"video {record.get('video_path')!r}: {e}", sample_id) from e
        placeholder = self.image_token_id if layouts.video_token_id is None else layouts.video_token_id
        return [tiles], [layouts.video.video_taps(len(tiles))], placeholder
