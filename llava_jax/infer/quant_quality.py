"""How much weight-only quantization (`llava_jax.models.quant`) changes a model, measured, not assumed.

- `layer_errors`: the relative error ||h_q - h|| / ||h|| of the residual stream after each decoder layer, and of
  the logits, on the same input ids.
- `greedy_agreement`: tokens identical up to the first divergence, as a fraction of the reference answer's
  length, averaged over answers.
- `decode_memory`: what XLA's memory analysis says one compiled decode step holds (weights, KV cache,
  temporaries), from abstract shapes only (nothing is allocated).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llama import rope_cos_sin


def _decoder(model):
    return getattr(model, "language_model", model)


def layer_outputs(model, input_ids: jax.Array) -> list[jax.Array]:
    """The residual stream [B, T, D] after each decoder layer (float32), then the logits [B, T, V], of a causal
    LM (or a LLaVA's language model; layers stacked or not) on unpadded ids [B, T]."""
    llm = _decoder(model)
    graphdef, state = nnx.split(llm)

    @jax.jit
    def run(state, ids):
        llm = nnx.merge(graphdef, state)
        decoder = llm.model
        b, t = ids.shape
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (b, t)), decoder.rope, decoder.dtype)
        x, outs = llm.embed(ids), []
        for layer in _each_layer(decoder.layers):
            x, _ = layer(x, cos, sin, None)
            outs.append(x.astype(jnp.float32))
        return outs + [llm.logits(decoder.norm(x))]

    return run(state, jnp.asarray(input_ids, jnp.int32))


def _each_layer(stack) -> list:
    """The decoder layers as modules, from a stack (`make_stack`) or a list (`unstack_layers`)."""
    if isinstance(stack, nnx.List):
        return list(stack)
    graphdef, state = nnx.split(stack)
    count = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(count)]


def relative_error(approx: jax.Array, exact: jax.Array) -> float:
    exact = np.asarray(exact, np.float64)
    return float(np.linalg.norm(np.asarray(approx, np.float64) - exact) / max(np.linalg.norm(exact), 1e-30))


def layer_errors(reference, quantized, input_ids) -> list[float]:
    """Relative error per decoder layer output, the last entry the logits'."""
    return [relative_error(q, r) for q, r in zip(layer_outputs(quantized, input_ids),
                                                 layer_outputs(reference, input_ids))]


def agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Length of the common prefix over the reference length (1.0 for two empty answers)."""
    reference, other = list(reference), list(other)
    if not reference:
        return float(not other)
    same = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    return same / len(reference)


def greedy_agreement(reference: Sequence[Sequence[int]], others: Sequence[Sequence[int]]) -> float:
    """Mean `agreement` over answers (token id lists, same order)."""
    if len(reference) != len(others) or not reference:
        raise ValueError(f"greedy_agreement: {len(reference)} reference answers, {len(others)} others")
    return float(np.mean([agreement(r, o) for r, o in zip(reference, others)]))


def decode_memory(model, batch: int = 1, cache_length: int = 256) -> dict[str, int]:
    """XLA's memory analysis of one compiled one-token decode step of `model`'s language model, from abstract
    shapes: {"weights", "cache", "arguments", "temporaries"} in bytes (weights = arguments - cache - ids)."""
    llm = _decoder(model)
    graphdef, state = nnx.split(llm)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    cache = jax.eval_shape(lambda: llm.init_cache(batch, cache_length))
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def step(state, cache, ids):
        return nnx.merge(graphdef, state).decode(cache, ids)

    memory = jax.jit(step, donate_argnums=(1,)).lower(abstract, cache, ids).compile().memory_analysis()
    cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))
    arguments = int(memory.argument_size_in_bytes)
    return {"weights": arguments - cache_bytes - batch * 4, "cache": cache_bytes, "arguments": arguments,
            "temporaries": int(memory.temp_size_in_bytes)}


__all__ = ["layer_outputs", "layer_errors", "relative_error", "agreement", "greedy_agreement", "decode_memory"]
