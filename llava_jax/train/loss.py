"""Next-token cross entropy without a [B, T, V] logits tensor.

The output head runs on chunks of `chunk` positions at a time inside a `jax.lax.scan`, each chunk under
`jax.checkpoint`: the forward pass keeps only each chunk's scalar loss, the backward pass recomputes one
chunk's float32 logits [B, chunk, V] at a time. The largest logits buffer is then B x chunk x V instead of
B x T x V (for LLaVA-1.5 at 2048 tokens and chunk 512: 4x less; the backward pass holds one chunk too).

Targets are the labels shifted by one; a target is counted when it is not IGNORE_INDEX and, in packed rows,
when it lies in the same segment as the position that predicts it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llava_jax.data.tokenize import IGNORE_INDEX


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reference on full logits: logits [B, T, V], labels [B, T] (unshifted) -> (sum over tokens, count)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)


def target_mask(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B, T-1]: position t's next-token target labels[:, t+1] is supervised (and in t's segment)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if segment_ids is not None:
        mask &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return mask


def chunked_cross_entropy(hidden: jax.Array, labels: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], *,
                          segment_ids: jax.Array | None = None, chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] (after the final norm), labels [B, T] (unshifted), logits_fn: [B, C, D] -> float32
    logits [B, C, V]. Returns (sum of the supervised tokens' losses, their count)."""
    mask = target_mask(labels, segment_ids)
    targets = jnp.where(mask, labels[:, 1:], 0)
    h = hidden[:, :-1]
    b, t, d = h.shape
    chunk = max(1, min(chunk, t))
    pad = -t % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    to_chunks = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h_c, target_c, mask_c):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits_fn(h_c).astype(jnp.float32), target_c)
        return jnp.sum(jnp.where(mask_c, losses, 0.0))

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (to_chunks(h), to_chunks(targets), to_chunks(mask)))
    return total, jnp.sum(mask)
