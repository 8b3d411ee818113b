"""Generator against transformers' `generate` (PyTorch, CPU) on a tiny random LLaVA, and its own contracts."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from llava_jax.convert import from_hf
from llava_jax.data.synthetic import build_tokenizer
from llava_jax.infer import generate as gen_lib
from llava_jax.infer.generate import Generator, bucket_length, filter_logits

IMAGE_ID, EOS, PAD = 4, 2, 3  # the demo tokenizer's <image>, </s> and <pad>
IMAGE_SIZE, PATCH = 30, 6
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 25
MAX_NEW = 14


def save_tiny_llava(path, seed: int = 0, max_positions: int = 2048):
    """A tiny random transformers LLaVA + the demo tokenizer + a CLIP image processor, saved to `path`.

    Returns the transformers model (float32, eval)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tokenizer(path / "tokenizer_src"))
    vision = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=97, num_hidden_layers=3,
                  num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=60, intermediate_size=97,
                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                      image_seq_length=NUM_PATCHES)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a sharper output distribution: greedy paths that are not one repeated token
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our Generator over the imported model, model folder)."""
    path = tmp_path_factory.mktemp("tiny_llava")
    hf = save_tiny_llava(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return hf, Generator(from_hf(path), tokenizer, template="llava_v1"), path


def ids_row(rng, *parts):
    """Token ids: ints are text lengths, 'img' one image (NUM_PATCHES image tokens)."""
    return np.concatenate([[1]] + [np.full(NUM_PATCHES, IMAGE_ID) if p == "img" else rng.integers(5, 180, p)
                                   for p in parts]).astype(np.int64)


def pixels(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def reference_generate(hf, rows, px, **kw):
    """transformers' generate on left-padded rows -> new tokens per row, cut after the first EOS."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if px is not None:
        inputs["pixel_values"] = torch.from_numpy(px)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                          **kw)[:, width:].numpy()
    return [row[:int(np.argmax(row == EOS)) + 1] if (row == EOS).any() else row for row in out]


def assert_same_tokens(ours, ref):
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        np.testing.assert_array_equal(o, r)


def test_greedy_single_prompt_with_image_equals_transformers(tiny):
    hf, gen, _ = tiny
    row, px = ids_row(np.random.default_rng(0), 6, "img", 9), pixels(1, 0)
    ours = gen.generate_tokens([row], [[px[0]]], max_new_tokens=MAX_NEW)
    assert_same_tokens(ours, reference_generate(hf, [row], px))
    assert len(set(ours[0].tolist())) > 3  # a real sequence, not one repeated token


def test_greedy_padded_batch_with_images_equals_transformers(tiny):
    hf, gen, _ = tiny
    rng = np.random.default_rng(1)
    rows = [ids_row(rng, 5, "img", 7), ids_row(rng, "img", 3, "img", 2), ids_row(rng, 12)]
    px = pixels(3, 1)
    ours = gen.generate_tokens(rows, [[px[0]], [px[1], px[2]], []], max_new_tokens=MAX_NEW)
    ref = reference_generate(hf, rows, px)
    assert_same_tokens(ours, ref)
    assert max(len(r) for r in ref) > 5


def test_generator_decodes_from_per_layer_buffers_and_leaves_the_model_stacked(tiny):
    """The one decode layout: per-layer weight buffers (logical axes without `layers`); the stacked model given
    to Generator is left as it was, and a model already in that layout is used as it is."""
    hf, gen, _ = tiny
    layers = gen.state["language_model"]["model"]["layers"]
    assert len(layers) == 2
    assert layers[0]["self_attn"]["q_proj"]["weight"].get_metadata()["out_sharding"] == ("heads", "embed")
    stacked = from_hf(tiny[2])
    assert stacked.language_model.model.layers.self_attn.q_proj.weight.shape[0] == 2
    fast = Generator(stacked, gen.tokenizer, template="llava_v1")
    assert stacked.language_model.model.layers.self_attn.q_proj.weight.shape[0] == 2  # still stacked
    assert gen_lib.decoding_layout(fast.model) is fast.model
    rng = np.random.default_rng(1)
    rows = [ids_row(rng, 5, "img", 7), ids_row(rng, "img", 3, "img", 2), ids_row(rng, 12)]
    px = pixels(3, 1)
    ours = fast.generate_tokens(rows, [[px[0]], [px[1], px[2]], []], max_new_tokens=MAX_NEW)
    assert_same_tokens(ours, reference_generate(hf, rows, px))


def test_string_prompts_and_images_go_through_the_official_paths(tiny):
    """String prompts: the official model_vqa prompt + tokenizer_image_token, CLIP pixels of the image
    processor saved with the model; the answer equals transformers' on those inputs."""
    from tests.data import official_llava

    hf, gen, path = tiny
    conversation = official_llava.conversation_module()
    import llava.mm_utils as mm_utils

    question = "What color is the shape?\nAnswer the question using a single word or phrase."
    prompt = gen.prompt(question, num_images=1)
    assert prompt == official_llava.official_prompt("llava_v1", ["<image>\n" + question, None])
    assert conversation.conv_templates["llava_v1"].sep2 == "</s>"
    official = mm_utils.tokenizer_image_token(prompt, gen.tokenizer, image_token_index=-200)
    expanded = np.concatenate([[IMAGE_ID] * NUM_PATCHES if t == -200 else [t] for t in official])
    np.testing.assert_array_equal(gen.encode(prompt), expanded)

    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (36, 30, 3), np.uint8))
    ours = gen.generate([prompt], [[image]], max_new_tokens=MAX_NEW, stop=[])
    square = Image.new("RGB", (36, 36), gen.image_config.background)
    square.paste(image, (3, 0))  # the official expand2square, then the CLIP processor
    ref_px = transformers.CLIPImageProcessor.from_pretrained(path)(images=[square], return_tensors="np")
    ref = reference_generate(hf, [expanded], ref_px["pixel_values"].astype(np.float32))
    assert ours == [gen.tokenizer.decode(ref[0][ref[0] != EOS], skip_special_tokens=True)]


def test_filter_logits_equals_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = np.random.default_rng(3).normal(size=(4, 97)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 11, 1.0), (0.9, 0, 0.8), (1.0, 23, 0.6), (0.5, 5, 0.3)]:
        ref = torch.from_numpy(logits)
        ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = np.asarray(filter_logits(logits, np.float32(temperature), np.int32(top_k), np.float32(top_p)))
        ref = ref.numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=str((temperature, top_k, top_p)))
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)
        assert 0 < np.isfinite(ours).sum() < logits.size or (top_k == 0 and top_p == 1)


def test_sampling_is_reproducible_and_depends_on_the_key(tiny):
    _, gen, _ = tiny
    row, px = ids_row(np.random.default_rng(0), 6, "img", 9), pixels(1, 0)
    sample = functools.partial(gen.generate_tokens, [row], [[px[0]]], max_new_tokens=MAX_NEW, temperature=1.5,
                               top_p=0.95)
    first, again, other = sample(rng=jax.random.key(1)), sample(rng=jax.random.key(1)), sample(rng=jax.random.key(2))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    # top_k=1 keeps only the argmax: sampling gives the greedy answer.
    greedy = gen.generate_tokens([row], [[px[0]]], max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(sample(rng=jax.random.key(3), top_k=1)[0], greedy[0])


def test_stop_strings_cut_the_text_and_end_decoding(tiny):
    _, gen, _ = tiny
    row = ids_row(np.random.default_rng(1), 12)
    full_ids = gen.generate_tokens([row], max_new_tokens=MAX_NEW)[0]
    full = gen.text_of(full_ids)
    words = [gen.tokenizer.decode([t]) for t in full_ids[3:] if t not in (EOS, IMAGE_ID)]
    stop = next(w for w in words if len(w.strip()) > 2).strip()
    text = gen.generate([row], max_new_tokens=MAX_NEW, stop=[stop])[0]
    assert text == full[:full.index(stop)]
    stopped = gen.generate_tokens([row], max_new_tokens=MAX_NEW, stop=[stop])[0]
    # Decoding ended at the first token whose text completes the stop string.
    first = next(k for k in range(1, len(full_ids) + 1) if stop in gen.tokenizer.decode(full_ids[:k]))
    assert first < len(full_ids)
    np.testing.assert_array_equal(stopped, full_ids[:first])


def test_streaming_gives_the_same_text_piece_by_piece(tiny):
    _, gen, _ = tiny
    rng = np.random.default_rng(1)
    rows = [ids_row(rng, 5, "img", 7), ids_row(rng, 12)]
    px = pixels(2, 5)
    expected = gen.generate(rows, [[px[0]], []], max_new_tokens=MAX_NEW, stop=[])
    pieces: dict[int, list[str]] = {0: [], 1: []}
    streamed = gen.generate(rows, [[px[0]], []], max_new_tokens=MAX_NEW, stop=[],
                            stream=lambda r, piece: pieces[r].append(piece))
    assert streamed == expected
    assert ["".join(pieces[r]) for r in (0, 1)] == expected
    assert max(len(p) for p in pieces.values()) > 2  # delivered in several pieces


def test_prompt_lengths_share_compiled_programs(tiny):
    _, gen, _ = tiny
    assert [bucket_length(n) for n in (1, 16, 17, 200, 256, 257, 640, 641)] == [16, 16, 32, 256, 256, 384, 640, 768]
    rng = np.random.default_rng(4)
    gen.generate_tokens([ids_row(rng, 20)], max_new_tokens=MAX_NEW)
    compiled = gen_lib._prefill._cache_size()
    for length in (18, 25, 30):  # all in the 32 bucket
        gen.generate_tokens([ids_row(rng, length)], max_new_tokens=MAX_NEW)
    assert gen_lib._prefill._cache_size() == compiled


def test_bad_inputs_name_the_prompt(tiny, tmp_path):
    _, gen, _ = tiny
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=r"prompt 1 has 1 <image> placeholder\(s\) but 0 image\(s\)"):
        gen.generate_tokens([ids_row(rng, 4), ids_row(rng, "img", 2)], [[], []])
    with pytest.raises(ValueError, match="prompt 0, image 0: pixel values of shape"):
        gen.generate_tokens([ids_row(rng, "img", 2)], [[np.zeros((3, 8, 8))]])
    short = Generator(from_hf(tmp_path_factory_model(tmp_path)), gen.tokenizer)
    with pytest.raises(ValueError, match=r"prompt 0 has 40 tokens \(1 image\(s\) of 25\), longer than the "
                                         r"model's context of 32 tokens"):
        short.generate_tokens([ids_row(rng, "img", 14)], [[pixels(1, 0)[0]]])


def tmp_path_factory_model(path):
    save_tiny_llava(path, max_positions=32)
    return path


def test_text_only_causal_lm_padded_batch_equals_transformers(tmp_path):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=56, intermediate_size=73, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                      eos_token_id=EOS, pad_token_id=PAD)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(tmp_path)
    gen = Generator(from_hf(tmp_path), None, eos_token_ids=[EOS])
    rng = np.random.default_rng(8)
    rows = [np.concatenate([[1], rng.integers(5, 97, n)]) for n in (3, 11)]
    assert_same_tokens(gen.generate_tokens(rows, max_new_tokens=MAX_NEW), reference_generate(hf, rows, None))
