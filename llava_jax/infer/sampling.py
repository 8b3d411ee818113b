"""Next-token choice: greedy, or temperature, then top-k, then top-p (transformers' order and rules), drawn with
`jax.random.categorical` from an explicit key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """transformers' warpers in their order: logits / temperature, top-k, then top-p (nucleus).

    logits float32 [B, V]; temperature > 0; top_k int (0 = off; ties with the k-th value are kept);
    top_p in (0, 1] (1 = off; the smallest set of most likely tokens whose mass reaches top_p, at least one).
    Returns [B, V] with the removed tokens at -inf.
    """
    logits = logits / temperature
    descending = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    kth = jnp.take(descending, jnp.clip(top_k, 1, vocab) - 1, axis=-1)[..., None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    descending = jnp.where((top_k > 0) & (descending < kth), -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V], exclusive
    kept = (mass_before < top_p) | (jnp.arange(vocab) == 0)
    # The smallest kept value in descending order is the threshold.
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); otherwise sampled after `filter_logits`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.float32(max(self.temperature, 1e-6)), jnp.int32(self.top_k), jnp.float32(self.top_p))


def next_token(logits: jax.Array, key: jax.Array, params: tuple, greedy: bool) -> jax.Array:
    """logits float32 [B, V] -> token ids int32 [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, *params), axis=-1).astype(jnp.int32)


__all__ = ["Sampling", "filter_logits", "next_token"]
