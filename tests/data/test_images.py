"""Image decoding and CLIP preprocessing against the official LLaVA path and transformers' processor.

Reference pipeline (llava/train/train.py): `Image.open(f).convert("RGB")`, `expand2square` with the mean
colour for aspect "pad" (llava.mm_utils), then transformers' PIL `CLIPImageProcessor`.
"""

import importlib
import importlib.util
import io
import os
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import load_image as hf_load_image

from llava_jax.data.errors import BadSample
from llava_jax.data.images import (CLIP_MEAN, CLIP_STD, ImageConfig, expand_to_square, header_size, load_image,
                                   preprocess, read_image_bytes)


def official(module: str):
    """Imports llava.<module> from llava-torch without llava/__init__ (which builds the torch models)."""
    spec = importlib.util.find_spec("llava")
    if spec is None:
        pytest.skip("llava-torch is not installed")
    if "llava" not in sys.modules:
        package = types.ModuleType("llava")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["llava"] = package
    return importlib.import_module(f"llava.{module}")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: smooth gradients plus noise (sharp edges stress the bicubic filter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 127 + 110 * np.sin(x[..., None] / 7.3 + y[..., None] / 11.1 + rng.uniform(0, 6, 3))
    return np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose EXIF says `orientation` (stored pixels unchanged)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=92, exif=exif)


def varied_files() -> dict[str, bytes]:
    """Encoded files of many sizes, aspect ratios, modes and formats."""
    files = {}
    sizes = [(640, 480), (480, 640), (337, 337), (1, 1), (2, 9), (997, 13), (13, 997), (223, 337), (1031, 769)]
    for i, (w, h) in enumerate(sizes):
        files[f"rgb_{w}x{h}.png"] = encode(Image.fromarray(photo(w, h, i)), "PNG")
    rgb = photo(211, 149, 7)
    alpha = np.random.default_rng(1).integers(0, 256, (149, 211), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    files["rgba.png"] = encode(rgba, "PNG")
    files["rgba.webp"] = encode(rgba, "WEBP", lossless=True)
    files["la.png"] = encode(rgba.convert("LA"), "PNG")
    files["gray.jpg"] = encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=90)
    files["bilevel.png"] = encode(Image.fromarray(rgb).convert("1"), "PNG")
    palette = Image.fromarray(rgb).quantize(61)
    files["palette.gif"] = encode(palette, "GIF")
    files["palette_transparent.png"] = encode(palette, "PNG", transparency=5)
    files["cmyk.jpg"] = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90)
    files["cmyk.tiff"] = encode(Image.fromarray(rgb).convert("CMYK"), "TIFF")
    files["ycbcr.jpg"] = encode(Image.fromarray(photo(307, 401, 3)), "JPEG", quality=75, subsampling=2)
    deep = (np.arange(149 * 211).reshape(149, 211) % 300).astype(np.uint16)
    files["gray16.png"] = encode(Image.fromarray(deep), "PNG")
    files["int32.tiff"] = encode(Image.fromarray(deep.astype(np.int32)), "TIFF")
    files["float.tiff"] = encode(Image.fromarray(deep.astype(np.float32) / 299), "TIFF")
    files["rgb.bmp"] = encode(Image.fromarray(rgb), "BMP")
    files["exif6.jpg"] = with_orientation(photo(251, 163, 5), 6)
    return files


FILES = varied_files()


@pytest.fixture(scope="module")
def expand2square():
    return official("mm_utils").expand2square


def hf_processor(size: int = 336, crop: int = 336) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def reference(data: bytes, processor, aspect: str, expand2square) -> np.ndarray:
    """The official LLaVA data path on one encoded file -> [3, S, S].

    The image is RGB already; `do_convert_rgb=False` keeps transformers 5 from compositing the pixels of a
    palette's transparent colour on white (`convert("RGB")` keeps it in `info`), which the transformers
    LLaVA was trained with (4.31) did not do.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if aspect == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor(image, do_convert_rgb=False, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_preprocess_matches_official_path_on_varied_files(aspect, expand2square):
    processor = hf_processor()
    cfg = ImageConfig.from_hf(processor, aspect=aspect)
    for name, data in FILES.items():
        ours = preprocess(load_image(data, name=name), cfg)
        expected = reference(data, processor, aspect, expand2square)
        assert ours.dtype == np.float32 and ours.shape == (3, 336, 336), name
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("size,crop", [(224, 224), (199, 223)])  # CLIP-224 (LLaVA v1); crop > size pads
def test_preprocess_matches_other_processor_sizes(size, crop, expand2square):
    processor = hf_processor(size, crop)
    for aspect in ("pad", "resize"):
        cfg = ImageConfig.from_hf(processor, aspect=aspect)
        for name in ("rgb_640x480.png", "rgb_13x997.png", "cmyk.jpg"):
            ours = preprocess(load_image(FILES[name]), cfg)
            assert ours.shape == (3, crop, crop)
            np.testing.assert_allclose(ours, reference(FILES[name], processor, aspect, expand2square),
                                       atol=1e-5, rtol=0, err_msg=f"{name} {aspect}")


def test_exif_orientation_is_opt_in_like_transformers_load_image():
    processor = hf_processor()
    cfg = ImageConfig(aspect="resize")
    data = FILES["exif6.jpg"]
    stored = load_image(data)
    assert stored.size == (251, 163)  # default: stored pixels, as the official training code
    upright = load_image(data, exif_transpose=True)
    assert upright.size == (163, 251)
    expected = processor(hf_load_image(Image.open(io.BytesIO(data))), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(upright, cfg), expected, atol=1e-5, rtol=0)


def test_transparency_is_dropped_like_official_code_not_composited_on_white():
    rgba = Image.open(io.BytesIO(FILES["rgba.png"]))
    np.testing.assert_array_equal(np.asarray(load_image(FILES["rgba.png"])), np.asarray(rgba)[..., :3])
    palette = Image.open(io.BytesIO(FILES["palette_transparent.png"]))
    ours = load_image(FILES["palette_transparent.png"])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(palette.convert("RGB")))
    # Nothing left for a transformers processor to composite on white either.
    assert "transparency" not in ours.info


def test_expand_to_square_matches_official(expand2square):
    for size in [(9, 4), (4, 9), (5, 5), (8, 3), (3, 8)]:
        image = Image.fromarray(photo(*size, seed=sum(size)))
        np.testing.assert_array_equal(np.asarray(expand_to_square(image, (122, 116, 104))),
                                      np.asarray(expand2square(image, (122, 116, 104))))


def test_image_config_from_hf_dict_folder_and_object(tmp_path):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 229}, crop_size={"height": 227, "width": 227},
                                      image_mean=[0.1, 0.2, 0.3], image_std=[0.7, 0.6, 0.5])
    processor.save_pretrained(tmp_path)
    expected = ImageConfig(size=229, crop_size=227, mean=(0.1, 0.2, 0.3), std=(0.7, 0.6, 0.5), aspect="resize")
    assert ImageConfig.from_hf(processor, aspect="resize") == expected
    assert ImageConfig.from_hf(tmp_path, aspect="resize") == expected
    assert ImageConfig.from_hf(processor.to_dict(), aspect="resize") == expected
    assert ImageConfig().mean == CLIP_MEAN and ImageConfig().std == CLIP_STD
    assert ImageConfig().background == (122, 116, 104)


def test_image_config_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="size .* only aspect 'pad' honours it"):
        ImageConfig.from_hf({"size": {"height": 336, "width": 336}}, aspect="resize")
    with pytest.raises(ValueError, match="`size`"):
        ImageConfig.from_hf({"size": {"height": 336, "width": 300}})
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageConfig.from_hf({"size": {"shortest_edge": 336}, "do_center_crop": False})
    with pytest.raises(ValueError, match="crop_size"):
        ImageConfig.from_hf({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 300}})
    with pytest.raises(ValueError, match="aspect"):
        ImageConfig(aspect="anyres")


def test_siglip_processor_square_resize_on_padded_images(tmp_path):
    """SigLIP's processor (size as height / width, no crop) read from its folder: on LLaVA's mean-colour padded
    square it gives the pixels of transformers' SiglipImageProcessorPil."""
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 30, "width": 30}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path)
    cfg = ImageConfig.from_hf(tmp_path)
    assert (cfg.size, cfg.crop_size, cfg.mean) == (30, 30, (0.5, 0.5, 0.5))
    image = Image.fromarray(photo(41, 23, seed=3))
    ref = processor(images=expand_to_square(image, cfg.background), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, cfg), ref, atol=1e-5)


def test_truncated_and_garbage_files_are_corrupt_images():
    truncated = FILES["ycbcr.jpg"][: len(FILES["ycbcr.jpg"]) // 2]
    with pytest.raises(BadSample, match="photo_17.jpg") as error:
        load_image(truncated, sample_id="s17", name="photo_17.jpg")
    assert error.value.reason == "corrupt_image" and error.value.sample_id == "s17"
    with pytest.raises(BadSample) as error:
        load_image(FILES["rgb_640x480.png"][:-100])
    assert error.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as error:
        load_image(b"<html>not an image</html>", name="x.jpg")
    assert error.value.reason == "corrupt_image"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one empty pixel row (a decompression bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def test_too_large_images_are_rejected_before_decoding():
    with pytest.raises(BadSample) as error:
        load_image(png_header(30_011, 20_011), name="bomb.png")
    assert error.value.reason == "image_too_large" and "bomb.png" in str(error.value)
    # Past PIL's own bomb limit the error is the same even with no limit of ours.
    with pytest.raises(BadSample) as error:
        load_image(png_header(100_003, 100_003), max_pixels=10**12)
    assert error.value.reason == "image_too_large"
    with pytest.raises(BadSample) as error:
        load_image(FILES["rgb_640x480.png"], max_pixels=640 * 480 - 1)
    assert error.value.reason == "image_too_large"
    assert load_image(FILES["rgb_640x480.png"], max_pixels=640 * 480).size == (640, 480)


def test_pixel_limit_past_pils_own_bomb_limit_is_reported_in_our_words():
    # 20000 x 20000 is over twice PIL's MAX_IMAGE_PIXELS: Image.open itself refuses it, in its own words.
    bomb = png_header(20_000, 20_000)
    assert header_size(bomb) == (20_000, 20_000) and header_size(b"not an image") is None
    with pytest.raises(BadSample) as error:
        load_image(bomb, name="bomb.png", max_pixels=300 * 300)
    assert str(error.value) == "image bomb.png is 20000x20000, over the limit of 90000 pixels [image_too_large]"
    assert header_size(FILES["ycbcr.jpg"]) == Image.open(io.BytesIO(FILES["ycbcr.jpg"])).size


def test_one_bounded_reader_for_paths_folders_and_archive_members(tmp_path):
    import threading
    import zipfile

    from llava_jax.data.sources import ImageFolder, ImageZip

    with open(tmp_path / "huge.png", "wb") as f:  # sparse: 1 GiB that must never be read into memory
        f.truncate(1 << 30)
    (tmp_path / "ok.png").write_bytes(FILES["rgb_640x480.png"])
    size = len(FILES["rgb_640x480.png"])
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("img/ok.png", FILES["rgb_640x480.png"])
    readers = {"path": lambda name, limit: read_image_bytes(tmp_path / name, max_bytes=limit),
               "folder": lambda name, limit: ImageFolder(str(tmp_path), max_bytes=limit).read(name, "s1"),
               "zip": lambda name, limit: ImageZip(str(tmp_path / "images.zip"), max_bytes=limit).read(f"img/{name}",
                                                                                                       "s1")}
    for kind, read in readers.items():
        assert read("ok.png", size) == FILES["rgb_640x480.png"], kind
        with pytest.raises(BadSample, match=f"over (the limit of )?{size - 1}( bytes)?") as error:
            read("ok.png", size - 1)  # a zip member: refused from its header, before inflating
        assert error.value.reason == "image_too_large", kind
    with pytest.raises(BadSample, match="over the limit of 1000 bytes"):
        readers["folder"]("huge.png", 1000)
    os.mkfifo(tmp_path / "pipe.png")  # opening a FIFO for reading would wait for a writer forever
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_reason_of(readers["folder"], "pipe.png")), daemon=True)
    reader.start()
    reader.join(10)
    assert outcome == ["unreadable_image"]


def _reason_of(read, name):
    try:
        read(name, 1000)
    except BadSample as e:
        return e.reason
    return None


def test_extreme_aspect_ratios_are_rejected_only_when_resized(expand2square):
    banner = Image.fromarray(photo(401, 2, seed=3))
    with pytest.raises(BadSample) as error:
        preprocess(banner, ImageConfig(aspect="resize"), sample_id="b1")
    assert error.value.reason == "extreme_aspect_ratio" and error.value.sample_id == "b1"
    assert preprocess(banner, ImageConfig(aspect="resize", max_aspect_ratio=201)).shape == (3, 336, 336)
    processor = hf_processor()
    np.testing.assert_allclose(preprocess(banner, ImageConfig(aspect="pad")),
                               reference(encode(banner, "PNG"), processor, "pad", expand2square), atol=1e-5, rtol=0)


def test_load_image_from_path(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(FILES["palette.gif"])
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(load_image(FILES["palette.gif"])))
    np.testing.assert_array_equal(np.asarray(load_image(str(path))),
                                  np.asarray(Image.open(path).convert("RGB")))
    with pytest.raises(BadSample, match="dog.png") as error:
        load_image(tmp_path / "dog.png", sample_id="7")
    assert error.value.reason == "missing_image"


def test_fast_torchvision_processor_is_close():
    """transformers' default CLIPImageProcessor when torchvision is installed: within a few uint8 levels."""
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    if getattr(processor, "backend", "pil") != "torchvision":
        pytest.skip("CLIPImageProcessor is the PIL backend here")
    cfg = ImageConfig(aspect="resize")
    for name in ("rgb_640x480.png", "ycbcr.jpg"):
        image = load_image(FILES[name])
        fast = processor(image, return_tensors="pt")["pixel_values"][0].numpy()
        difference = np.abs(preprocess(image, cfg) - fast)
        assert difference.mean() < 2e-3 and difference.max() < 3 / 255 / min(CLIP_STD), name


@pytest.mark.slow
def test_random_sizes_sweep(expand2square):
    """300 random sizes and aspect ratios (JPEG, both aspects) against the official path."""
    processor = hf_processor()
    rng = np.random.default_rng(11)
    for trial in range(300):
        width, height = (int(v) for v in rng.integers(1, 1500, 2))
        if trial % 4 == 0:
            height = int(rng.integers(1, 12))
        data = encode(Image.fromarray(photo(width, height, trial)), "JPEG", quality=85)
        for aspect in ("pad", "resize"):
            cfg = ImageConfig(aspect=aspect, max_aspect_ratio=2000)
            np.testing.assert_allclose(preprocess(load_image(data), cfg),
                                       reference(data, processor, aspect, expand2square),
                                       atol=1e-5, rtol=0, err_msg=f"{width}x{height} {aspect}")
