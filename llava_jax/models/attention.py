"""Self-attention over full sequences (training, scoring, the vision tower), one function for every kernel.

`attention(q, k, v, segment_ids=..., causal=..., impl=...)`; q [B, T, N, head_dim], k / v [B, T, K,
head_dim] (K divides N, grouped-query). `segment_ids` int [B, T] (0 = padding) keeps every query inside
its own sample when several samples share a row (packing); positions are the caller's business (rotary
embeddings restart per sample).

Kernels (`impl`):
- `xla`: `jax.nn.dot_product_attention` with a dense mask (any device).
- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  (NVIDIA GPUs, bf16 / fp16). Segments become a boolean mask.
- `splash`: the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
  segment ids and causality handled by the kernel's block-sparse mask. Off TPU it runs in Pallas interpret
  mode (exact but slow: for tests). Inside a mesh it runs per shard (`jax.shard_map` over the batch axes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("xla", "cudnn", "splash")
_SPLASH_BLOCK = 128


def check_impl(impl: str | None) -> str:
    """None -> 'xla'; raises ValueError naming the valid kernels otherwise."""
    impl = impl or "xla"
    if impl not in IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {IMPLS}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
              causal: bool = True, impl: str | None = "xla") -> jax.Array:
    """Scaled dot-product attention. Returns [B, T, N, head_dim] in q's dtype."""
    impl = check_impl(impl)
    if impl == "splash":
        return _splash(q, k, v, segment_ids, causal)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation="cudnn" if impl == "cudnn" else "xla")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> bool [B, 1, T, T]: query and key in the same segment (padding attends to
    padding only, so no row is empty)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> int32 [B, T]: the index of each token within its segment (runs of equal ids)."""
    t = segment_ids.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


# ----------------------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)


def _splash(q, k, v, segment_ids, causal):
    b, t, n, d = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    pad = -t % _SPLASH_BLOCK
    if pad:  # the kernel tiles by blocks of 128: padded tokens get their own segment (-1)
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q, k, v = widen(q), widen(k), widen(v)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    run = functools.partial(_splash_local, causal=causal, interpret=jax.default_backend() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        from llava_jax import sharding

        spec = sharding.logical_to_spec(("batch", "length", "heads", None))
        run = jax.shard_map(run, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(spec[0], None)),
                            out_specs=spec, check_vma=False)
    return run(q, k, v, segment_ids.astype(jnp.int32))[:, :t]


def _splash_local(q, k, v, segment_ids, *, causal, interpret):
    """The kernel on this device's rows: q [b, T, n, d], k / v [b, T, kv, d] (T a multiple of 128). Grouped-query
    heads run the multi-query kernel once per kv head (no repeated keys and values)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, t, n, d = q.shape
    kv = k.shape[2]
    head_mask = mask_lib.CausalMask((t, t)) if causal else mask_lib.FullMask((t, t))
    block = 512 if t % 512 == 0 else _SPLASH_BLOCK
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    kernel = kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([head_mask] * (n // kv)),
                                                      block_sizes=sizes, interpret=interpret)
    scale = np.float32(1.0 / np.sqrt(d)).astype(q.dtype)
    q = (q * scale).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)   # [b, kv, group, T, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                  # [b, kv, T, d]

    def one_row(qr, kr, vr, seg):
        ids = kernel_lib.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(q, k, v, segment_ids)                             # [b, kv, group, T, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)
