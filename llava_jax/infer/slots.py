"""Decode slots for continuous batching (the JetStream / MaxText split into prefill, insert and generate).

A `Slots` state holds a fixed number N of decode slots, each with its own rows of one KV cache
[L, N, K, S, head_dim] (`KVCache` with a per-row `index` [N]: every slot writes at its own length), its last
token, sampling key, step count, temperature and top-p. Three jitted programs, all of static shapes:
- `prefill_requests`: R requests' prompts (left padded to a bucket P, with their images) through a fresh cache
  of R rows of P positions -> their KV with each row's real tokens moved to the front, their counts, and their
  first tokens (the `decoding.prefill` computation, so a greedy answer equals `Generator`'s); or, given the KV
  of a shared prefix (the template's system prompt, computed once), only the rest of each prompt after it;
- `start_chunked` / `prefill_chunk` / `finish_chunked`: a long prompt's prefill in chunks of a fixed size, one
  between two decode steps (its images embedded once, at the start), into a one-row cache of the slots' length;
- `insert`: those rows' KV into their slots of the `Slots` state (donated), with the requests' sampling
  settings;
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

from llava_jax.infer.decoding import _decode, embed_prompt, language_model
from llava_jax.infer.sampling import filter_logits
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
    """R prefilled requests: key/value [L, R, K, n0 + P, head_dim] (each row's n real tokens first), n int32 [R],
    first token int32 [R]."""

    key: jax.Array
    value: jax.Array
    length: jax.Array
    token: jax.Array


def _fresh_cache(model, rows: int, width: int, prefix: Prefilled | None) -> KVCache:
    """An R-row cache for `width` new positions, holding first the n0 tokens of `prefix` (one row of exactly n0
    real tokens: key [L, 1, K, n0, head_dim]) in every row when there is one."""
    if prefix is None:
        return model.init_cache(rows, width)
    n0 = prefix.key.shape[3]
    cache = model.init_cache(rows, n0 + width)
    put = lambda c, kv: jax.lax.dynamic_update_slice(c, jnp.broadcast_to(kv, c.shape[:3] + kv.shape[3:]).astype(
        c.dtype), (0, 0, 0, 0, 0))
    return KVCache(put(cache.key, prefix.key), put(cache.value, prefix.value), cache.mask.at[:, :n0].set(True),
                   jnp.int32(n0))


def draw_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, steps: jax.Array,
                 greedy: bool) -> jax.Array:
    """Each row's next token from logits float32 [R, V]: argmax, or (temperature [R] > 0) its own draw with
    fold_in(keys[r], steps[r]) (as `Generator` draws a row's tokens)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    filtered = filter_logits(logits, jnp.maximum(temperature, 1e-6)[:, None], jnp.int32(0), top_p[:, None])
    folded = jax.vmap(jax.random.fold_in)(keys, steps)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(folded, filtered)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), best)


@functools.partial(jax.jit, static_argnames=("static",))
def prefill_requests(state, ids, mask, pixels, image_inputs, keys, temperature, top_p,
                     prefix: Prefilled | None = None, *, static: SlotStatic) -> Prefilled:
    """R requests prefilled together: ids / mask int32 [R, P] (left padded), pixels and image_inputs as
    `Batch.pixels` / `Batch.image_inputs` (None: text only), keys [R], temperature / top_p float32 [R] ->
    `Prefilled` (key/value of n0 + P positions); each row's first token is drawn with fold_in(its key, 0).
    `prefix`: the KV of the prompts' first n0 tokens (a shared system prompt, computed once), which `ids`
    continue in every row."""
    model = nnx.merge(static.graphdef, state)
    cache = _fresh_cache(model, ids.shape[0], ids.shape[1], prefix)
    if static.split_prefill:
        _, cache = _decode(model, cache, ids[:, :-1], mask[:, :-1], pixels, image_inputs)
        logits, cache = language_model(model).decode(cache, ids[:, -1:], attention_mask=mask[:, -1:])
    else:
        logits, cache = _decode(model, cache, ids, mask, pixels, image_inputs)
    token = draw_tokens(logits[:, -1], keys, temperature, top_p, jnp.zeros_like(ids[:, 0]), static.greedy)
    return _compact(cache, token)


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert(slots: Slots, slot_ids, prefilled: Prefilled, count, keys, temperature, top_p) -> Slots:
    """Puts the first `count` (int32 []) rows of `prefilled` into slots `slot_ids` (int32 [R]): row r's KV at
    positions 0..P-1 of its slot (those past its length, padding, are left out), its length, its first token
    (step 1 of its key keys[r]), its sampling settings temperature / top_p [R]."""
    length = slots.cache.mask.shape[1]
    fit = lambda kv, like: kv[:, :, :, :length].astype(like.dtype)
    key_rows, value_rows = fit(prefilled.key, slots.cache.key), fit(prefilled.value, slots.cache.value)
    zero = jnp.zeros((), jnp.int32)

    def put(r, state: Slots) -> Slots:
        slot, cache = slot_ids[r], state.cache
        at = (zero, slot, zero, zero, zero)
        row = lambda kv: jax.lax.dynamic_slice_in_dim(kv, r, 1, axis=1)
        cache = KVCache(jax.lax.dynamic_update_slice(cache.key, row(key_rows), at),
                        jax.lax.dynamic_update_slice(cache.value, row(value_rows), at),
                        cache.mask.at[slot].set(jnp.arange(length) < prefilled.length[r]),
                        cache.index.at[slot].set(prefilled.length[r]))
        return Slots(cache, state.tokens.at[slot].set(prefilled.token[r]), state.keys.at[slot].set(keys[r]),
                     state.steps.at[slot].set(1), state.temperature.at[slot].set(temperature[r]),
                     state.top_p.at[slot].set(top_p[r]))

    return jax.lax.fori_loop(0, count, put, slots)


def _compact(cache: KVCache, token: jax.Array) -> Prefilled:
    """A prefill's cache -> `Prefilled`: each row's real tokens moved to the front, in order."""
    order = jnp.argsort(~cache.mask, axis=1, stable=True)
    front = lambda c: jnp.take_along_axis(c, order[None, :, None, :, None], axis=3)
    return Prefilled(front(cache.key), front(cache.value), jnp.sum(cache.mask, axis=1, dtype=jnp.int32), token)


class Chunked(NamedTuple):
    """A prompt being prefilled in chunks (one between two decode steps): its embeddings [1, P, D] (images merged
    in), its mask int32 [1, P], and a one-row cache of the slots' length holding the chunks done."""

    embeds: jax.Array
    mask: jax.Array
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("static", "length"))
def start_chunked(state, ids, mask, pixels, image_inputs, prefix: Prefilled | None = None, *, static: SlotStatic,
                  length: int) -> Chunked:
    """ids / mask int32 [1, W] (left padded, with room for a chunk in front of the first real token), pixels /
    image_inputs as `Batch`'s -> `Chunked`: the prompt's embeddings and mask, and an empty cache of `length`
    positions (or holding the shared prefix's n0 tokens, which `ids` continue). The vision tower runs here,
    once."""
    model = nnx.merge(static.graphdef, state)
    cache = _fresh_cache(model, 1, length - (0 if prefix is None else prefix.key.shape[3]), prefix)
    return Chunked(embed_prompt(model, ids, pixels, image_inputs), mask, cache)


@functools.partial(jax.jit, static_argnames=("static", "size"), donate_argnames=("chunked",))
def prefill_chunk(state, chunked: Chunked, start, *, static: SlotStatic, size: int) -> tuple[Chunked, jax.Array]:
    """Columns start..start + size of the (padded) prompt (int32 start) through the decoder into the chunk cache ->
    (the updated `Chunked`, logits float32 [1, V] of the chunk's last column)."""
    model = nnx.merge(static.graphdef, state)
    embeds = jax.lax.dynamic_slice_in_dim(chunked.embeds, start, size, axis=1)
    mask = jax.lax.dynamic_slice_in_dim(chunked.mask, start, size, axis=1)
    logits, cache = language_model(model).decode(chunked.cache, inputs_embeds=embeds, attention_mask=mask)
    return chunked._replace(cache=cache), logits[:, -1]


@functools.partial(jax.jit, static_argnames=("greedy",))
def finish_chunked(chunked: Chunked, logits, keys, temperature, top_p, *, greedy: bool) -> Prefilled:
    """The last chunk's logits [1, V] -> `Prefilled` (first token drawn as `prefill_requests` draws it)."""
    token = draw_tokens(logits, keys, temperature, top_p, jnp.zeros((1,), jnp.int32), greedy)
    return _compact(chunked.cache, token)


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
    drawn = draw_tokens(logits[:, -1], slots.keys, slots.temperature, slots.top_p, slots.steps, static.greedy)
    token = jnp.where(active, drawn, slots.tokens)
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


__all__ = ["SlotStatic", "Slots", "Prefilled", "Chunked", "empty_slots", "prefill_requests", "start_chunked",
           "prefill_chunk", "finish_chunked", "insert", "generate", "draw_tokens"]
