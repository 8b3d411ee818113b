"""LLaVA from a CLIP checkpoint + a LLaMA checkpoint with a fresh projector (the start of stage 1)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llava_jax.convert as convert
from llava_jax.convert.hf_clip import clip_tensor_name_to_ours
from llava_jax.convert.params import state_dict
from llava_jax.models.clip_vit import CLIPVisionModel
from llava_jax.models.llava import LlavaForConditionalGeneration
from tests.convert import helpers

EMBED_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_llm")
    return {"clip": (root / "clip", helpers.save_tiny_clip(root / "clip")),
            "clip_full": (root / "clip_full", helpers.save_tiny_clip(root / "clip_full", full=True)),
            "llm": (root / "llm", helpers.save_tiny_llama(root / "llm"))}


def _vision_state(hf_model) -> dict[str, np.ndarray]:
    """Our names of the CLIP vision tensors of a CLIPVisionModel or CLIPModel."""
    out = {}
    for name, value in helpers.torch_state(hf_model).items():
        ours = clip_tensor_name_to_ours(name)
        if ours is not None:
            out["vision_tower." + ours] = value
    return out


def test_clip_vision_model_and_llama_with_fresh_projector(sources, tmp_path):
    (clip_dir, clip_hf), (llm_dir, llm_hf) = sources["clip"], sources["llm"]
    model = convert.from_clip_and_llm(clip_dir, llm_dir, projector="mlp2x_gelu", seed=3)
    cfg = model.config
    # <image> is a new token after the LLM's vocabulary; embeddings grew by one row.
    assert cfg.image_token_index == helpers.VOCAB and cfg.text.vocab_size == helpers.VOCAB + 1
    assert cfg.image_seq_length == helpers.NUM_PATCHES and cfg.vision_feature_layer == -2
    ours = state_dict(model)
    vision = _vision_state(clip_hf)
    assert len(vision) == sum(k.startswith("vision_tower.") for k in ours)
    for name, value in vision.items():
        assert np.array_equal(ours[name], value), name
    for name, value in helpers.torch_state(llm_hf).items():
        ours_name = "language_model." + name
        if ours_name in EMBED_ROWS:
            assert np.array_equal(ours[ours_name][:-1], value), name
            np.testing.assert_allclose(ours[ours_name][-1], value.mean(0), rtol=1e-6, atol=1e-7)
        else:
            assert np.array_equal(ours[ours_name], value), name
    # The projector is exactly what the model's own initializer gives for that seed (built under jit, as
    # eager construction is slow on CPU); another seed differs.
    def projector_init(seed):
        init = jax.jit(lambda: nnx.state(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(seed)).multi_modal_projector))
        return state_dict(nnx.merge(nnx.graphdef(model.multi_modal_projector), init()))

    fresh = projector_init(3)
    assert set(fresh) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    for name, value in fresh.items():
        assert np.array_equal(ours["multi_modal_projector." + name], value), name
    assert not np.array_equal(projector_init(4)["linear_1.weight"], fresh["linear_1.weight"])

    # Levanter-style check: export, load into transformers, same logits.
    out = convert.to_hf(model, tmp_path / "export")
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, pix = helpers.image_ids([5], [7, 8], cfg.image_token_index), helpers.pixels(seed=1)
    with torch.no_grad():
        ref = reloaded.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    got = helpers.forward(model, ids, pix)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_full_clip_model_uses_vision_part_only(sources):
    (clip_dir, clip_hf), (llm_dir, _) = sources["clip_full"], sources["llm"]
    model = convert.from_clip_and_llm(clip_dir, llm_dir, projector="linear", vision_feature_layer=[-2, -3],
                                      vision_feature_select_strategy="full", pad_vocab_to_multiple_of=16)
    cfg = model.config
    assert cfg.text.vocab_size == 224 and cfg.image_seq_length == helpers.NUM_PATCHES + 1
    ours = state_dict(model)
    vision = _vision_state(clip_hf)
    assert any(k.startswith("text_model.") for k in clip_hf.state_dict())
    assert {k for k in ours if k.startswith("vision_tower.")} == set(vision)
    assert all(np.array_equal(ours[k], v) for k, v in vision.items())
    # Features of two layers are concatenated: the linear projector reads 2 * 48 channels.
    assert ours["multi_modal_projector.linear_1.weight"].shape == (56, 96)
    assert "multi_modal_projector.linear_2.weight" not in ours
    # A full CLIP checkpoint also imports on its own as a CLIPVisionModel.
    tower = convert.from_hf(clip_dir)
    assert isinstance(tower, CLIPVisionModel)
    assert all(np.array_equal(v, vision["vision_tower." + k]) for k, v in state_dict(tower).items())
