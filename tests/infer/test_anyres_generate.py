"""Generator on AnyRes models: greedy output equals transformers `generate` on tiny random LLaVA-NeXT (CLIP + LLaMA)
and LLaVA-OneVision (SigLIP "full" + Qwen2) folders opened by `load_model`: two images of odd sizes in one message,
a OneVision 8-frame video; the batch's tiles are bucketed and warm_up compiles what requests then run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_jax.infer import decoding, media
from llava_jax.infer.generate import Generator, Video, load_model
from tests.infer import anyres_models as M
from tests.models import anyres_helpers as H

STEPS = 10


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("next") / "llava-next-tiny"
    hf = M.save_next(path)
    model, tokenizer, image_config, _ = load_model(path, dtype="float32")
    return hf, Generator(model, tokenizer, image_config=image_config)


@pytest.fixture(scope="module")
def onevision_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "llava-onevision-tiny"
    hf = M.save_onevision(path)
    model, tokenizer, image_config, template = load_model(path, dtype="float32")
    assert template == "qwen_1_5" and image_config.mean == (0.5, 0.5, 0.5)
    gen = Generator(model, tokenizer, image_config=image_config)
    gen.folder = path
    return hf, gen


def _reference(hf, ids: np.ndarray, **inputs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids[None]), **{k: torch.as_tensor(v) for k, v in inputs.items()},
                          max_new_tokens=STEPS, do_sample=False, pad_token_id=0, eos_token_id=2)
    return out[0, len(ids):].tolist()


def test_next_two_odd_images_in_one_message_equal_transformers(next_model):
    hf, gen = next_model
    images = H.images((31, 77), (45, 47), seed=5)
    prompt = "USER: <image>\nWhat and <image>\nwhy? ASSISTANT:"
    ours = gen.generate_tokens([prompt], [images], max_new_tokens=STEPS)[0].tolist()
    ids = gen.encode(prompt, gen.prepare_media(images))
    processed = H.next_processor().image_processor(images, return_tensors="np")  # transformers' own pixels
    assert (ids == H.IMAGE_ID).sum() == sum(m.num_tokens for m in gen.prepare_media(images))
    ref = _reference(hf, ids, pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"])
    assert ours == ref
    assert gen.generate_tokens([prompt], [images[::-1]], max_new_tokens=STEPS)[0].tolist() != ours  # images matter


def test_onevision_two_images_and_a_video_equal_transformers(onevision_model):
    """Two odd-size images in one message (single tiles, as batch_num_images=2) and an 8-frame video."""
    hf, gen = onevision_model
    images, video = H.images((23, 61), (61, 23), seed=6), M.frames(8)
    prompt = "<|im_start|>user <image><image>\nSame? <video> and?<|im_end|><|im_start|>assistant\n"
    items = [images[0], images[1], Video(video)]
    ours = gen.generate_tokens([prompt], [items], max_new_tokens=STEPS)[0].tolist()
    prepared = gen.prepare_media(items)
    assert [len(m.pixels) for m in prepared] == [1, 1, 8]  # single-tile images, one tile per frame
    ids = gen.encode(prompt, prepared)
    assert (ids == H.VIDEO_ID).sum() == H.video_token_count(8)
    processed = M.onevision_image_processor()([images], return_tensors="np")
    ref = _reference(hf, ids, pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
                     batch_num_images=np.asarray([2]), pixel_values_videos=M.video_pixels(video))
    assert ours == ref
    swapped = [images[1], images[0], Video(video)]
    assert gen.generate_tokens([prompt], [swapped], max_new_tokens=STEPS)[0].tolist() != ours


@pytest.mark.slow
def test_onevision_one_anyres_image_equals_transformers(onevision_model):
    hf, gen = onevision_model
    image = H.images((50, 57), seed=7)
    prompt = "<|im_start|>user <image>\nDescribe.<|im_end|><|im_start|>assistant\n"
    ours = gen.generate_tokens([prompt], [image], max_new_tokens=STEPS)[0].tolist()
    assert len(gen.prepare_media(image)[0].pixels) == 5  # base + 2x2 grid, downsampled by anyres_max_1
    processed = M.onevision_image_processor()([image], return_tensors="np")
    ref = _reference(hf, gen.encode(prompt, gen.prepare_media(image)), pixel_values=processed["pixel_values"],
                     image_sizes=processed["image_sizes"], batch_num_images=np.asarray([1]))
    assert ours == ref


def test_batch_rows_equal_single_prompts_and_tiles_are_bucketed(next_model):
    """Two rows with different image sizes (so tile and token counts) decode as each alone; 3 + 5 tiles pad to 8."""
    _, gen = next_model
    prompts = ["USER: <image>\nA? ASSISTANT:", "USER: Hi <image>\nB c d? ASSISTANT:"]
    images = [H.images((31, 77), seed=1), H.images((45, 47), seed=2)]
    batch = gen.make_batch(prompts, images)
    assert batch.pixels.shape[0] == 8 and batch.vision["image_taps"][0].shape[0] == media.taps_rows(gen.model.config,
                                                                                                      8)
    together = gen.generate(prompts, images, max_new_tokens=6)
    assert together == [gen.generate([p], [i], max_new_tokens=6)[0] for p, i in zip(prompts, images)]


@pytest.mark.slow
def test_warm_up_compiles_what_requests_run(next_model):
    _, gen = next_model
    gen.warm_up(rows=(1,), images=(0, 1), max_new_tokens=8, max_prompt_tokens=120)
    before = decoding.prefill._cache_size()
    gen.generate(["USER: <image>\nA? ASSISTANT:"], [H.images((31, 77), seed=3)], max_new_tokens=8)
    wide = H.images((40, 60), seed=3)  # 5 tiles (bucket 8), its prompt within the 128 bucket
    batch = gen.make_batch(["USER: <image>\nA? ASSISTANT:"], [wide])
    assert batch.pixels.shape[0] == 8 and batch.ids.shape[1] == 128
    gen.generate(["USER: <image>\nA? ASSISTANT:"], [wide], max_new_tokens=8)
    gen.generate(["USER: no image ASSISTANT:"], None, max_new_tokens=8)
    assert decoding.prefill._cache_size() == before


def test_placeholder_and_media_mismatches_are_clear_errors(next_model, onevision_model):
    _, gen = next_model
    with pytest.raises(ValueError, match="prompt 0: the prompt has 2 <image> placeholder"):
        gen.make_batch(["<image> and <image>"], [H.images((31, 77))])
    with pytest.raises(ValueError, match="videos need a LLaVA-OneVision model"):
        gen.make_batch(["<image>"], [[Video(M.frames(2))]])
    _, ov = onevision_model
    with pytest.raises(ValueError, match="1 <video> placeholder.* 0 video"):
        ov.make_batch(["<video> x"], [[]])


@pytest.mark.slow
def test_onevision_from_our_format_and_a_training_workdir(onevision_model, tmp_path):
    """Our format (model.json + Orbax, the tokenizer copied, no preprocessor file: the tower's normalization) and
    a workdir standing for its export answer as the Hugging Face folder does."""
    import json
    import shutil

    from llava_jax import convert

    _, gen = onevision_model
    ours = tmp_path / "ours"
    convert.save(convert.from_hf(gen.folder, dtype="float32"), ours)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gen.folder / name, ours / name)
    model, tokenizer, image_config, _ = load_model(ours)
    assert image_config.mean == (0.5, 0.5, 0.5) and image_config.size == H.TILE
    prompt, images = "<|im_start|>user <image>\nWhat?<|im_end|>", [H.images((37, 52), seed=11)]
    expected = gen.generate_tokens([prompt], images, max_new_tokens=6)[0]
    got = Generator(model, tokenizer, image_config=image_config).generate_tokens([prompt], images, max_new_tokens=6)
    np.testing.assert_array_equal(got[0], expected)
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"export_hf": str(gen.folder), "data": {"template": "plain"}}))
    model, _, _, template = load_model(workdir)
    assert template == "plain" and type(model).__name__ == "LlavaOnevisionForConditionalGeneration"


def test_preprocessor_pinpoints_must_be_the_models(tmp_path, onevision_model):
    import json
    import shutil

    from llava_jax.infer.loading import ModelLoadError

    _, gen = onevision_model
    folder = tmp_path / "copy"
    shutil.copytree(gen.folder, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "image_grid_pinpoints": [[30, 90]]}))
    with pytest.raises(ModelLoadError, match="image_grid_pinpoints .* differ from the model's"):
        load_model(folder)
    resized = {**config, "size": {"shortest_edge": 60}, "crop_size": {"height": 30, "width": 30},
               "do_center_crop": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(resized))
    with pytest.raises(ModelLoadError, match="size 60 differs from the tile size"):
        load_model(folder)


@pytest.mark.slow
def test_warm_up_compiles_video_requests(onevision_model):
    _, gen = onevision_model
    gen.warm_up(rows=(1,), images=(0,), videos=(1,), video_frames=4, max_new_tokens=8, max_prompt_tokens=64)
    before = decoding.prefill._cache_size()
    for count in (4, 3):  # both pack into the 4-frame bucket
        gen.generate(["<video>\nWhat?"], [[Video(M.frames(count))]], max_new_tokens=8)
    assert decoding.prefill._cache_size() == before


def test_warm_up_refuses_videos_without_a_video_model(next_model):
    with pytest.raises(ValueError, match="videos need a LLaVA-OneVision model"):
        next_model[1].warm_up(videos=(1,))
