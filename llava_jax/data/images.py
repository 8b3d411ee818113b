"""Image decoding and CLIP preprocessing, pixel-for-pixel the official LLaVA data path.

The official training code does `Image.open(path).convert("RGB")`, optionally `expand2square` with the
mean colour (`image_aspect_ratio="pad"`), then `CLIPImageProcessor.preprocess`: resize the shortest side
(PIL bicubic on uint8), center crop, rescale by 1/255, normalize. `preprocess` reproduces the PIL
processor (`CLIPImageProcessorPil`, what `CLIPImageProcessor` falls back to without torchvision and what
LLaVA was trained with) to float32 rounding, using PIL for the resize and a per-channel lookup table for
rescale + normalize.

Decisions, matching the official code rather than transformers' processor where they differ:
- Colour conversion is PIL's `convert("RGB")` for every mode: alpha and palette transparency are dropped,
  not composited on white (transformers 5's processors composite them on white); CMYK uses PIL's naive
  formula; 16-bit and 32-bit modes (I;16, I, F) are clipped to 0..255 by PIL, as in the official code.
- EXIF orientation is NOT applied by default: LLaVA was trained on the stored pixels, and the boxes written
  into LLaVA's grounding conversations (RefCOCO, VG) refer to the stored pixel frame. Pass
  `exif_transpose=True` (what transformers' `load_image` does) for photos shown to a model at inference.
- Multi-frame files (GIF, TIFF) use their first frame.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import warnings
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from llava_jax.data.errors import BadSample

# CLIP's normalization, the default of ImageConfig. The tower config owns it (`CLIPVisionConfig.image_mean` /
# `image_std`, SigLIP's its own); the data floor stays free of jax, so it keeps this equal copy (tested).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Largest accepted width * height: 8192 x 8192. Larger files are rejected before their pixels are decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Largest image file read into memory (a file, or a zip member's uncompressed size).
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
ASPECTS = ("pad", "resize")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images become pixel values.

    Attributes:
      size: the shortest side after resizing (transformers `size["shortest_edge"]`).
      crop_size: side of the square center crop; the output is [3, crop_size, crop_size].
      mean, std: per-channel normalization (CLIP's by default).
      aspect: "pad" expands to a square filled with the mean colour first (LLaVA-1.5 stage 2 and
        inference); "resize" is the plain processor (stage 1).
      rescale_factor: applied to uint8 pixels before normalizing.
      resample: PIL resampling filter of the resize (bicubic).
      max_aspect_ratio: with aspect "resize", images whose long side exceeds this many times the short one
        are rejected (BadSample "extreme_aspect_ratio"): a 1x5000 banner would become 336x1.7M pixels.
      max_pixels: largest width * height of any image this config builds, the padded square of "pad"
        included (BadSample "image_too_large"), checked before anything is allocated.
    """

    size: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    aspect: str = "pad"
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    max_aspect_ratio: float = 200.0
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.aspect not in ASPECTS:
            raise ValueError(f"ImageConfig.aspect must be one of {ASPECTS}, got {self.aspect!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageConfig.mean and std need 3 values, got {self.mean} and {self.std}")
        if self.max_pixels <= 0 or self.max_aspect_ratio < 1:
            raise ValueError(f"ImageConfig.max_pixels must be positive and max_aspect_ratio >= 1, got "
                             f"{self.max_pixels} and {self.max_aspect_ratio}")
        if self.size <= 0 or self.crop_size <= 0:
            raise ValueError(f"ImageConfig sizes must be positive, got size={self.size} crop={self.crop_size}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour of `aspect="pad"`: `tuple(int(x * 255) for x in image_mean)` as in LLaVA."""
        return tuple(int(x * 255) for x in self.mean)

    @classmethod
    def for_tower(cls, vision: Any, *, aspect: str = "pad", **fields) -> "ImageConfig":
        """At a vision tower config's `image_size` with its normalization (`image_mean` / `image_std`: CLIP's,
        SigLIP's, ...); `fields` sets the others."""
        size = vision.image_size
        return cls(size=size, crop_size=size, mean=vision.image_mean, std=vision.image_std, aspect=aspect, **fields)

    @classmethod
    def from_hf(cls, processor: Any, *, aspect: str = "pad") -> "ImageConfig":
        """From a transformers image processor, a processor holding one (`LlavaProcessor`), the dict of a
        `preprocessor_config.json`, or the path of that file or of its folder."""
        config = _hf_processor_dict(processor)
        size, crop_size = _resize_and_crop(config, aspect)
        for flag in ("do_rescale", "do_normalize"):
            if not config.get(flag, True):
                raise ValueError(f"ImageConfig.from_hf: {flag}=False is not supported")
        return cls(
            size=size,
            crop_size=crop_size,
            mean=tuple(config.get("image_mean", CLIP_MEAN)),
            std=tuple(config.get("image_std", CLIP_STD)),
            aspect=aspect,
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            resample=_pil_resample(config.get("resample", Image.Resampling.BICUBIC)),
        )


def _hf_processor_dict(processor: Any) -> dict:
    """The preprocessor_config.json dict of `processor` (object, dict, file or folder)."""
    if isinstance(processor, Mapping):
        return dict(processor)
    if isinstance(processor, (str, os.PathLike)):
        path = epath.Path(processor)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"ImageConfig.from_hf: cannot read {path}: {e}") from e
    processor = getattr(processor, "image_processor", processor)
    if not hasattr(processor, "to_dict"):
        raise TypeError(f"ImageConfig.from_hf: expected an image processor, dict or path, got {type(processor)}")
    return processor.to_dict()


def _resize_and_crop(config: Mapping, aspect: str) -> tuple[int, int]:
    """(size, crop_size) of a processor dict: CLIP's shortest edge + center crop, or a resize to a fixed square
    (SigLIP, OneVision: `size` {"height": S, "width": S}, no crop), which equals shortest edge S + crop S on the
    square images of aspect "pad" only."""
    if not config.get("do_resize", True):
        raise ValueError("ImageConfig.from_hf: do_resize=False is not supported")
    size = config.get("size", 224)
    if isinstance(size, Mapping) and not size.get("shortest_edge") and "height" in size:
        side = _square_side(size, "size")
        if aspect != "pad":
            raise ValueError(f"ImageConfig.from_hf: size {dict(size)} resizes to a fixed square (squashing the "
                             f"aspect ratio); only aspect 'pad' honours it, got aspect {aspect!r}")
        crop = _square_side(config["crop_size"], "crop_size") if config.get("do_center_crop") else side
        return side, min(crop, side)
    if not config.get("do_center_crop", True):
        raise ValueError("ImageConfig.from_hf: a shortest-edge resize needs do_center_crop, got "
                         f"do_center_crop={config.get('do_center_crop')}")
    return _shortest_edge(size), _square_side(config.get("crop_size", 224))


def _shortest_edge(size: Any) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    raise ValueError(f"ImageConfig.from_hf: unsupported resize `size` {size!r} (need shortest_edge)")


def _square_side(crop_size: Any, field: str = "crop_size") -> int:
    if isinstance(crop_size, int):
        return crop_size
    if isinstance(crop_size, Mapping) and crop_size.get("height") == crop_size.get("width") is not None:
        return int(crop_size["height"])
    raise ValueError(f"ImageConfig.from_hf: unsupported `{field}` {crop_size!r} (need a square)")


def _pil_resample(resample: Any) -> int:
    if isinstance(resample, int) and resample in {int(r) for r in Image.Resampling}:
        return int(resample)
    raise ValueError(f"ImageConfig.from_hf: unsupported `resample` {resample!r} (need a PIL filter id)")


def load_image(data: bytes | str | os.PathLike, *, sample_id: str | None = None, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False) -> Image.Image:
    """Decodes an image file into an RGB PIL image, as the official code: `Image.open(f).convert("RGB")`.

    Args:
      data: the file's bytes, or its path (local or any etils epath, e.g. gs://), read by `read_image_bytes`.
      sample_id: the dataset id, for error messages.
      name: what to call the file in error messages (defaults to the path).
      max_pixels: width * height above which the file is rejected from its header, before decoding.
      exif_transpose: rotate / flip by the EXIF orientation tag (see the module docstring).

    Raises:
      BadSample: "missing_image" (no such path), "image_too_large" (over max_pixels, a decompression
        bomb or a file over DEFAULT_MAX_IMAGE_BYTES), "corrupt_image" (not an image, truncated, undecodable).
    """
    name = name or (f"<{len(data)} bytes>" if isinstance(data, (bytes, bytearray, memoryview)) else str(data))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = read_image_bytes(data, name=name, sample_id=sample_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's bomb warning (we check ourselves) and palette warnings
        try:
            image = _open_within(data, name, max_pixels, sample_id)
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            rgb = image.convert("RGB")
            rgb.info.pop("transparency", None)  # else transformers' processors composite that colour on white
        except BadSample:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise BadSample("corrupt_image", f"cannot decode image {name}: {e}", sample_id) from e
    if rgb.width == 0 or rgb.height == 0:
        raise BadSample("corrupt_image", f"image {name} is empty ({rgb.width}x{rgb.height})", sample_id)
    return rgb


def _open_within(data: bytes, name: str, max_pixels: int, sample_id: str | None) -> Image.Image:
    """`Image.open` (the header only), refused over `max_pixels` in our words. PIL refuses a file over twice
    `Image.MAX_IMAGE_PIXELS` inside `Image.open`, in its own words and before telling the size: then the
    size comes from `header_size` and our limit is still the one reported."""
    def check(width: int, height: int) -> None:
        if width * height > max_pixels:
            raise BadSample("image_too_large", f"image {name} is {width}x{height}, over the limit of "
                            f"{max_pixels} pixels", sample_id)

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        size = header_size(data)
        if size:
            check(*size)
        raise BadSample("image_too_large", f"image {name}: {e}", sample_id) from e
    check(*image.size)
    return image


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header, read by PIL's registered format plugins (what `Image.open`
    tries) without decoding pixels and without PIL's own pixel limit; None when no plugin reads it."""
    Image.init()
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        if accept is not None and accept(data[:16]) in (False, None, ""):
            continue
        try:
            return factory(io.BytesIO(data), "").size
        except Exception:  # noqa: BLE001 - not this format (or refused by the plugin): try the next one
            continue
    return None


def read_image_bytes(source: str | os.PathLike | Callable[[], BinaryIO], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                     name: str | None = None, sample_id: str | None = None) -> bytes:
    """The one bounded read of an image file: never more than `max_bytes` + 1 bytes come into memory, whatever
    the file's size or header says. Every reader uses it: `load_image`, the image folders and zip archives
    of the sources, the server's file: URLs.

    Args:
      source: a path (local or any etils epath), or a function opening a binary file (a zip archive member).
      max_bytes: the largest file accepted.
      name: what to call the file in error messages (defaults to the path).
      sample_id: the dataset id, for error messages.

    Raises:
      BadSample: "missing_image" (no such file, or a folder), "unreadable_image" (permissions, symlink loops,
        not a regular file), "corrupt_image" (a zip member that does not inflate), "image_too_large".
    """
    name = name or str(source)
    opener = source if callable(source) else lambda: _open_regular_file(source)
    try:
        with opener() as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise BadSample("missing_image", f"image file not found: {name}", sample_id) from e
    except IsADirectoryError as e:
        raise BadSample("missing_image", f"image {name} is a folder", sample_id) from e
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise BadSample("corrupt_image", f"cannot read image {name}: {e}", sample_id) from e
    except (OSError, ValueError) as e:
        raise BadSample("unreadable_image", f"cannot read image {name}: {e}", sample_id) from e
    if len(data) > max_bytes:
        raise BadSample("image_too_large", f"image {name} is over the limit of {max_bytes} bytes", sample_id)
    return data


def _open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Opens a file for reading; a local FIFO or device (which could block or never end) is refused first."""
    if "://" not in str(path):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(str(path))
        if not stat.S_ISREG(mode):
            raise OSError("not a regular file")
    return epath.Path(path).open("rb")


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The official `expand2square`: the image centered on a square of `background` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def resize_shortest_edge(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resizes so the shortest side is `size`; the long side is truncated as transformers does."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    return image.resize((new_width, new_height), resample=resample)


def center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """[H, W, C] -> [side, side, C]; zero-padded where the image is smaller (transformers' rule)."""
    height, width = pixels.shape[:2]
    top, left = (height - side) // 2, (width - side) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + side, left:left + side]
    padded_h, padded_w = max(side, height), max(side, width)
    pad_top, pad_left = -(-(padded_h - height) // 2), -(-(padded_w - width) // 2)
    padded = np.zeros((padded_h, padded_w) + pixels.shape[2:], pixels.dtype)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(padded_h, top + side), max(0, left):min(padded_w, left + side)]


def normalize_table(cfg: ImageConfig) -> np.ndarray:
    """[3, 256] float32: the normalized value of each uint8 level per channel (`level_table`)."""
    return level_table(cfg.rescale_factor, cfg.mean, cfg.std)


def level_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: (level * rescale_factor - mean) / std for each uint8 level and channel, computed with
    the same dtypes as transformers (rescale in float64 then float32, normalize in float32)."""
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(mean, np.float32)[:, None]
    std = np.asarray(std, np.float32)[:, None]
    return (levels[None, :] - mean) / std


def normalize_levels(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32 through a `level_table` (one lookup per channel)."""
    return np.stack([table[channel].take(pixels[..., channel]) for channel in range(3)], axis=-3)


_TABLES: dict[ImageConfig, np.ndarray] = {}


def _table(cfg: ImageConfig) -> np.ndarray:
    table = _TABLES.get(cfg)
    if table is None:
        table = _TABLES[cfg] = normalize_table(cfg)
    return table


def check_image_size(size: tuple[int, int], cfg: ImageConfig, *, sample_id: str | None = None,
                     name: str | None = None) -> None:
    """Refuses an image (width, height) whose preprocessing under `cfg` would allocate without bound.

    Raises:
      BadSample("extreme_aspect_ratio"): with aspect "resize", long side over `cfg.max_aspect_ratio` times
        the short one.
      BadSample("image_too_large"): the image, or its padded square with aspect "pad" (a 1x100000 strip
        would become a 100000x100000 square), over `cfg.max_pixels`.
    """
    where = f"image {name}" if name else "image"
    width, height = size
    if cfg.aspect == "resize" and max(size) > cfg.max_aspect_ratio * max(min(size), 1):
        raise BadSample("extreme_aspect_ratio", f"{where} is {width}x{height}, more elongated than the limit "
                        f"of {cfg.max_aspect_ratio:g}:1", sample_id)
    built = max(size) ** 2 if cfg.aspect == "pad" else width * height
    if built > cfg.max_pixels:
        padded = "padded to a square " if cfg.aspect == "pad" else ""
        raise BadSample("image_too_large", f"{where} is {width}x{height}; {padded}that is {built} pixels, over the "
                        f"limit of {cfg.max_pixels}", sample_id)


def preprocess(image: Image.Image, cfg: ImageConfig, *, sample_id: str | None = None) -> np.ndarray:
    """PIL image -> float32 pixel values [3, crop_size, crop_size] (channels first, like transformers).

    Raises BadSample (`check_image_size`) before allocating for an image too elongated or too large.
    """
    check_image_size(image.size, cfg, sample_id=sample_id)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if cfg.aspect == "pad":
        image = expand_to_square(image, cfg.background)
    image = resize_shortest_edge(image, cfg.size, cfg.resample)
    pixels = center_crop(np.asarray(image), cfg.crop_size)  # [S, S, 3] uint8
    return normalize_levels(pixels, _table(cfg))  # one lookup per channel does rescale + normalize
