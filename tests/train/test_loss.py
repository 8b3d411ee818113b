"""The chunked loss equals cross entropy on full logits (value and gradients) and needs far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.train import loss


def setup(b=3, t=37, d=16, v=101, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(keys[0], (b, t, d))
    weight = 0.3 * jax.random.normal(keys[1], (v, d))
    labels = np.array(jax.random.randint(keys[2], (b, t), 0, v))
    labels[:, :5] = -100
    labels[-1, 20:] = -100
    return hidden, weight, jnp.asarray(labels)


def head(weight):
    return lambda h: jnp.einsum("...d,vd->...v", h, weight)


@pytest.mark.parametrize("chunk", [5, 36, 512])
def test_chunked_equals_full_logits_loss_and_gradients(chunk):
    hidden, weight, labels = setup()

    def full(h, w):
        total, count = loss.token_cross_entropy(head(w)(h), labels)
        return total / count

    def chunked(h, w):
        total, count = loss.chunked_cross_entropy(h, labels, head(w), chunk=chunk)
        return total / count

    (l0, g0), (l1, g1) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, weight) for f in (full, chunked))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_targets_across_a_segment_boundary_are_not_counted():
    hidden, weight, labels = setup(b=1, t=10)
    labels = jnp.arange(10)[None] + 1                 # every target supervised
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    _, count = loss.chunked_cross_entropy(hidden, labels, head(weight), segment_ids=segments, chunk=4)
    assert int(count) == 9 - 2                         # 3->4 (new sample) and 8->9 (padding) are dropped


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_needs_no_full_logits_buffer():
    """Compiler memory analysis of loss + gradient at [2, 2048] tokens x 32000 vocabulary."""
    b, t, d, v = 2, 2048, 64, 32000
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    weight = jax.ShapeDtypeStruct((v, d), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def full(h, w, y):
        return jax.grad(lambda h, w: loss.token_cross_entropy(head(w)(h), y)[0], argnums=(0, 1))(h, w)

    def chunked(h, w, y):
        return jax.grad(lambda h, w: loss.chunked_cross_entropy(h, y, head(w), chunk=512)[0], argnums=(0, 1))(h, w)

    before, after = temp_bytes(full, hidden, weight, labels), temp_bytes(chunked, hidden, weight, labels)
    logits_bytes = b * t * v * 4
    print(f"loss + gradient temporaries: full logits {before / 2**20:.0f} MiB, chunked {after / 2**20:.0f} MiB "
          f"(one f32 [B, T, V] = {logits_bytes / 2**20:.0f} MiB)")
    assert before >= logits_bytes                 # at least one f32 [B, T, V] buffer
    assert after < 4 * logits_bytes * 512 // t    # a chunk's logits and their gradient, and a little more
    assert after < before / 4
