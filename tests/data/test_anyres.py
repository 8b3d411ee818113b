"""AnyRes, single-tile and video pixels (`data.anyres`) and token counts (`vision_layout.ImageLayout`) side by
side with transformers' PIL processors and `LlavaNextProcessor` / `LlavaOnevisionProcessor`, on tiny tiles
(S = 28 or 30), odd image sizes and aspect ratios and several grid pinpoint sets."""

import importlib.util

import numpy as np
import pytest
from PIL import Image
from transformers import (AutoTokenizer, CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor,
                          LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, LlavaProcessor,
                          SiglipImageProcessorPil)

from llava_jax.data.anyres import SIGLIP_MEAN, SIGLIP_STD, PixelNorm, image_tiles, video_tiles
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, ImageConfig, preprocess
from llava_jax.vision_layout import ImageLayout, max_tiles_from_aspect_ratio

TOKENIZER = "/work/shared/testdata/llama2_tokenizer"
S = 28
PINPOINT_SETS = {
    "next": [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
    "squares": [[28, 28], [56, 56], [84, 84], [28, 112]],
    "onevision_6x6": [[h, w] for h in range(28, 169, 28) for w in range(28, 169, 28)],
}
# (height, width): odd sizes, both orientations, one-pixel strips, a square.
SIZES = [(37, 91), (91, 37), (500, 333), (333, 500), (1, 400), (400, 1), (1000, 30), (30, 1000), (28, 28)]
# Sizes whose unpadded side is an integer that float arithmetic puts just below (the processors' round(x, 7)).
ROUNDING_SIZES = [(94, 329), (329, 94), (49, 343), (55, 165)]
CLIP = PixelNorm(CLIP_MEAN, CLIP_STD)
SIGLIP = PixelNorm(SIGLIP_MEAN, SIGLIP_STD)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Noise over a smooth gradient: sharp edges stress the bicubic filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    smooth = 127 + 100 * np.sin(x[..., None] / 7.3 + y[..., None] / 11.1 + rng.uniform(0, 6, 3))
    return Image.fromarray(np.clip(smooth + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8))


def random_sizes(count: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return SIZES + ROUNDING_SIZES + [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    return tok


class OnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' processor, built without a video processor (that class needs torchvision, absent here):
    only the class check of the missing argument is skipped; the counting code is theirs."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def next_image_processor(pinpoints):
    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=pinpoints)


def onevision_image_processor(pinpoints):
    return LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=pinpoints,
                                           image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


def count_tokens(processor, text, images) -> int:
    ids = processor(text=text, images=images, return_tensors="np")["input_ids"]
    return int((ids == processor.image_token_id).sum())


# ---------------------------------------------------------------- pixels


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS.values(), ids=PINPOINT_SETS.keys())
def test_anyres_tiles_equal_next_and_onevision_processors(pinpoints):
    layout = ImageLayout("anyres", S, 4, pinpoints)
    processors = ((next_image_processor(pinpoints), CLIP), (onevision_image_processor(pinpoints), SIGLIP))
    for seed, (height, width) in enumerate(SIZES):
        image = random_image(height, width, seed)
        for processor, norm in processors:
            expected = processor(image, return_tensors="np")["pixel_values"][0]
            tiles = image_tiles(image, layout, norm)
            assert tiles.dtype == np.float32 and tiles.shape == expected.shape == (layout.num_tiles((height, width)),
                                                                                  3, S, S)
            np.testing.assert_array_equal(tiles, expected, err_msg=f"{height}x{width}")


def test_single_tile_equals_onevision_multi_image_and_llava15_pad():
    processor = onevision_image_processor(PINPOINT_SETS["next"])
    layout = ImageLayout("single", S, 4, newline=True)
    for seed, (height, width) in enumerate(SIZES):
        first, second = random_image(height, width, seed), random_image(40, 20, seed)
        expected = processor([[first, second]], return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(image_tiles(first, layout, SIGLIP), expected)
        llava15 = preprocess(first, ImageConfig(size=S, crop_size=S, aspect="pad"))
        np.testing.assert_array_equal(image_tiles(first, layout, CLIP)[0], llava15)


def test_batch_padding_is_the_processors_not_ours():
    """The processor pads a batch to its largest tile count with zero tiles; we keep each image's own."""
    pinpoints = PINPOINT_SETS["onevision_6x6"]
    layout = ImageLayout("anyres", S, 4, pinpoints)
    wide, square = random_image(30, 1000), random_image(28, 28)
    batch = next_image_processor(pinpoints)([wide, square], return_tensors="np")["pixel_values"]
    ours = image_tiles(square, layout, CLIP)
    assert batch.shape[1] == layout.num_tiles((30, 1000)) > len(ours) == layout.num_tiles((28, 28)) == 2
    np.testing.assert_array_equal(batch[1, :len(ours)], ours)
    assert not batch[1, len(ours):].any()


def video(frames: int = 8, height: int = 37, width: int = 91) -> np.ndarray:
    return np.stack([np.asarray(random_image(height, width, seed)) for seed in range(frames)])


def test_video_frames_equal_siglip_processor_per_frame():
    """Each frame resized to S x S as OneVision's own (SigLIP, PIL) processor does."""
    layout = ImageLayout("video", S, 4)
    frames = video()
    expected = SiglipImageProcessorPil(size={"height": S, "width": S})(list(frames), return_tensors="np")
    tiles = video_tiles(frames, layout, SIGLIP)
    assert tiles.shape == (8, 3, S, S)
    np.testing.assert_array_equal(tiles, expected["pixel_values"])
    np.testing.assert_array_equal(video_tiles([Image.fromarray(f) for f in frames], layout, SIGLIP), tiles)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="LlavaOnevisionVideoProcessor "
                    "needs torchvision")
def test_video_frames_near_torchvision_video_processor():
    """torchvision's uint8 bicubic resize rounds differently from PIL's: measured at most 2 levels apart on
    under 1% of the values (frames one pixel high excepted: that processor reads them as channels-first)."""
    from transformers import LlavaOnevisionVideoProcessor
    frames = video(8, 57, 113)
    expected = LlavaOnevisionVideoProcessor(size={"height": S, "width": S})(frames, return_tensors="np")
    levels = np.abs(video_tiles(frames, ImageLayout("video", S, 4), CLIP) - expected["pixel_values_videos"][0])
    levels /= (1 / 255) / np.asarray(CLIP_STD, np.float32)[:, None, None]
    assert levels.max() <= 2 + 1e-3 and (levels > 1e-3).mean() < 0.01


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize("strategy,cls_token", [("default", False), ("full", True)])
@pytest.mark.parametrize("pinpoints", PINPOINT_SETS.values(), ids=PINPOINT_SETS.keys())
def test_next_token_counts_equal_processor(tokenizer, pinpoints, strategy, cls_token):
    processor = LlavaNextProcessor(image_processor=next_image_processor(pinpoints), tokenizer=tokenizer,
                                   patch_size=4, vision_feature_select_strategy=strategy,
                                   num_additional_image_tokens=1)
    layout = ImageLayout("anyres", S, 4, pinpoints, cls_token=cls_token)
    for height, width in SIZES[:4]:
        assert count_tokens(processor, "<image>", random_image(height, width)) == layout.num_tokens((height, width))
    sizes = random_sizes(300)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [layout.num_tokens(size) for size in sizes] == expected


@pytest.mark.parametrize("max_tiles", [1, 2, 9])
@pytest.mark.parametrize("pinpoints", PINPOINT_SETS.values(), ids=PINPOINT_SETS.keys())
def test_onevision_image_token_counts_equal_processor(tokenizer, pinpoints, max_tiles):
    tile_size, patch_size = 30, 4  # 7 patches a side, the remainder dropped (SigLIP: 384 // 14 = 27)
    pinpoints = [[h // S * tile_size, w // S * tile_size] for h, w in pinpoints]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile_size, "width": tile_size},
                                                      image_grid_pinpoints=pinpoints)
    processor = OnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   num_image_tokens=49, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=f"anyres_max_{max_tiles}")
    layout = ImageLayout("anyres", tile_size, patch_size, pinpoints, max_tiles=max_tiles)
    assert count_tokens(processor, "<image>", random_image(91, 37)) == layout.num_tokens((91, 37))
    sizes = random_sizes(300)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [layout.num_tokens(size) for size in sizes] == expected
    if max_tiles == 1 and len(pinpoints) > 10:  # the bilinear downsampling is exercised
        plain = ImageLayout("anyres", tile_size, patch_size, pinpoints)
        assert any(layout.num_tokens(size) < plain.num_tokens(size) for size in sizes)
    multi = ImageLayout("single", tile_size, patch_size, newline=True)
    images = [[random_image(37, 91), random_image(500, 333)]]
    assert count_tokens(processor, "<image><image>", images) == 2 * multi.num_tokens((37, 91)) == 2 * 50


def test_onevision_video_token_count_equals_processor(tokenizer):
    processor = OnevisionProcessor(image_processor=onevision_image_processor(PINPOINT_SETS["next"]),
                                   tokenizer=tokenizer, video_processor=None, num_image_tokens=49,
                                   vision_feature_select_strategy="full")
    layout = ImageLayout("video", S, 4)
    pixels = video_tiles(video(8), layout, SIGLIP)
    expected = processor.replace_video_token({"pixel_values_videos": [pixels]}, 0).count("<video>")
    assert layout.num_video_tokens(len(pixels)) == expected == 8 * 4 * 4 + 1
    counts = processor._get_num_multimodal_tokens(video_sizes=[(t, 37, 91) for t in (1, 8, 13)])
    assert [layout.num_video_tokens(t) for t in (1, 8, 13)] == counts["num_video_tokens"]


@pytest.mark.parametrize("strategy,cls_token,expected", [("default", False, 576), ("full", True, 577)])
def test_single_counts_equal_llava_processor(tokenizer, strategy, cls_token, expected):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
    layout = ImageLayout("single", 336, 14, cls_token=cls_token)
    assert count_tokens(processor, "<image>", random_image(37, 91)) == layout.num_tokens((37, 91)) == expected


def test_real_sizes_llava_next_336_and_onevision_384(tokenizer):
    """The released configs' tiles and counts: LLaVA-NeXT (CLIP 336/14, its 5 pinpoints), OneVision (SigLIP
    384/14 -> 27 x 27 = 729, its 36 pinpoints, anyres_max_9) and an 8-frame OneVision video."""
    next_images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                   [336, 1008]])
    next_processor = LlavaNextProcessor(image_processor=next_images, tokenizer=tokenizer, patch_size=14,
                                        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    ov_images = LlavaOnevisionImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    ov_processor = OnevisionProcessor(image_processor=ov_images, tokenizer=tokenizer, video_processor=None,
                                      num_image_tokens=729, vision_feature_select_strategy="full")
    next_layout = ImageLayout("anyres", 336, 14, next_images.image_grid_pinpoints)
    ov_layout = ImageLayout("anyres", 384, 14, ov_images.image_grid_pinpoints, max_tiles=9)
    image = random_image(333, 500)
    for processor, layout, norm in ((next_images, next_layout, CLIP), (ov_images, ov_layout, SIGLIP)):
        np.testing.assert_array_equal(image_tiles(image, layout, norm),
                                      processor(image, return_tensors="np")["pixel_values"][0])
    sizes = random_sizes(200, seed=7) + [(672, 672), (336, 336), (2304, 2304)]
    for processor, layout in ((next_processor, next_layout), (ov_processor, ov_layout)):
        expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
        assert [layout.num_tokens(size) for size in sizes] == expected
    assert next_layout.num_tokens((672, 672)) == 576 + 48 * 48 + 48 == 2928
    assert ImageLayout("video", 384, 14).num_video_tokens(8) == 8 * 14 * 14 + 1 == 1569


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="tiles"), "kind"),
    (dict(patch_size=0), "patch_size"),
    (dict(grid_pinpoints=[[28, 50]]), "grid_pinpoints"),
    (dict(grid_pinpoints=[]), "grid_pinpoints"),
    (dict(kind="single", max_tiles=4), "max_tiles"),
    (dict(newline=True), "newline"),
    (dict(kind="video", cls_token=True), "cls_token"),
])
def test_bad_layouts_name_the_field(kwargs, field):
    fields = dict(kind="anyres", tile_size=S, patch_size=4, grid_pinpoints=[[28, 56]]) | kwargs
    with pytest.raises(ValueError, match=f"ImageLayout.{field}"):
        ImageLayout(**fields)


def test_bad_calls_and_aspect_names():
    anyres, clip_video = ImageLayout("anyres", S, 4, [[28, 56]]), ImageLayout("video", S, 4)
    with pytest.raises(ValueError, match="image_size"):
        anyres.num_tokens((0, 10))
    with pytest.raises(ValueError, match="num_video_tokens"):
        clip_video.num_tokens((10, 10))
    with pytest.raises(ValueError, match="kind 'video'"):
        anyres.num_video_tokens(8)
    with pytest.raises(ValueError, match="frames must be uint8"):
        video_tiles(np.zeros((8, 10, 10), np.uint8), clip_video, CLIP)
    with pytest.raises(ValueError, match="use video_tiles"):
        image_tiles(random_image(10, 10), clip_video, CLIP)
    assert [max_tiles_from_aspect_ratio(n) for n in ("anyres", "anyres_max_9", "anyres_max_12")] == [0, 9, 12]
    for bad in ("anyres_max_", "anyres_max_0", "pad", "anyres_max_9x"):
        with pytest.raises(ValueError, match="vision_aspect_ratio"):
            max_tiles_from_aspect_ratio(bad)
