"""SigLIP: transformers -> import -> export -> transformers again, for the tower alone and inside LLaVA."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import llava_jax.convert as convert
from llava_jax.convert import checkpoint_io, families, hf_llava, hf_siglip
from llava_jax.convert.params import state_dict
from llava_jax.models.llava import LlavaConfig
from llava_jax.models.siglip import SiglipVisionModel
from tests.convert import helpers

IMAGE = helpers.VOCAB - 1


def siglip_config(**kw) -> transformers.SiglipVisionConfig:
    return transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=97, num_hidden_layers=3,
                                           num_attention_heads=3, image_size=helpers.IMAGE_SIZE,
                                           patch_size=helpers.PATCH, **kw)


def _perturbed(model):
    """Non-trivial norms and biases (transformers initializes them to 1 and 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _hidden(model, pix):
    with torch.no_grad():
        out = model(torch.from_numpy(pix), output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def _close(ours, ref):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """(source dir, transformers SiglipVisionModel with its head, our model, export dir)."""
    root = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(4)
    hf = _perturbed(transformers.SiglipVisionModel(siglip_config(vision_use_head=True)))
    hf.save_pretrained(root / "hf")
    model = convert.from_hf(root / "hf")
    return root / "hf", hf, model, convert.to_hf(model, root / "export")


def test_tower_import_matches_transformers_and_skips_the_head(tower):
    src, hf, model, _ = tower
    assert isinstance(model, SiglipVisionModel) and families.of_model(model) is families.SIGLIP
    names = checkpoint_io.CheckpointReader(src).names()
    assert any(".head." in n or n.startswith("head.") for n in names)
    assert not any(".head." in k for k in state_dict(model))
    pix = helpers.pixels(2)
    last, hidden = _hidden(hf, pix)
    _close(model(jnp.asarray(pix)), last)
    for ours, ref in zip(model.hidden_states(jnp.asarray(pix), range(len(hidden))), hidden):
        _close(ours, ref)


def test_tower_export_loads_in_transformers_without_head(tower):
    src, hf, model, out = tower
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model" and config["vision_use_head"] is False
    assert config["architectures"] == ["SiglipVisionModel"]
    reloaded, info = transformers.SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pix = helpers.pixels(1, seed=5)
    (last, hidden), (ref_last, ref_hidden) = _hidden(reloaded.eval(), pix), _hidden(hf, pix)
    assert np.array_equal(last, ref_last) and all(np.array_equal(a, b) for a, b in zip(hidden, ref_hidden))
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    assert (processor.size["height"], processor.size["width"]) == (helpers.IMAGE_SIZE,) * 2
    # our format keeps the SigLIP config and parameters too
    again = convert.load(convert.save(model, out.parent / "native"))
    assert again.config == model.config
    a, b = state_dict(model), state_dict(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_full_siglip_model_imports_the_vision_part(tmp_path):
    torch.manual_seed(6)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                max_position_embeddings=16)
    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=siglip_config().to_dict(),
                                                              text_config=text)).eval()
    full.save_pretrained(tmp_path)
    model = convert.from_hf(tmp_path)
    pix = helpers.pixels(1, seed=7)
    last, _ = _hidden(full.vision_model, pix)
    _close(model(jnp.asarray(pix)), last)


def test_siglip_tower_and_llama_make_a_stage1_llava(tower, tmp_path):
    src, hf, _, _ = tower
    llm = helpers.save_tiny_llama(tmp_path / "llm")
    model = convert.from_clip_and_llm(src, tmp_path / "llm", vision_feature_select_strategy="full")
    assert isinstance(model.vision_tower, SiglipVisionModel)
    assert model.config.image_seq_length == helpers.NUM_PATCHES  # no CLS: "full" is every patch
    ours = state_dict(model)
    vision = {"vision_tower." + hf_siglip.siglip_tensor_name_to_ours(k): v.numpy()
              for k, v in hf.state_dict().items() if hf_siglip.siglip_tensor_name_to_ours(k)}
    assert set(vision) == {k for k in ours if k.startswith("vision_tower.")}
    assert all(np.array_equal(ours[k], v) for k, v in vision.items())
    assert np.array_equal(ours["language_model.model.norm.weight"], llm.state_dict()["model.norm.weight"].numpy())
    with pytest.raises(checkpoint_io.CheckpointError, match="is not a vision tower"):
        convert.from_clip_and_llm(tmp_path / "llm", tmp_path / "llm")


def _llava_config(strategy: str, layer) -> transformers.LlavaConfig:
    tokens = helpers.NUM_PATCHES - (strategy == "default")  # no CLS: "default" drops the first patch
    return transformers.LlavaConfig(vision_config=siglip_config(), text_config=helpers.llama_config(),
                                    image_token_index=IMAGE, image_seq_length=tokens, vision_feature_layer=layer,
                                    vision_feature_select_strategy=strategy)


def test_llava_refuses_a_tower_it_cannot_build():
    config = _llava_config("full", -2).to_dict()
    config["vision_config"] = {**config["vision_config"], "model_type": "dinov2"}
    with pytest.raises(ValueError, match="vision_config: unsupported model_type 'dinov2'"):
        hf_llava.llava_config_from_hf(config)
    config["vision_config"] = {**siglip_config().to_dict(), "hidden_act": "relu"}
    with pytest.raises(ValueError, match="siglip config: hidden_act 'relu'"):
        hf_llava.llava_config_from_hf(config)
    with pytest.raises(TypeError, match="LlavaConfig.vision: expected a CLIPVisionConfig or SiglipVisionConfig"):
        LlavaConfig(vision=helpers.llama_config())


def _logits(model, ids, pix):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()


def _ids(tokens: int) -> np.ndarray:
    return np.array([[5] + [IMAGE] * tokens + [7, 8]])


@pytest.mark.parametrize("strategy,layer", [("full", -2), ("default", [-1, 0])])
def test_llava_with_a_siglip_tower_matches_transformers(tmp_path, strategy, layer):
    torch.manual_seed(8)
    hf = _perturbed(transformers.LlavaForConditionalGeneration(_llava_config(strategy, layer)))
    hf.save_pretrained(tmp_path / "hf")
    assert any(".head." in n for n in checkpoint_io.CheckpointReader(tmp_path / "hf").names())  # skipped
    model = convert.from_hf(tmp_path / "hf")
    assert isinstance(model.vision_tower, SiglipVisionModel)
    assert model.config.image_seq_length == model.vision_tower.num_tokens(strategy) == hf.config.image_seq_length
    ids, pix = _ids(model.config.image_seq_length), helpers.pixels()
    ref = _logits(hf, ids, pix)
    np.testing.assert_allclose(helpers.forward(model, ids, pix), ref, atol=1e-4 * np.abs(ref).max())


def test_llava_siglip_export_loads_in_transformers_with_its_processor(tmp_path):
    torch.manual_seed(9)
    hf = _perturbed(transformers.LlavaForConditionalGeneration(_llava_config("full", -2)))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer = helpers.save_tiny_tokenizer(tmp_path / "tok", size=IMAGE)
    model = convert.from_hf(tmp_path / "hf")
    out = convert.to_hf(model, tmp_path / "export", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = transformers.AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (41, 37, 3), dtype=np.uint8))
    inputs = processor(images=image, text="w5 <image> w7 w8", return_tensors="np")
    assert (inputs["input_ids"] == IMAGE).sum() == helpers.NUM_PATCHES == model.config.image_seq_length
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    ref = _logits(reloaded.eval(), inputs["input_ids"], inputs["pixel_values"])
    ours = helpers.forward(model, inputs["input_ids"], inputs["pixel_values"])
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())
