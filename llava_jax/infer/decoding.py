"""The jitted decoding programs: one prefill (vision tower + prompt through a fresh KV cache, first token) and a
`jax.lax.while_loop` decode (or one step at a time, for streaming), pure functions of the `nnx.split` state.
`Static` holds what they specialize on besides array shapes; `bucket_length` the padded prompt lengths."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.infer.sampling import next_token


def token_buffer(max_new_tokens: int) -> int:
    """Token buffer (and extra cache) length for `max_new_tokens`: powers of two, at least 16; the bound itself is
    traced (`Carry.limit`), so the programs compile once per buffer, not per value."""
    return max(16, next_power_of_two(max_new_tokens))


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int) -> int:
    """Padded prompt length for `n` tokens: powers of two (at least 16) up to 256, then multiples of 128."""
    if n <= 256:
        return max(16, next_power_of_two(n))
    return -(-n // 128) * 128



@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the compiled programs specialize on besides array shapes."""

    graphdef: nnx.GraphDef
    greedy: bool
    eos_ids: tuple[int, ...]
    stop_ids: tuple[tuple[int, ...], ...]
    pad_id: int
    split_prefill: bool = False  # prefill all but the last column, then the last (a text token in every row)


def _decode(model, cache, ids, mask=None, pixels=None, image_mask=None):
    """model.decode for LLaVA, AnyRes models (image_mask is then the dict of "image_taps", "videos", "video_taps")
    and plain causal LMs (which take no images): the decoder over `embed_prompt`'s embeddings."""
    return language_model(model).decode(cache, inputs_embeds=embed_prompt(model, ids, pixels, image_mask),
                                        attention_mask=mask)


def embed_prompt(model, ids, pixels=None, image_mask=None) -> jax.Array:
    """The input embeddings [B, T, D] a prefill feeds the decoder, images merged in (counts checked, as
    `model.decode` checks them, when the inputs are concrete)."""
    if pixels is None and image_mask is None:
        return language_model(model).embed(ids)
    if isinstance(image_mask, dict):
        return model.embed_inputs(ids, pixels, image_mask["image_taps"], pixel_values_videos=image_mask["videos"],
                                  video_taps=image_mask["video_taps"],
                                  check_counts=pixels is not None or image_mask["videos"] is not None)
    return model.embed_inputs(ids, pixels, image_mask, check_counts=pixels is not None)


def language_model(model):
    """The decoder that embeds generated tokens: a generated image token id is an ordinary token there, as in
    transformers (images enter at the prefill only)."""
    return getattr(model, "language_model", model)


def decoding_layout(model):
    """`model` with each decoder layer in its own weight buffers (`LlamaModel.unstack_layers`), the one layout
    `Generator` decodes with: a layer loop over stacked weights copies each layer's slice every step, so a
    memory-bound GPU decode step moves about twice the bytes (H100, 7B bf16, batch 1: 15.9 -> 6.4 ms).
    A stacked model is left as it is and a copy is returned (new modules; the decoder's weights are copied
    into per-layer buffers); an unstacked one is returned itself."""
    if isinstance(language_model(model).model.layers, nnx.List):
        return model
    graphdef, state = nnx.split(model)
    decoder = nnx.merge(graphdef, state)  # new modules over the same arrays
    language_model(decoder).model.unstack_layers()
    return decoder


def _stopped(static: Static, tokens: jax.Array, step: jax.Array) -> jax.Array:
    """Whether each row ends at `step`: tokens int32 [B, N] (step = the last written column) -> bool [B]."""
    last = tokens[:, step]
    stop = jnp.isin(last, jnp.asarray(static.eos_ids, jnp.int32)) if static.eos_ids else jnp.zeros_like(last, bool)
    for seq in static.stop_ids:
        n = len(seq)
        start = jnp.maximum(step - n + 1, 0)
        tail = jax.lax.dynamic_slice_in_dim(tokens, start, n, axis=1)
        stop |= (step + 1 >= n) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
    return stop


class Carry(NamedTuple):
    """Decode state: cache, tokens int32 [B, N], lengths int32 [B], done bool [B], step int32 (next column),
    limit int32 (the columns to fill, <= N: a traced bound, so every max_new_tokens up to N shares one program)."""

    cache: object
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    step: jax.Array
    limit: jax.Array


@functools.partial(jax.jit, static_argnames=("static", "buffer"))
def prefill(state, ids, mask, pixels, image_mask, done, key, sampling, limit, *, static: Static, buffer: int):
    """Prompt ids [B, P] (left padded, mask [B, P]) -> (Carry after the first new token): a cache of P + buffer
    positions, a token buffer [B, buffer] of which `limit` (int32, 1..buffer) columns are decoded. image_mask:
    bool [N] (LLaVA), or the taps dict of `generate.Batch.vision` (AnyRes models)."""
    model = nnx.merge(static.graphdef, state)
    cache = model.init_cache(ids.shape[0], ids.shape[1] + buffer)
    if static.split_prefill:  # the logits of all but the last position are never computed (dead code)
        _, cache = _decode(model, cache, ids[:, :-1], mask[:, :-1], pixels, image_mask)
        logits, cache = language_model(model).decode(cache, ids[:, -1:], attention_mask=mask[:, -1:])
    else:
        logits, cache = _decode(model, cache, ids, mask, pixels, image_mask)
    token = next_token(logits[:, -1], jax.random.fold_in(key, 0), sampling, static.greedy)
    token = jnp.where(done, static.pad_id, token)
    tokens = jnp.full((ids.shape[0], buffer), static.pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.where(done, 0, 1).astype(jnp.int32)
    done = done | _stopped(static, tokens, jnp.int32(0))
    return Carry(cache, tokens, lengths, done, jnp.int32(1), jnp.asarray(limit, jnp.int32))


def _step(static: Static, model, carry: Carry, key, sampling) -> Carry:
    """Feeds every row's last token and writes the next one at column `carry.step`."""
    step, tokens, done = carry.step, carry.tokens, carry.done
    last = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)  # [B, 1]
    logits, cache = language_model(model).decode(carry.cache, last)
    token = next_token(logits[:, -1], jax.random.fold_in(key, step), sampling, static.greedy)
    token = jnp.where(done, static.pad_id, token)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
    lengths = carry.lengths + jnp.where(done, 0, 1)
    done = done | _stopped(static, tokens, step)
    return Carry(cache, tokens, lengths, done, step + 1, carry.limit)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("carry",))
def decode_loop(state, carry: Carry, key, sampling, *, static: Static) -> Carry:
    """Decodes until every row is done or `carry.limit` columns are filled."""
    model = nnx.merge(static.graphdef, state)
    return jax.lax.while_loop(lambda c: (c.step < c.limit) & ~jnp.all(c.done),
                              lambda c: _step(static, model, c, key, sampling), carry)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("carry",))
def decode_one(state, carry: Carry, key, sampling, *, static: Static) -> Carry:
    """One decode step (streaming)."""
    return _step(static, nnx.merge(static.graphdef, state), carry, key, sampling)


__all__ = ["Static", "Carry", "prefill", "decode_loop", "decode_one", "decoding_layout", "language_model",
           "bucket_length", "next_power_of_two", "token_buffer"]
