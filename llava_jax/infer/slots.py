"""Decode slots for continuous batching (the JetStream / MaxText split into prefill, insert and generate).

A `Slots` state holds a fixed number N of decode slots, each with its own rows of one KV cache
[L, N, K, S, head_dim] (`KVCache` with a per-row `index` [N]: every slot writes at its own length), its last
token, sampling key, step count, temperature and top-p. Three jitted programs, all of static shapes:
- `prefill_request`: one request's prompt (left padded to a bucket P, with its images) through a fresh cache of
  P positions -> its KV with the real tokens moved to the front, their count, and its first token (the
  `decoding.prefill` computation, so a greedy answer equals `Generator`'s); or, given the KV of a shared prefix
  (the template's system prompt, computed once), only the rest of the prompt after it;
- `insert`: that KV into slot s of the `Slots` state (donated), with the request's sampling settings;
- `generate`: one decode step over all N slots, or the first few (an inactive slot's row is masked and its
  length kept).
A sampled slot draws its token t with `fold_in(its key, t)`, as `Generator` draws row tokens, so its answer
depends on its own key only, never on the other slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.infer.decoding import _decode, language_model
from llava_jax.infer.sampling import filter_logits, next_token
from llava_jax.models.llama import KVCache


@dataclasses.dataclass(frozen=True)
class SlotStatic:
    """What the slot programs specialize on besides array shapes."""

    graphdef: nnx.GraphDef
    greedy: bool  # prefill: the request decodes greedily; generate: every active slot does
    split_prefill: bool = False  # prefill all but the last column, then the last (as `decoding.Static`)
    rows: int | None = None  # generate: step only the first `rows` slots (the others are free); None: all


class Slots(NamedTuple):
    """Decode slots: cache (index int32 [N]: each slot's length); tokens int32 [N] (the last token, fed to the
    next step); keys [N] (PRNG keys); steps int32 [N] (tokens drawn so far: the next draw folds this in);
    temperature, top_p float32 [N] (temperature 0: greedy)."""

    cache: KVCache
    tokens: jax.Array
    keys: jax.Array
    steps: jax.Array
    temperature: jax.Array
    top_p: jax.Array


def empty_slots(model, num_slots: int, length: int) -> Slots:
    """N empty slots of `length` cache positions each."""
    cache = model.init_cache(num_slots, length)
    cache = cache._replace(index=jnp.zeros((num_slots,), jnp.int32))
    return Slots(cache, jnp.zeros((num_slots,), jnp.int32), jax.random.split(jax.random.key(0), num_slots),
                 jnp.zeros((num_slots,), jnp.int32), jnp.zeros((num_slots,), jnp.float32),
                 jnp.ones((num_slots,), jnp.float32))


class Prefilled(NamedTuple):
    """One prefilled request: key/value [L, 1, K, P, head_dim] (its n real tokens first), n int32 [], first
    token int32 []."""

    key: jax.Array
    value: jax.Array
    length: jax.Array
    token: jax.Array


def _fresh_cache(model, width: int, prefix: Prefilled | None) -> KVCache:
    """A one-row cache for `width` new positions, holding first the n0 tokens of `prefix` (exactly n0 real
    tokens: key [L, 1, K, n0, head_dim]) when there is one."""
    if prefix is None:
        return model.init_cache(1, width)
    n0 = prefix.key.shape[3]
    cache = model.init_cache(1, n0 + width)
    put = lambda c, kv: jax.lax.dynamic_update_slice(c, kv.astype(c.dtype), (0, 0, 0, 0, 0))
    return KVCache(put(cache.key, prefix.key), put(cache.value, prefix.value), cache.mask.at[:, :n0].set(True),
                   jnp.int32(n0))


@functools.partial(jax.jit, static_argnames=("static",))
def prefill_request(state, ids, mask, pixels, image_mask, key, sampling, prefix: Prefilled | None = None, *,
                    static: SlotStatic) -> Prefilled:
    """ids / mask int32 [1, P] (left padded), pixels [I, 3, S, S] or None -> `Prefilled` (key/value of n0 + P
    positions); the first token is drawn with fold_in(key, 0). `prefix`: the KV of the prompt's first n0 tokens
    (a shared system prompt, computed once), which `ids` continue."""
    model = nnx.merge(static.graphdef, state)
    cache = _fresh_cache(model, ids.shape[1], prefix)
    if static.split_prefill:
        _, cache = _decode(model, cache, ids[:, :-1], mask[:, :-1], pixels, image_mask)
        logits, cache = language_model(model).decode(cache, ids[:, -1:], attention_mask=mask[:, -1:])
    else:
        logits, cache = _decode(model, cache, ids, mask, pixels, image_mask)
    token = next_token(logits[:, -1], jax.random.fold_in(key, 0), sampling, static.greedy)[0]
    order = jnp.argsort(~cache.mask[0], stable=True)  # the real tokens first, in order
    front = lambda c: jnp.take(c, order, axis=3)
    return Prefilled(front(cache.key), front(cache.value), jnp.sum(cache.mask[0], dtype=jnp.int32), token)


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert(slots: Slots, slot, prefilled: Prefilled, key, temperature, top_p) -> Slots:
    """Puts a prefilled request into slot `slot` (int32 []): its KV at positions 0..P-1 (those past the slot's
    length, padding, are left out), its length, its first token (step 1 of its key), its sampling settings."""
    cache = slots.cache
    zero = jnp.zeros((), jnp.int32)
    at = (zero, jnp.asarray(slot, jnp.int32), zero, zero, zero)
    length = cache.mask.shape[1]
    fit = lambda kv, like: kv[:, :, :, :length].astype(like.dtype)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.key, fit(prefilled.key, cache.key), at),
                    jax.lax.dynamic_update_slice(cache.value, fit(prefilled.value, cache.value), at),
                    cache.mask.at[slot].set(jnp.arange(length) < prefilled.length),
                    cache.index.at[slot].set(prefilled.length))
    return Slots(cache, slots.tokens.at[slot].set(prefilled.token), slots.keys.at[slot].set(key),
                 slots.steps.at[slot].set(1), slots.temperature.at[slot].set(temperature),
                 slots.top_p.at[slot].set(top_p))


def _draw(static: SlotStatic, slots: Slots, logits: jax.Array) -> jax.Array:
    """Next token per slot from logits float32 [N, V]: argmax, or (temperature > 0) each slot's own draw."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if static.greedy:
        return greedy
    temperature = jnp.maximum(slots.temperature, 1e-6)[:, None]
    filtered = filter_logits(logits, temperature, jnp.int32(0), slots.top_p[:, None])
    keys = jax.vmap(jax.random.fold_in)(slots.keys, slots.steps)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, filtered)
    return jnp.where(slots.temperature > 0, drawn.astype(jnp.int32), greedy)


def _first_rows(slots: Slots, rows: int) -> Slots:
    """The first `rows` slots (the cache's key / value have the slot axis second)."""
    cache = slots.cache
    cache = KVCache(cache.key[:, :rows], cache.value[:, :rows], cache.mask[:rows], cache.index[:rows])
    return Slots(cache, *(a[:rows] for a in slots[1:]))


def _put_first_rows(slots: Slots, head: Slots) -> Slots:
    put = lambda a, h, axis: jax.lax.dynamic_update_slice_in_dim(a, h, 0, axis)
    cache = KVCache(*(put(a, h, 1) for a, h in zip(slots.cache[:2], head.cache[:2])),
                    *(put(a, h, 0) for a, h in zip(slots.cache[2:], head.cache[2:])))
    return Slots(cache, *(put(a, h, 0) for a, h in zip(slots[1:], head[1:])))


def _step(model, static: SlotStatic, slots: Slots, active) -> Slots:
    index = slots.cache.index
    logits, cache = language_model(model).decode(slots.cache, slots.tokens[:, None], attention_mask=active[:, None])
    cache = cache._replace(index=jnp.where(active, cache.index, index))
    token = jnp.where(active, _draw(static, slots, logits[:, -1]), slots.tokens)
    return slots._replace(cache=cache, tokens=token, steps=slots.steps + active.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("slots",))
def generate(state, slots: Slots, active, *, static: SlotStatic) -> Slots:
    """One decode step over the first `static.rows` slots (all by default): each active slot (bool [N]) feeds
    its last token and draws the next; an inactive slot keeps its length (its row is computed, masked, and
    dropped). Fewer rows cost less where compute grows with the rows (CPU)."""
    model = nnx.merge(static.graphdef, state)
    rows = static.rows or slots.tokens.shape[0]
    if rows == slots.tokens.shape[0]:
        return _step(model, static, slots, active)
    return _put_first_rows(slots, _step(model, static, _first_rows(slots, rows), active[:rows]))


__all__ = ["SlotStatic", "Slots", "Prefilled", "empty_slots", "prefill_request", "insert", "generate"]
