"""SigLIP vision tower parity against transformers' SiglipVisionModel (PyTorch, CPU, float32)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llava_jax.convert import hf_siglip
from llava_jax.data import images
from llava_jax.infer import loading
from llava_jax.models import clip_vit, siglip
from llava_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel
from tests.models.test_clip import assert_close, loaded_model, pixels

TINY = dict(hidden_size=48, intermediate_size=97, num_hidden_layers=3, num_attention_heads=3, patch_size=6)


def torch_siglip(image_size: int, seed: int = 0, **kw) -> transformers.SiglipVisionModel:
    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(**{**TINY, **kw}, image_size=image_size)
    model = transformers.SiglipVisionModel(config)
    with torch.no_grad():  # non-trivial norms and biases so that a missing or swapped one shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def ours_from(hf_model, **runtime) -> SiglipVisionModel:
    cfg = hf_siglip.siglip_config_from_hf(hf_model.config, **runtime)
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return loaded_model(lambda: SiglipVisionModel(cfg), hf_siglip.siglip_tensors_to_ours(tensors), "tiny SigLIP")


# 30 px: 5 x 5 whole patches; 32 px: 5 x 5 patches and 2 unused pixel rows / columns (384 at patch 14).
@pytest.mark.parametrize("image_size,scan", [(30, True), (32, False)])
def test_hidden_states_and_post_layernorm_output_match_transformers(image_size, scan):
    hf = torch_siglip(image_size)  # vision_use_head=True: its tensors are skipped
    assert any(k.startswith("head.") for k in hf.state_dict())
    ours = ours_from(hf, scan_layers=scan)
    px = pixels(2, image_size)
    with torch.no_grad():
        ref = hf(torch.from_numpy(px), output_hidden_states=True)
    assert len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    ours_hs = ours.hidden_states(jnp.asarray(px), list(range(len(ref.hidden_states))))
    for i, (h, r) in enumerate(zip(ours_hs, ref.hidden_states)):
        assert h.shape == r.shape == (2, 25, 48), i  # no class token
        assert_close(h, r)
    assert_close(ours.hidden_states(jnp.asarray(px), [-2])[0], ref.hidden_states[-2])
    last = ours(jnp.asarray(px))
    assert_close(last, ref.last_hidden_state)
    assert np.abs(np.asarray(last) - ref.hidden_states[-1].numpy()).max() > 1e-2  # post_layernorm applied


def test_features_and_token_counts_follow_the_strategy():
    hf = torch_siglip(30)
    ours = ours_from(hf)
    px = pixels(3, 30, seed=1)
    with torch.no_grad():
        hs = hf(torch.from_numpy(px), output_hidden_states=True).hidden_states
    full = ours.features(jnp.asarray(px), -2, "full")
    assert full.shape == (3, ours.num_tokens("full"), 48) and ours.num_tokens("full") == 25
    assert_close(full, hs[-2])
    default = ours.features(jnp.asarray(px), (-1, 0), "default")  # transformers' LLaVA drops token 0
    assert default.shape == (3, ours.num_tokens("default"), 96) and ours.num_tokens("default") == 24
    assert_close(default, torch.cat([hs[-1][:, 1:], hs[0][:, 1:]], dim=-1))


def test_config_preset_interface_and_refusals():
    so400m = siglip.PRESETS["siglip_so400m_p14_384"]
    assert (so400m.hidden_size, so400m.num_hidden_layers, so400m.intermediate_size) == (1152, 27, 4304)
    assert so400m.num_patches == so400m.num_tokens("full") == 729
    assert SiglipVisionConfig.image_mean == SiglipVisionConfig.image_std == (0.5, 0.5, 0.5)
    # CLIP's constants live on its tower config; the data floor (no jax) keeps an equal default
    clip = clip_vit.CLIPVisionConfig
    assert clip.image_mean == images.CLIP_MEAN and clip.image_std == images.CLIP_STD
    assert clip_vit.PRESETS["clip_l14_336"].num_tokens("default") == 576
    assert clip_vit.PRESETS["clip_l14_336"].num_tokens("full") == 577
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        so400m.num_tokens("cls")
    # preprocessing reads the tower's size and normalization; CLIP-336's is the LLaVA-1.5 default
    assert images.ImageConfig.for_tower(clip_vit.PRESETS["clip_l14_336"]) == images.ImageConfig()
    siglip_images = images.ImageConfig(size=384, crop_size=384, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert images.ImageConfig.for_tower(so400m) == siglip_images
    assert loading._image_config(Path("/nonexistent"), so400m) == siglip_images  # a folder without processor
    with pytest.raises(ValueError, match="SiglipVisionConfig: unsupported hidden_act 'relu'"):
        SiglipVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="siglip config: hidden_act 'relu'"):
        hf_siglip.siglip_config_from_hf({"model_type": "siglip_vision_model", "hidden_act": "relu"})
    with pytest.raises(ValueError, match="siglip config: image_size"):
        hf_siglip.siglip_config_from_hf({"model_type": "siglip_vision_model", "image_size": [224, 448]})
    with pytest.raises(ValueError, match="unsupported model_type 'clip_vision_model'"):
        hf_siglip.siglip_config_from_hf({"model_type": "clip_vision_model"})


def test_tensor_names_skip_the_head_and_the_text_tower():
    rename = hf_siglip.siglip_tensor_name_to_ours
    assert rename("encoder.layers.2.mlp.fc1.weight") == "vision_model.encoder.layers.2.mlp.fc1.weight"
    assert rename("vision_model.post_layernorm.bias") == "vision_model.post_layernorm.bias"
    for skipped in ("head.probe", "vision_model.head.attention.in_proj_weight", "text_model.head.weight",
                    "logit_scale", "logit_bias", "vision_model.embeddings.position_ids"):
        assert rename(skipped) is None, skipped
    with pytest.raises(ValueError, match="'pre_layrnorm.weight' is not a SigLIP vision tower tensor"):
        rename("pre_layrnorm.weight")
