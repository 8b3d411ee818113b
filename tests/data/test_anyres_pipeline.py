"""AnyRes training batches (LLaVA-NeXT / OneVision): layouts' taps, the batch contract's taps fields, per-image
token counts, and the pipeline (multi-image and video samples, collate and packing) at tiny sizes.

The central check: the taps of a batch row, applied to features computed from the row's tile slots, give at
every image token exactly the vector that the sample's own taps give over its own tiles."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import batch as batch_spec
from llava_jax.data.anyres_samples import AnyResLayouts
from llava_jax.data.errors import BadSample
from llava_jax.data.images import ImageConfig
from llava_jax.data.pipeline import PipelineConfig, collate, default_sample_processor, make_train_iterator
from llava_jax.vision_layout import TAPS, ImageLayout, concat_taps

S, PATCH = 28, 7  # 4 x 4 patches a tile: tile_tokens 16, a video frame pools to 2 x 2
PINPOINTS = ((28, 56), (56, 28), (56, 56))
IMAGE = ImageLayout("anyres", S, PATCH, PINPOINTS, max_tiles=2)
MULTI = ImageLayout("single", S, PATCH, newline=True)
VIDEO = ImageLayout("video", S, PATCH)
LAYOUTS = AnyResLayouts(IMAGE, MULTI, VIDEO, video_frames=9)
IMAGE_CONFIG = ImageConfig(size=S, crop_size=S, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SIZES = [(1, 1), (10, 40), (40, 10), (50, 50), (100, 20), (333, 91), (28, 56), (57, 29), (1000, 3), (3, 1000)]


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", [
    ImageLayout("anyres", S, PATCH, PINPOINTS), IMAGE, ImageLayout("anyres", S, 14, PINPOINTS, max_tiles=1),
    MULTI, ImageLayout("single", S, PATCH), ImageLayout("single", S, PATCH, cls_token=True),
    ImageLayout("anyres", 336, 14, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))])
def test_layout_taps_have_one_row_per_token(layout):
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(x) for x in rng.integers(1, 2000, 2)) for _ in range(40)]
    for size in sizes:
        index, weight = layout.taps(size)
        own = layout.num_tiles(size) * layout.tile_tokens
        assert len(index) == len(weight) == layout.num_tokens(size), size
        assert index.shape[1] == TAPS and 0 <= index.min() and index.max() <= own
        np.testing.assert_allclose(weight.sum(axis=1), 1.0, rtol=1e-6)
        newlines = (index[:, 0] == own) & (weight[:, 0] == 1)
        expected = int(layout.newline) if layout.kind == "single" else layout.grid_feature_shape(size)[0]
        assert newlines.sum() == expected


def test_video_taps_and_tile_tokens():
    for frames in range(1, 10):
        index, _ = VIDEO.video_taps(frames)
        assert len(index) == VIDEO.num_video_tokens(frames) == frames * 4 + 1 and index[-1, 0] == frames * 16
    assert (IMAGE.tile_tokens, ImageLayout("single", 336, 14, cls_token=True).tile_tokens) == (16, 577)
    assert (IMAGE.max_num_tiles, MULTI.max_num_tiles, LAYOUTS.max_sample_tiles(3)) == (5, 1, 9)
    with pytest.raises(ValueError, match="use video_taps"):
        VIDEO.taps((10, 10))
    with pytest.raises(ValueError, match="cls_token"):
        ImageLayout("anyres", S, PATCH, PINPOINTS, cls_token=True).taps((10, 10))
    with pytest.raises(ValueError, match="AnyResLayouts.video"):
        AnyResLayouts(IMAGE, video=MULTI)
    with pytest.raises(ValueError, match="AnyResLayouts.multi_image"):
        AnyResLayouts(IMAGE, multi_image=ImageLayout("single", S, 14))


# ------------------------------------------------------------------ the batch contract


def test_batch_kinds_and_token_padding_of_taps():
    plain = batch_spec.Layout(2, 5, 3, (3, S, S))
    assert list(batch_spec.shapes(plain)) == ["input_ids", "labels", "attention_mask", "pixel_values", "image_mask"]
    packed = batch_spec.shapes(batch_spec.Layout(2, 5, 3, (3, S, S), packed=True))
    assert "segment_ids" in packed and "image_taps_index" not in packed
    shapes = batch_spec.shapes(batch_spec.Layout(2, 5, 3, (3, S, S), anyres=True))
    assert shapes["image_taps_index"] == ((2, 5, TAPS), np.dtype(np.int32)) and "segment_ids" not in shapes
    assert shapes["image_taps_weight"] == ((2, 5, TAPS), np.dtype(np.float32))
    batch = batch_spec.empty(batch_spec.Layout(2, 5, 3, (3, S, S), anyres=True), pad_token_id=9)
    batch["image_taps_index"][:] = 7
    padded = batch_spec.pad_tokens(batch, 8, pad_token_id=9)
    assert padded["image_taps_index"].shape == (2, 8, TAPS) and (padded["image_taps_index"][:, 5:] == 0).all()
    assert (padded["image_taps_index"][:, :5] == 7).all() and (padded["input_ids"][:, 5:] == 9).all()


# ------------------------------------------------------------------ features: numpy stand-in of the tower


def tile_features(tiles: np.ndarray) -> np.ndarray:
    """[n, 3, S, S] -> [n * 16, 5]: a fixed random projection per patch (tile-major, patch row-major)."""
    projection = np.random.default_rng(42).standard_normal((3 * PATCH * PATCH, 5))
    patches = tiles.reshape(len(tiles), 3, 4, PATCH, 4, PATCH).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(len(tiles) * 16, 3 * PATCH * PATCH) @ projection


NEWLINE = np.arange(5.0) + 100


def apply_taps(index: np.ndarray, weight: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Token vectors [T, 5] of taps over `[features of tiles; newline]`."""
    rows = np.concatenate([tile_features(tiles), NEWLINE[None]])
    return (weight[..., None] * rows[index]).sum(axis=1)


# ------------------------------------------------------------------ data


def png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_dataset(root) -> list[dict]:
    """Single images of many sizes, multi-image samples, text-only ones, an 8-frame and a 12-frame video
    (folders of frames) and a video file; every question unique so a sample is known by its tokens."""
    records = []
    for i, (h, w) in enumerate(SIZES):
        (root / f"{i}.png").write_bytes(png(h, w, i))
        records.append({"id": f"one-{i}", "image": f"{i}.png", "conversations": turns(
            f"Sample {i}: what is it? <image>", "a picture of noise " * (i % 3 + 1))})
    for i in range(4):
        images = [f"{(i + k) % len(SIZES)}.png" for k in range(2 + i % 2)]
        question = "".join(f"Image {k}: <image>\n" for k in range(len(images))) + f"Compare them, case {i}."
        records.append({"id": f"multi-{i}", "image": images, "conversations": turns(question, "They differ.")})
    records.append({"id": "text", "conversations": turns("Just text, no picture?", "Yes.")})
    for name, frames in (("clip8", 8), ("clip12", 12)):
        (root / name).mkdir()
        for f in range(frames):
            (root / name / f"{f:03d}.png").write_bytes(png(30, 44, 100 + f))
        records.append({"id": name, "video": name, "conversations": turns(f"<image>\nWhat happens in {name}?",
                                                                          "Noise flickers.")})
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from transformers import AutoTokenizer

    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.data.tokenize import add_image_token
    from tests.conftest import LLAMA2_TOKENIZER

    if not (LLAMA2_TOKENIZER / "tokenizer.model").exists():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2_TOKENIZER}")
    root = tmp_path_factory.mktemp("anyres")
    (root / "data.json").write_text(json.dumps(write_dataset(root)))
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    image_token_id = add_image_token(tokenizer)
    source = LlavaJsonSource(root / "data.json", root, video_frames=9)
    return source, tokenizer, image_token_id


def config(source, image_token_id, **overrides) -> PipelineConfig:
    settings = dict(sources=(source,), template="v1", max_length=200, global_batch_size=3, seed=1, num_epochs=1,
                    image_config=IMAGE_CONFIG, image_token_id=image_token_id, max_images_per_sample=3,
                    anyres=LAYOUTS, max_tiles_per_row=8, read_threads=1, report_every=0)
    return PipelineConfig(**(settings | overrides))


def own_examples(source, tokenizer, cfg) -> dict[bytes, dict]:
    """input_ids bytes -> the processor's example of every usable sample."""
    processor, out = default_sample_processor(cfg, tokenizer), {}
    for i in range(len(source)):
        try:
            example = processor(source[i])
        except BadSample as e:
            assert (source[i]["id"], e.reason) == ("clip12", "too_many_tiles")
            continue
        out[example["input_ids"].tobytes()] = example
    return out


def check_segment(row: dict, positions: np.ndarray, example: dict, image_token_id: int) -> None:
    """The row's tokens at `positions` are the example's; its taps over the row's slots give the vectors
    the example's own taps give over its own tiles."""
    np.testing.assert_array_equal(row["input_ids"][positions], example["input_ids"])
    slots = row["pixel_values"]
    got = apply_taps(row["image_taps_index"][positions], row["image_taps_weight"][positions], slots)
    want = apply_taps(example["image_taps_index"], example["image_taps_weight"], example["pixel_values"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    image_tokens = example["image_taps_weight"].any(axis=1)
    assert image_tokens.sum() == (example["input_ids"] == image_token_id).sum()


def rows_of(batches):
    for batch in batches:
        for r in range(len(batch["input_ids"])):
            yield {k: v[r] for k, v in batch.items()}


# ------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("packing", ["none", "first_fit"])
def test_pipeline_rows_apply_each_samples_own_taps(dataset, packing):
    """A finite pass sees every usable sample once (single images, 2-3 image samples, an 8-frame video, text);
    the 12-frame video (9 tiles > 8 slots) is skipped and counted; the budgets hold; each sample's image tokens,
    through the row's taps and tile slots, equal its own taps over its own tiles."""
    source, tokenizer, image_token_id = dataset
    cfg = config(source, image_token_id, packing=packing, pack_length=200)
    examples = own_examples(source, tokenizer, cfg)
    iterator = make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    batches = list(iterator)
    assert iterator.bad_sample_counts() == {"too_many_tiles": 1}
    seen = []
    for row in rows_of(batches):
        assert row["pixel_values"].shape == (8, 3, S, S) and row["image_taps_index"].shape[-1] == TAPS
        assert row["image_mask"].sum() <= 8 and not row["pixel_values"][~row["image_mask"]].any()
        segments = row["segment_ids"] if packing != "none" else row["attention_mask"]
        for segment in np.unique(segments[segments > 0]):
            positions = np.flatnonzero(segments == segment)
            example = examples[row["input_ids"][positions].tobytes()]
            check_segment(row, positions, example, image_token_id)
            seen.append(example["id"])
        assert not row["image_taps_weight"][segments == 0].any()
    assert sorted(seen) == sorted(e["id"] for e in examples.values()) and len(seen) == len(source) - 1
    if packing != "none":
        assert max(int(r["segment_ids"].max()) for r in rows_of(batches)) > 1  # rows do hold several samples


def test_samples_tiles_tokens_and_video(dataset):
    """The processor's tiles are `data.anyres`'s, counts are the layouts' (multi-image: one tile + newline
    each); a video's `<image>` expands to the video token when one is set, its 8 frames one tile each."""
    from llava_jax.data.anyres import PixelNorm, image_tiles
    from llava_jax.data.images import load_image

    source, tokenizer, image_token_id = dataset
    records = {source[i]["id"]: source[i] for i in range(len(source))}
    processor = default_sample_processor(config(source, image_token_id), tokenizer)
    one = processor(records["one-5"])
    image = load_image(records["one-5"]["images"][0])
    norm = PixelNorm(IMAGE_CONFIG.mean, IMAGE_CONFIG.std)
    np.testing.assert_array_equal(one["pixel_values"], image_tiles(image, IMAGE, norm))
    assert (one["input_ids"] == image_token_id).sum() == IMAGE.num_tokens((333, 91))
    multi = processor(records["multi-1"])
    assert len(multi["pixel_values"]) == 3 and (multi["input_ids"] == image_token_id).sum() == 3 * 17
    video_config = config(source, image_token_id, anyres=AnyResLayouts(IMAGE, MULTI, VIDEO, video_token_id=5))
    video = default_sample_processor(video_config, tokenizer)(records["clip8"])
    assert video["pixel_values"].shape == (8, 3, S, S) and (video["input_ids"] == image_token_id).sum() == 0
    assert (video["input_ids"] == 5).sum() == VIDEO.num_video_tokens(8) == 33
    with pytest.raises(BadSample, match="no video layout"):
        default_sample_processor(config(source, image_token_id, anyres=AnyResLayouts(IMAGE)), tokenizer)(
            records["clip8"])


def test_collate_moves_taps_to_the_rows_slots():
    """Unit check of collate's remapping: a newline tap goes to P * tile_tokens, feature taps stay in slot 0."""
    index = np.array([[0, 0, 0, 0], [17, 3, 0, 0], [32, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    weight = np.array([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    example = {"input_ids": np.array([1, 2, 2, 3], np.int32), "labels": np.array([1, 2, 2, 3], np.int32),
               "pixel_values": np.ones((2, 3, S, S), np.float32), "image_taps_index": index,
               "image_taps_weight": weight}
    batch = collate([example], buckets=(6,), pad_token_id=0, max_images=5, image_size=S, tile_tokens=16)
    np.testing.assert_array_equal(batch["image_taps_index"][0, :4, :2], [[0, 0], [17, 3], [80, 0], [0, 0]])
    assert batch["image_mask"].tolist() == [[True, True, False, False, False]]


def test_pipeline_config_checks():
    source = [0]
    with pytest.raises(ValueError, match="max_tiles_per_row is an AnyRes option"):
        PipelineConfig(sources=source, max_tiles_per_row=4)
    with pytest.raises(ValueError, match="image_config: crop_size 336"):
        PipelineConfig(sources=source, anyres=LAYOUTS)
    cfg = PipelineConfig(sources=source, anyres=LAYOUTS, image_config=IMAGE_CONFIG, max_images_per_sample=3)
    assert (cfg.max_tiles_per_row, cfg.image_slots, cfg.tile_tokens) == (9, 9, 16)
    # Packed AnyRes rows count tile slots: more images a sample than max_images_per_row is fine there.
    packed = dict(packing="best_fit", pack_length=64, max_length=64, max_images_per_sample=3, max_images_per_row=1)
    assert PipelineConfig(sources=source, anyres=LAYOUTS, image_config=IMAGE_CONFIG, **packed).image_slots == 9
    with pytest.raises(ValueError, match="max_images_per_row \\(1\\) >= max_images_per_sample \\(3\\)"):
        PipelineConfig(sources=source, **packed)


def test_tokenize_per_image_counts(llama2_tokenizer_dir):
    from transformers import AutoTokenizer

    from llava_jax.data.conversation import get_template
    from llava_jax.data.tokenize import add_image_token, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    image_id = add_image_token(tokenizer)
    conversation = turns("<image> and <image>: alike?", "No.")
    kwargs = dict(image_token_id=image_id, max_length=100, sample_id="s")
    per_image = tokenize_conversation(conversation, tokenizer, get_template("v1"), image_seq_length=[3, 5], **kwargs)
    same = tokenize_conversation(conversation, tokenizer, get_template("v1"), image_seq_length=4, **kwargs)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], per_image.input_ids == image_id, [0]])))
    assert (np.diff(runs)[::2]).tolist() == [3, 5] and len(per_image.input_ids) == len(same.input_ids)
    np.testing.assert_array_equal(per_image.labels[-5:], same.labels[-5:])
    with pytest.raises(BadSample, match="1 images but 2") as error:
        tokenize_conversation(conversation, tokenizer, get_template("v1"), image_seq_length=[3], **kwargs)
    assert error.value.reason == "image_count_mismatch"


def test_two_processes_pack_disjoint_samples_and_yield_as_many_batches(dataset):
    source, tokenizer, image_token_id = dataset
    cfg = config(source, image_token_id, packing="best_fit", pack_length=200, global_batch_size=4)
    examples = own_examples(source, tokenizer, cfg)
    seen, counts = [], []
    for process in range(2):
        batches = list(make_train_iterator(cfg, tokenizer, process_index=process, process_count=2))
        counts.append(len(batches))
        for row in rows_of(batches):
            for segment in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
                positions = np.flatnonzero(row["segment_ids"] == segment)
                example = examples[row["input_ids"][positions].tobytes()]
                check_segment(row, positions, example, image_token_id)
                seen.append(example["id"])
    assert counts[0] == counts[1] and sorted(seen) == sorted(e["id"] for e in examples.values())


def test_llava_next_image_placement(llama2_tokenizer_dir):
    """LLaVA-NeXT moves a turn's single `<image>` to the front unless the turn starts with it; LLaVA-1.5 always
    moves it (then "\\n"); several stay in place under both."""
    from transformers import AutoTokenizer

    from llava_jax.data.conversation import get_template
    from llava_jax.data.tokenize import add_image_token, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    kwargs = dict(image_token_id=add_image_token(tokenizer), image_seq_length=2, max_length=100)

    def ids(question: str, placement: str) -> list[int]:
        return tokenize_conversation(turns(question, "Yes."), tokenizer, get_template("v1"), **kwargs,
                                     image_placement=placement).input_ids.tolist()

    assert ids("Look <image>", "next") == ids("Look <image>", "llava") == ids("<image>\nLook", "next")
    assert ids("<image>Look", "llava") == ids("<image>\nLook", "llava") != ids("<image>Look", "next")
    assert ids("A <image> B <image>", "next") == ids("A <image> B <image>", "llava")
    with pytest.raises(ValueError, match="image_placement"):
        ids("Look <image>", "v2")


def test_source_reads_video_files_and_frame_folders(tmp_path):
    pytest.importorskip("av")
    from llava_jax.data.sources import LlavaJsonSource
    from tests.data.test_video import encode_video, frame_numbers, numbered_frames

    (tmp_path / "clip.mp4").write_bytes(encode_video(numbered_frames(20)))
    (tmp_path / "frames").mkdir()
    for f in range(20):
        Image.fromarray(numbered_frames(20)[f]).save(tmp_path / "frames" / f"{f:03d}.png")
    records = [{"id": name, "video": name, "conversations": turns("<image>\nWhat?", "Grey.")}
               for name in ("clip.mp4", "frames", "../escape.mp4")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    source = LlavaJsonSource(tmp_path / "data.json", tmp_path, video_frames=8)
    expected = np.linspace(0, 19, 8, dtype=int).tolist()
    for i in (0, 1):
        record = source[i]
        assert record["images"] == [] and record["video"].shape == (8, 32, 48, 3)
        assert frame_numbers(record["video"]) == expected
    with pytest.raises(BadSample) as error:
        source[2]
    assert error.value.reason == "unsafe_path"
    assert source.lengths()[0] > 0  # a video sample is multimodal for modality grouping


def test_layouts_for_the_model_configs():
    """LLaVA-NeXT: every image "anyres", no video; OneVision: anyres_max_9, single + newline for several, video
    token; the layouts count what the models' own host functions (`llava_next.image_taps`) count."""
    from llava_jax.models import llava_next

    next_config, ov_config = llava_next.LlavaNextConfig(), llava_next.LlavaOnevisionConfig()
    nxt, ov = AnyResLayouts.for_model(next_config), AnyResLayouts.for_model(ov_config, video_frames=16)
    assert (nxt.multi_image, nxt.video, nxt.image.max_tiles, nxt.tile_tokens) == (None, None, 0, 576)
    assert (ov.image.max_tiles, ov.multi_image.kind, ov.multi_image.newline) == (9, "single", True)
    assert (ov.video.kind, ov.video_frames, ov.video_token_id) == ("video", 16, ov_config.video_token_index)
    sizes = [(333, 500), (1000, 200), (64, 64)]
    for config, layouts in ((next_config, nxt), (ov_config, ov)):
        index, weight, tiles = llava_next.image_taps(config, sizes)
        own = [layouts.image.taps(size) for size in sizes]
        assert tiles == [layouts.image.num_tiles(size) for size in sizes]
        want_index, want_weight = concat_taps(own, tiles, layouts.tile_tokens)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_array_equal(weight, want_weight)
