"""LLaVA-NeXT and LLaVA-OneVision logits against transformers (fp32, <= 1e-4 relative), on prompts built by
transformers' own processors: odd image sizes over 3 grid pinpoints, two images in one message, a video of 8
frames; and the refusals of configs we cannot honour."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import transformers

import llava_jax.convert as convert
from llava_jax.models import llava_next
from tests.models import anyres_helpers as H


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("next")
    hf = H.save(transformers.LlavaNextForConditionalGeneration, H.next_config(), path)
    return hf, convert.from_hf(path, dtype="float32")


@pytest.fixture(scope="module")
def onevision_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("onevision")
    hf = H.save(transformers.LlavaOnevisionForConditionalGeneration, H.onevision_config(), path, seed=1)
    return hf, convert.from_hf(path, dtype="float32")


def test_next_two_odd_images_in_one_prompt(next_pair):
    hf, ours = next_pair
    sizes = [(31, 77), (77, 31)]  # wide -> [30, 60], tall -> [60, 30]: rows / columns unpadded
    inputs = H.next_processor()(images=H.images(*sizes), text="USER: <image>\nWhat and <image>\nwhy? ASSISTANT:",
                                return_tensors="np")
    assert isinstance(ours, llava_next.LlavaNextForConditionalGeneration)
    assert (inputs["input_ids"] == H.IMAGE_ID).sum() == len(llava_next.image_taps(ours.config, sizes)[0])
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf, inputs))


def test_next_left_padded_batch_of_two_rows(next_pair):
    """Two rows, one image each of a different size (so different token counts): image k of the batch
    fills the k-th group of image tokens, padding masked."""
    hf, ours = next_pair
    processor = H.next_processor()
    processor.tokenizer = copy.deepcopy(processor.tokenizer)  # the shared tokenizer stays unpadded
    processor.tokenizer.pad_token, processor.tokenizer.padding_side = "<unk>", "left"
    inputs = processor(images=H.images((31, 77), (45, 47)), text=["<image>\nA b c d e f g?", "Hi <image>\nx"],
                       padding=True, return_tensors="np")
    assert (inputs["attention_mask"] == 0).any()
    valid = inputs["attention_mask"].astype(bool)
    H.assert_close(H.our_logits(ours, inputs)[valid], H.torch_logits(hf, inputs)[valid])


def test_next_square_image_uses_the_largest_pinpoint(next_pair):
    hf, ours = next_pair
    inputs = H.next_processor()(images=H.images((45, 47)), text="<image>\nDescribe.", return_tensors="np")
    assert llava_next.image_tiles(ours.config, (45, 47)) == 5  # base + 2x2 grid of [60, 60]
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf, inputs))


def test_onevision_downsampled_image_and_video_in_one_prompt(onevision_pair):
    hf, ours = onevision_pair
    n_video = H.video_token_count(8)
    assert n_video == 8 * 3 * 3 + 1  # 5x5 patches pooled to 3x3 per frame, one newline
    text = "<|im_start|>user <image>\nand " + "<video>" * n_video + " compare<|im_end|>"
    inputs = H.onevision_inputs([H.images((50, 57))], text)
    inputs["pixel_values_videos"] = H.video()
    index, weight, _ = llava_next.image_taps(ours.config, [(50, 57)])
    assert ((weight > 0) & (weight < 1)).any()  # anyres_max_1 really downsamples this 10x10 grid
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf, inputs))


def test_onevision_two_images_in_one_message_are_single_tiles(onevision_pair):
    hf, ours = onevision_pair
    inputs = H.onevision_inputs([H.images((23, 61), (61, 23))], "<image><image>\nSame?")
    assert list(inputs["batch_num_images"]) == [2]
    assert (inputs["input_ids"] == H.IMAGE_ID).sum() == 2 * (25 + 1)
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf, inputs))


def test_next_feature_layer_list_concatenates_layers(tmp_path):
    hf = H.save(transformers.LlavaNextForConditionalGeneration, H.next_config(vision_feature_layer=[-3, -1]), tmp_path)
    ours = convert.from_hf(tmp_path, dtype="float32")
    assert ours.config.vision_feature_layer == (-3, -1) and ours.config.vision_feature_dim == 2 * 48
    inputs = H.next_processor()(images=H.images((17, 88)), text="<image>\nWhat?", return_tensors="np")
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf, inputs))


def test_token_count_mismatch_is_a_clear_error(next_pair):
    _, ours = next_pair
    inputs = H.next_processor()(images=H.images((31, 77)), text="<image>\nHi", return_tensors="np")
    ids = np.concatenate([inputs["input_ids"], [[H.IMAGE_ID]]], axis=1)
    index, weight, tiles = llava_next.image_taps(ours.config, [(31, 77)])
    pix = np.asarray(inputs["pixel_values"])[0, :tiles[0]]
    with pytest.raises(ValueError, match=f"hold {len(index) + 1} image tokens"):
        ours.embed_inputs(ids, pix, (index, weight))


def test_configs_we_cannot_honour_are_refused():
    base = llava_next.LlavaOnevisionConfig()
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        dataclasses.replace(base, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        dataclasses.replace(base, vision_aspect_ratio="anyres_max_x")
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        llava_next.LlavaNextConfig(image_grid_pinpoints=((336,),))
    with pytest.raises(ValueError, match="image_grid_pinpoints .* multiples of the vision tower's image_size 336"):
        llava_next.LlavaNextConfig(image_grid_pinpoints=((336, 600),))
    with pytest.raises(ValueError, match="batch_num_images"):
        llava_next.image_taps(llava_next.LlavaNextConfig(), [(10, 10)], batch_num_images=[1])


def test_onevision_greedy_generation_with_image_and_video_equals_transformers(onevision_pair):
    """Prefill (image + video merged through the taps) then one-token steps on our KV cache."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    hf, ours = onevision_pair
    inputs = H.onevision_inputs([H.images((40, 33))], "<image>\nand " + "<video>" * H.video_token_count(8) + " so")
    inputs["pixel_values_videos"] = H.video(seed=4)
    ids, steps = inputs["input_ids"], 12
    index, weight, tiles = llava_next.image_taps(ours.config, inputs["image_sizes"].tolist(), [1])
    pix = jnp.asarray(inputs["pixel_values"][0, :tiles[0]])
    vids, vtaps = jnp.asarray(inputs["pixel_values_videos"][0]), llava_next.video_taps(ours.config, [8])
    graphdef, params = nnx.split(ours)
    prefill = jax.jit(lambda p, c, i, x, t, v, vt: nnx.merge(graphdef, p).decode(
        c, i, x, None, t, pixel_values_videos=v, video_taps=vt))
    step = jax.jit(lambda p, c, i: nnx.merge(graphdef, p).decode(c, i))
    logits, cache = prefill(params, ours.init_cache(1, ids.shape[1] + steps), jnp.asarray(ids), pix,
                            (jnp.asarray(index), jnp.asarray(weight)), vids, tuple(map(jnp.asarray, vtaps)))
    out = []
    for _ in range(steps):
        out.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = step(params, cache, jnp.asarray([[out[-1]]]))
    with torch.no_grad():
        ref = hf.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, pad_token_id=0)
    ref = ref[0, ids.shape[1]:].tolist()
    assert out == ref and len(set(ref)) > 3
