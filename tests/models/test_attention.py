"""Attention kernels against the XLA path (forward and gradients, with packed segments), packed rows against
the same samples run alone, and the remat policies against no remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models import attention, layers
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM


def qkv(b=2, t=100, n=4, kv=2, d=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, d)), jax.random.normal(keys[1], (b, t, kv, d)),
            jax.random.normal(keys[2], (b, t, kv, d)))


def packed_segments(b, t, lengths_per_row):
    """segment ids [b, t]: row r holds samples of the given lengths, then padding (0)."""
    seg = np.zeros((b, t), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths):
            seg[row, start:start + n] = i + 1
            start += n
    return jnp.asarray(seg)


def grads(impl, q, k, v, seg, causal):
    def loss(q, k, v):
        out = attention.attention(q, k, v, segment_ids=seg, causal=causal, impl=impl)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(jnp.where((seg > 0)[:, :, None, None], out * weights, 0.0)), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


def test_xla_segments_equal_each_sample_alone():
    q, k, v = qkv()
    seg = packed_segments(2, 100, [[30, 50], [70]])
    out = attention.attention(q, k, v, segment_ids=seg, causal=True, impl="xla")
    for row, start, stop in ((0, 0, 30), (0, 30, 80), (1, 0, 70)):
        alone = attention.attention(q[row:row + 1, start:stop], k[row:row + 1, start:stop],
                                    v[row:row + 1, start:stop], causal=True, impl="xla")
        np.testing.assert_allclose(out[row, start:stop], alone[0], rtol=1e-5, atol=1e-5)


def test_positions_restart_per_segment():
    seg = packed_segments(1, 8, [[3, 4]])
    np.testing.assert_array_equal(attention.positions_from_segments(seg), [[0, 1, 2, 0, 1, 2, 3, 0]])


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_equals_xla(causal):
    """The Pallas TPU kernel (interpret mode on CPU), grouped-query heads, a length that is not a multiple of
    the kernel's 128 block, packed segments: forward and gradients equal the XLA path."""
    q, k, v = qkv()
    seg = packed_segments(2, 100, [[30, 50], [70, 25]])
    (loss_x, out_x), grads_x = grads("xla", q, k, v, seg, causal)
    (loss_s, out_s), grads_s = grads("splash", q, k, v, seg, causal)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
    for a, b in zip(grads_s, grads_x):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_equals_xla():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(t=128, d=64))
    seg = packed_segments(2, 128, [[30, 50], [70, 58]])
    (_, out_x), grads_x = grads("xla", q, k, v, seg, True)
    (_, out_c), grads_c = grads("cudnn", q, k, v, seg, True)
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2)
    for a, b in zip(grads_c, grads_x):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        LlamaConfig(attention_impl="flash")


TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def test_packed_row_logits_equal_each_sample_alone():
    model = LlamaForCausalLM(TINY, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (1, 40), 0, 97)
    seg = packed_segments(1, 40, [[15, 20]])
    packed = model(ids, segment_ids=seg)
    for start, stop in ((0, 15), (15, 35)):
        np.testing.assert_allclose(packed[0, start:stop], model(ids[:, start:stop])[0], rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def remat_loss_and_grads(remat):
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 97)
    model = LlamaForCausalLM(dataclasses.replace(TINY, remat=remat), nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", [p for p in layers.REMAT_POLICIES if p != "none"])
def test_remat_policy_same_loss_and_gradients(policy):
    (l0, g0), (l1, g1) = remat_loss_and_grads("none"), remat_loss_and_grads(policy)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from llava_jax import sharding
from llava_jax.models import attention
from tests.models.test_attention import packed_segments, qkv

mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
q, k, v = qkv(b=4, t=100)
seg = packed_segments(4, 100, [[30, 50], [70], [100], [10, 10, 10]])
reference = attention.attention(q, k, v, segment_ids=seg, impl="xla")
with jax.set_mesh(mesh):
    spec = sharding.logical_to_spec(("batch", None, "heads", None))
    put = lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s))
    args = [put(x, spec) for x in (q, k, v)] + [put(seg, jax.sharding.PartitionSpec(spec[0], None))]
    out = jax.jit(lambda q, k, v, s: attention.attention(q, k, v, segment_ids=s, impl="splash"))(*args)
real = np.asarray(seg > 0)
print("max_error", float(np.abs(np.asarray(out) - np.asarray(reference))[real].max()))
"""


def test_splash_runs_per_shard_in_a_mesh():
    """On 8 devices (data 2 x fsdp 2 x tensor 2) the kernel runs per batch / head shard and equals XLA."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, timeout=600, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("max_error")[1]) < 2e-5
