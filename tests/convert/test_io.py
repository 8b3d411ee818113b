"""Checkpoint IO: streaming reads, sharded writes, dtypes, our format, and errors naming file and tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import llava_jax.convert as convert
from llava_jax.convert import checkpoint_io
from llava_jax.convert.params import state_dict
from tests.conftest import REPO_ROOT
from tests.convert import helpers


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_bf16")
    model = helpers.save_tiny_llama(path, dtype=torch.bfloat16)
    return path, model


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def test_write_plans_shards_and_index_that_reader_reads_back(tmp_path):
    rng = np.random.RandomState(0)
    tensors = {f"t{i}": rng.randn(7, 13 + i).astype(np.float32) for i in range(5)}
    tensors["big"] = rng.randn(31, 37).astype(ml_dtypes.bfloat16)
    specs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in tensors.items()}
    limit = 1000
    files = checkpoint_io.write_safetensors({n: (lambda v=v: v) for n, v in tensors.items()}, specs, tmp_path,
                                 max_shard_size=limit)
    index = json.loads((tmp_path / checkpoint_io.SAFE_INDEX).read_text())
    sizes = {n: v.nbytes for n, v in tensors.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(tensors)
    shard_bytes = {}
    for name, file in index["weight_map"].items():
        shard_bytes.setdefault(file, []).append(sizes[name])
    # Every shard fits the limit except a tensor larger than it, which sits alone.
    assert all(sum(b) <= limit or len(b) == 1 for b in shard_bytes.values())
    assert len(files) == len(shard_bytes) + 1
    reader = checkpoint_io.CheckpointReader(tmp_path)
    for name, value in tensors.items():
        got = reader.get(name)
        assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_single_file_has_no_index(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    checkpoint_io.write_safetensors({"x": lambda: x}, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype)}, tmp_path)
    assert not (tmp_path / checkpoint_io.SAFE_INDEX).exists()
    assert np.array_equal(checkpoint_io.CheckpointReader(tmp_path / checkpoint_io.SAFE_WEIGHTS).get("x"), x)


def test_parse_size():
    assert checkpoint_io.parse_size("5GB") == 5 * 10**9
    assert checkpoint_io.parse_size("100KiB") == 100 * 1024
    assert checkpoint_io.parse_size(123) == 123
    with pytest.raises(ValueError, match="max shard size"):
        checkpoint_io.parse_size("lots")


def test_pytorch_bin_reads_bf16_bits(tmp_path):
    weights = {"a": torch.randn(5, 3).to(torch.bfloat16), "b": torch.randn(7)}
    torch.save(weights, tmp_path / checkpoint_io.TORCH_WEIGHTS)
    reader = checkpoint_io.CheckpointReader(tmp_path)
    a = reader.get("a")
    assert a.dtype == ml_dtypes.bfloat16 and reader.dtype("a") == ml_dtypes.bfloat16
    assert np.array_equal(a.view(np.int16), _bits(weights["a"]))
    assert np.array_equal(reader.get("b"), weights["b"].numpy())


def test_bf16_checkpoint_stays_bf16_and_dtype_casts(llama_bf16):
    path, hf = llama_bf16
    model = convert.from_hf(path)
    assert model.config.param_dtype == jnp.bfloat16 and model.config.dtype == jnp.bfloat16
    ours = state_dict(model)
    for name, tensor in hf.state_dict().items():
        assert ours[name].dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(ours[name].view(np.int16), _bits(tensor)), name
    upcast = state_dict(convert.from_hf(path, dtype=jnp.float32))
    for name, tensor in hf.state_dict().items():
        assert upcast[name].dtype == np.float32
        assert np.array_equal(upcast[name], tensor.float().numpy()), name


def test_our_format_round_trip(llama_bf16, tmp_path):
    model = convert.from_hf(llama_bf16[0])
    convert.save(model, tmp_path / "ours")
    back = convert.load(tmp_path / "ours")
    assert back.config == model.config
    a, b = state_dict(model), state_dict(back)
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.int16), b[k].view(np.int16)) for k in a)
    f32 = state_dict(convert.load(tmp_path / "ours", param_dtype=jnp.float32))
    assert all(f32[k].dtype == np.float32 and np.array_equal(f32[k], a[k].astype(np.float32)) for k in a)


# ------------------------------------------------------------------------------------------------- errors


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no weights found"):
        checkpoint_io.CheckpointReader(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert.from_hf(tmp_path)


def test_unknown_architecture_names_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode",
                                                      "architectures": ["GPTBigCodeModel"]}))
    with pytest.raises(convert.CheckpointError, match=r"config\.json.*gpt_bigcode"):
        convert.from_hf(tmp_path)


def test_missing_shard_names_index_and_tensor(llama_bf16, tmp_path):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / checkpoint_io.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*model\.norm\.weight"):
        checkpoint_io.CheckpointReader(tmp_path)


def test_truncated_file_names_file_and_tensor(tmp_path):
    save_file({"first": np.ones((64,), np.float32), "second": np.ones((300,), np.float32)},
              str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-200])
    with pytest.raises(convert.CheckpointError, match=r"model\.safetensors.*truncated.*'second'"):
        checkpoint_io.CheckpointReader(tmp_path)


def _copy_with(src, dst, edit):
    """Copies a single-file checkpoint, applying edit(dict of tensors) on the way."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    reader = checkpoint_io.CheckpointReader(src)
    tensors = {n: reader.get(n) for n in reader.names()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_shape_mismatch_names_file_and_tensor(llama_bf16, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _copy_with(llama_bf16[0], tmp_path / "bad", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(convert.CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \(96, 56\)"):
        convert.from_hf(tmp_path / "bad")


def test_missing_and_unexpected_tensors(llama_bf16, tmp_path):
    _copy_with(llama_bf16[0], tmp_path / "missing", lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(convert.CheckpointError, match=r"missing.*model\.layers\.2\.self_attn\.k_proj\.weight"):
        convert.from_hf(tmp_path / "missing")
    _copy_with(llama_bf16[0], tmp_path / "extra",
               lambda t: t.update({"model.layers.0.extra.weight": t["model.norm.weight"]}))
    with pytest.raises(convert.CheckpointError, match=r"extra.*unexpected.*model\.layers\.0\.extra\.weight"):
        convert.from_hf(tmp_path / "extra")


def test_llama_export_loads_in_transformers_bitwise(llama_bf16, tmp_path):
    path, hf = llama_bf16
    out = convert.to_hf(convert.from_hf(path), tmp_path / "out", max_shard_size="40KB")
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (out / checkpoint_io.SAFE_INDEX).is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in hf.state_dict().items():
        got = reloaded.state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(_bits_t(got), _bits_t(tensor)), name


def _bits_t(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


SHARDED_LOAD = """
import sys, numpy as np, jax
import llava_jax.convert as convert
from llava_jax.convert.params import state_dict
from llava_jax.sharding import make_mesh
src, ours = sys.argv[1], sys.argv[2]
mesh = make_mesh(data=1, fsdp=2, tensor=2)
reference = state_dict(convert.load(ours))
for model in (convert.from_hf(src, mesh=mesh), convert.load(ours, mesh=mesh)):
    q = model.model.layers.self_attn.q_proj.weight.get_value()  # [layers, heads, embed]
    assert tuple(q.sharding.spec) == (None, "tensor", "fsdp"), q.sharding
    assert q.addressable_shards[0].data.shape == (3, 28, 28)
    # mlp 97 does not divide by 2, so it stays replicated; embed 56 splits over fsdp.
    up = model.model.layers.mlp.up_proj.weight.get_value()
    assert up.addressable_shards[0].data.shape == (3, 97, 28), up.sharding
    got = state_dict(model)
    assert all(np.array_equal(got[k].view(np.int16), reference[k].view(np.int16)) for k in reference)
print("ok")
"""


def test_import_onto_a_mesh_places_each_leaf_sharded(llama_bf16, tmp_path):
    """4 CPU devices (fsdp 2 x tensor 2): leaves arrive in their logical-axis shardings with equal values."""
    convert.save(convert.from_hf(llama_bf16[0]), tmp_path / "ours")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(llama_bf16[0]), str(tmp_path / "ours")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
