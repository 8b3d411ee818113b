"""Projectors against transformers' LlavaMultiModalProjector and the official LLaVA build_vision_projector."""

import importlib.util
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_jax.convert.params import load_state_dict, state_dict
from llava_jax.models.projector import Projector

D_VISION, D_TEXT = 47, 61


def official_builder():
    """The official `llava/model/multimodal_projector/builder.py`, loaded alone (it only needs torch)."""
    spec = importlib.util.find_spec("llava")
    if spec is None:
        pytest.skip("llava-torch is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model" / "multimodal_projector" / "builder.py"
    module_spec = importlib.util.spec_from_file_location("official_llava_projector_builder", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.build_vision_projector


def features(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 5, D_VISION)).astype(np.float32)


def run_ours(kind, torch_tensors, *, use_bias=True, seed=0):
    proj = Projector(kind, D_VISION, D_TEXT, use_bias=use_bias)
    load_state_dict(proj, torch_tensors, source=kind)
    return np.asarray(proj(jnp.asarray(features(seed))))


def official_tensors_to_ours(module: torch.nn.Module, kind: str) -> dict:
    """Official names: `weight` (linear) or Sequential indices `0`, `2`, `4`... -> `linear_1`, `linear_2`, ..."""
    out = {}
    for name, value in module.state_dict().items():
        if kind == "linear":
            name = "linear_1." + name
        else:
            index, leaf = name.split(".")
            name = f"linear_{int(index) // 2 + 1}.{leaf}"
        out[name] = value.numpy()
    return out


@pytest.mark.parametrize("use_bias", [True, False])
def test_mlp2x_gelu_equals_transformers_projector(use_bias):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=D_VISION, num_attention_heads=1),
        text_config=dict(model_type="llama", hidden_size=D_TEXT, num_attention_heads=1, head_dim=2),
        multimodal_projector_bias=use_bias)
    ref = LlavaMultiModalProjector(cfg).eval()
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(tensors) == set(state_dict(Projector("mlp2x_gelu", D_VISION, D_TEXT, use_bias=use_bias)))
    with torch.no_grad():
        expected = ref(torch.from_numpy(features())).numpy()
    np.testing.assert_allclose(run_ours("mlp2x_gelu", tensors, use_bias=use_bias), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_equals_official_build_vision_projector(kind):
    torch.manual_seed(1)
    config = types.SimpleNamespace(mm_projector_type=kind, mm_hidden_size=D_VISION, hidden_size=D_TEXT)
    ref = official_builder()(config).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(features(seed=2))).numpy()
    got = run_ours(kind, official_tensors_to_ours(ref, kind), seed=2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_gelu_is_exact_not_tanh():
    # Large pre-activations make erf and tanh GELU differ clearly; the official nn.GELU() is exact.
    torch.manual_seed(3)
    ref = official_builder()(types.SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=D_VISION,
                                                   hidden_size=D_TEXT)).eval()
    x = 3 * features(seed=4)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
        tanh_version = ref[2](torch.nn.functional.gelu(ref[0](torch.from_numpy(x)), approximate="tanh")).numpy()
    assert np.abs(tanh_version - expected).max() > 1e-4
    proj = Projector("mlp2x_gelu", D_VISION, D_TEXT)
    load_state_dict(proj, official_tensors_to_ours(ref, "mlp2x_gelu"))
    np.testing.assert_allclose(np.asarray(proj(jnp.asarray(x))), expected, atol=1e-4)


def test_identity_and_errors():
    x = features()
    identity = Projector("identity", D_VISION, D_VISION)
    assert state_dict(identity) == {}
    np.testing.assert_array_equal(np.asarray(identity(jnp.asarray(x))), x)
    with pytest.raises(ValueError, match="identity projector.*47.*61"):
        Projector("identity", D_VISION, D_TEXT)
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        Projector("mlp2x_relu", D_VISION, D_TEXT)
