"""CLIP vision tower parity against transformers' CLIPVisionModel (PyTorch, CPU, float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.convert import hf_clip
from llava_jax.convert.params import load_state_dict, state_dict
from llava_jax.models.clip_vit import PRESETS, CLIPVisionConfig, CLIPVisionModel

TINY = dict(hidden_size=48, intermediate_size=97, num_hidden_layers=3, num_attention_heads=3, patch_size=6)


def torch_clip(image_size: int, seed: int = 0) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, image_size=image_size))
    with torch.no_grad():  # non-trivial norms so that a missing or swapped norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def zeros_model(create):
    """The model `create()` builds, with zero parameters: built from shapes only, since an eager random
    init compiles every initializer (seconds of test time) and the tests overwrite every parameter."""
    graphdef, state = nnx.split(nnx.eval_shape(create))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


def loaded_model(create, tensors, source):
    model = zeros_model(create)
    load_state_dict(model, tensors, source=source)  # strict: every parameter is overwritten
    return model


def ours_from(hf_model, **runtime) -> CLIPVisionModel:
    cfg = hf_clip.clip_config_from_hf(hf_model.config, **runtime)
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return loaded_model(lambda: CLIPVisionModel(cfg), hf_clip.clip_tensors_to_ours(tensors), "tiny CLIP")


def assert_close(ours, ref, rel=1e-4):
    ref = np.asarray(ref)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * scale)


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("image_size", [30, 42])  # 26 and 50 positions: the 224 / 336 pattern, tiny
def test_hidden_states_last_and_pooled_match_transformers(image_size):
    hf = torch_clip(image_size)
    ours = ours_from(hf)
    px = pixels(2, image_size)
    with torch.no_grad():
        ref = hf(torch.from_numpy(px), output_hidden_states=True)
    assert len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    ours_hs = ours.hidden_states(jnp.asarray(px), list(range(len(ref.hidden_states))))
    for i, (h, r) in enumerate(zip(ours_hs, ref.hidden_states)):
        assert h.shape == r.shape == (2, (image_size // 6) ** 2 + 1, 48), i
        assert_close(h, r)
    last, pooled = ours(jnp.asarray(px))
    assert_close(last, ref.last_hidden_state)
    assert_close(pooled, ref.pooler_output)


def test_features_select_layers_and_strategy_like_transformers():
    hf = torch_clip(30)
    ours = ours_from(hf)
    px = pixels(3, 30, seed=1)
    with torch.no_grad():
        hs = hf(torch.from_numpy(px), output_hidden_states=True).hidden_states
    got = ours.features(jnp.asarray(px), -2, "default")
    assert got.shape == (3, 25, 48)
    assert_close(got, hs[-2][:, 1:])
    assert_close(ours.features(jnp.asarray(px), -2, "full"), hs[-2])
    assert_close(ours.features(jnp.asarray(px), 0, "full"), hs[0])
    got = ours.features(jnp.asarray(px), [-2, -4], "default")  # -4 = hidden_states[0], the embeddings
    assert got.shape == (3, 25, 96)
    assert_close(got, torch.cat([hs[-2][:, 1:], hs[-4][:, 1:]], dim=-1))
    with pytest.raises(ValueError, match="vision_feature_layer -5"):
        ours.features(jnp.asarray(px), -5)
    with pytest.raises(ValueError, match="strategy"):
        ours.features(jnp.asarray(px), -2, "cls")


def test_loop_and_remat_match_scan_under_jit():
    hf = torch_clip(30)
    px = jnp.asarray(pixels(2, 30, seed=2))
    outs = []
    for runtime in (dict(scan_layers=True), dict(scan_layers=False), dict(scan_layers=True, remat="full")):
        graphdef, params = nnx.split(ours_from(hf, **runtime))
        fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x, [-1, -2], "full"))
        outs.append(np.asarray(fn(params, px)))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-6)


def test_bad_pixel_shape_names_the_tensor():
    model = zeros_model(lambda: CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=30)))
    with pytest.raises(ValueError, match=r"pixel_values.*\[N, 3, 30, 30\].*\(2, 30, 30, 3\)"):
        model(jnp.zeros((2, 30, 30, 3)))


def test_state_dict_names_and_shapes_equal_transformers_classic_layout():
    hf = torch_clip(30)
    ours = state_dict(ours_from(hf))
    ref = {"vision_model." + k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == ref


def test_full_clip_checkpoint_loads_vision_tensors_only():
    torch.manual_seed(3)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=53),
        vision_config=dict(**TINY, image_size=30))).eval()
    cfg = hf_clip.clip_config_from_hf(full.config)
    assert cfg == CLIPVisionConfig(**TINY, image_size=30)
    model = loaded_model(lambda: CLIPVisionModel(cfg),
                         hf_clip.clip_tensors_to_ours({k: v.numpy() for k, v in full.state_dict().items()}),
                         "tiny CLIPModel")
    px = pixels(1, 30, seed=4)
    with torch.no_grad():
        ref = full.vision_model(torch.from_numpy(px)).last_hidden_state
    assert_close(model(jnp.asarray(px))[0], ref)
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        hf_clip.clip_tensor_name_to_ours("lm_head.weight")


def test_config_round_trip_through_transformers():
    cfg = CLIPVisionConfig(**TINY, image_size=42, layer_norm_eps=1e-6)
    hf_cfg = transformers.CLIPVisionConfig(**hf_clip.clip_config_to_hf(cfg))
    assert hf_clip.clip_config_from_hf(hf_cfg) == cfg
    assert hf_clip.clip_config_from_hf(hf_cfg.to_dict(), scan_layers=False) == dataclasses.replace(
        cfg, scan_layers=False)
    # Missing fields take transformers' defaults (ViT-B/32), not ours (ViT-L/14).
    default, got = transformers.CLIPVisionConfig(), hf_clip.clip_config_from_hf({"model_type": "clip_vision_model"})
    assert (got.hidden_size, got.patch_size, got.image_size) == (default.hidden_size, default.patch_size,
                                                                 default.image_size)
    with pytest.raises(ValueError, match="siglip_vision_model"):
        hf_clip.clip_config_from_hf({"model_type": "siglip_vision_model"})


@pytest.mark.parametrize("preset,image_size", [("clip_l14", 224), ("clip_l14_336", 336)])
def test_preset_parameter_counts_equal_transformers(preset, image_size):
    cfg = PRESETS[preset]
    assert cfg.image_size == image_size
    shapes = nnx.state(nnx.eval_shape(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_clip.clip_config_to_hf(cfg)))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert ours > 300_000_000


def test_parameters_carry_logical_axes():
    model = nnx.eval_shape(lambda: CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=30)))
    vm = model.vision_model
    assert vm.embeddings.patch_embedding.weight.get_metadata()["out_sharding"] == ("embed", None, None, None)
    assert vm.encoder.layers.self_attn.q_proj.weight.get_metadata()["out_sharding"] == ("layers", "heads", "embed")
    assert vm.encoder.layers.mlp.fc1.weight.shape == (3, 97, 48)
