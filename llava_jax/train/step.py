"""The jitted training and evaluation steps: pure functions over `nnx.split` state.

The loss is the token-weighted mean of next-token cross entropy over the supervised tokens (labels !=
-100) of the whole global batch; with gradient accumulation each microbatch contributes its sum divided
by the global count, so the result does not depend on how the batch is split.

An optional loss-spike guard (`spike_guard`, off by default) wraps the optimizer: an update whose loss,
gradient norm or update norm jumps more than `sigmas` standard deviations above its running mean is skipped
(parameters and optimizer state unchanged) and counted.

Dropout (the LoRA adapters' `nnx.Dropout`) is on in the train step only: each microbatch gets the key
fold_in(fold_in(key(dropout_seed), step), microbatch), split over stacked layers by `nnx.reseed`; the
eval step switches it off.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.data import batch as batch_spec
from llava_jax.train import loss as loss_lib
from llava_jax.train.loss import IGNORE_INDEX, token_cross_entropy  # noqa: F401  (re-exported)

Batch = dict[str, jax.Array]
# Batch entries passed to the model besides input_ids and the images: packed rows (`llava_jax.data.batch`).
PACKED_INPUTS = batch_spec.PACKED_INPUTS
# The token-aligned feature taps of an AnyRes batch (`llava_jax.data.batch`; LLaVA-NeXT / OneVision, read by
# `models.llava_next.AnyResLlava.embed_rows`).
ANYRES_INPUTS = batch_spec.ANYRES_INPUTS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training (frozen parameters are kept apart and never donated)."""
    step: jax.Array                 # int32 []
    trainable: Any                  # nnx.State of trainable parameters (float32 master copy)
    opt_state: Any                  # optax state over `trainable` only
    nonfinite_streak: jax.Array     # int32 []: consecutive skipped updates
    nonfinite_total: jax.Array      # int32 []: all skipped updates


def supervised_count(batch: Batch) -> jax.Array:
    return jnp.sum(loss_lib.target_mask(batch["labels"], batch.get("segment_ids")))


def batch_loss(model: nnx.Module, batch: Batch, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of the supervised tokens' cross entropy, their count) of a batch dict.

    Images [B, I, 3, S, S] stay row-aligned (each row's image tokens take its own images; an AnyRes batch's
    taps [B, T, 4] read its row's own tiles), so a batch-sharded step encodes and merges every row's images on
    its own device. Training batches are right-padded (or
    packed, with segment_ids and positions), so plain causal attention is exact for every real token;
    leaving the padding mask out keeps the fused causal kernels usable. The head runs in chunks
    (`llava_jax.train.loss`).
    """
    kwargs = {k: batch[k] for k in PACKED_INPUTS if k in batch}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"]
        kwargs["image_mask"] = batch["image_mask"]
        kwargs.update({k: batch[k] for k in ANYRES_INPUTS if k in batch})
    hidden = model.hidden_states(batch["input_ids"], **kwargs)
    return loss_lib.chunked_cross_entropy(hidden, batch["labels"], model.logits,
                                          segment_ids=batch.get("segment_ids"), chunk=loss_chunk)


def split_microbatches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B / num, ...] for every entry; microbatch j takes rows j, j + num, j + 2 num, ...
    so that with the batch sharded every device holds its share of every microbatch (no data movement)."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {num} microbatches")
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def with_dropout(model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Switches the model's dropout on and reseeds every 'dropout' stream from `key` (in place)."""
    model.train()
    nnx.reseed(model, dropout=key, policy="match_shape")
    return model


def in_compute_dtype(params, dtype):
    """Floating-point leaves cast to the compute dtype (gradients flow back to the master copy).

    Each cast copy is pinned to its parameter's own sharding, so under FSDP the partitioner gathers the
    compute-dtype copy (bf16 on the wire) and reduce-scatters the gradients back to the float32 shards."""
    def cast(var):
        if not isinstance(var, nnx.Variable):
            return var.astype(dtype) if jnp.issubdtype(var.dtype, jnp.floating) else var
        value = var.get_value()
        if not jnp.issubdtype(value.dtype, jnp.floating):
            return var
        axes = var.get_metadata().get("out_sharding")
        value = value.astype(dtype)
        return var.replace(value if axes is None else sharding.constrain(value, axes))

    return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    microbatches: int = 1, compute_dtype=jnp.bfloat16, dropout_seed: int = 0,
                    loss_chunk: int = 512) -> Callable:
    """Returns step(state, frozen, rest, batch) -> (state, metrics); jit it with donated `state`.

    Trainable parameters are cast to `compute_dtype` for the forward pass; gradients flow back to the
    float32 master copy. Frozen parameters are closed over and never differentiated. A step whose loss or
    gradient norm is not finite leaves parameters and optimizer state unchanged and is counted.
    Dropout keys derive from `dropout_seed`, the step number and the microbatch index. The output head runs
    on `loss_chunk` positions at a time.
    """
    dropout_key = jax.random.key(dropout_seed)
    optimizer = optax.with_extra_args_support(optimizer)  # update(..., loss=) reaches the spike guard

    def loss_sum(trainable, frozen, rest, micro: Batch, total: jax.Array, key: jax.Array):
        compute = in_compute_dtype(trainable, compute_dtype)
        # copy=True: fresh Variables at this trace level, so reseeding may update them.
        model = with_dropout(nnx.merge(graphdef, compute, frozen, rest, copy=True), key)
        ce_sum, count = batch_loss(model, micro, loss_chunk)
        return ce_sum / jnp.maximum(total, 1), (ce_sum, count)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state: TrainState, frozen, rest, batch: Batch):
        total = supervised_count(batch)
        micro = split_microbatches(batch, microbatches)
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        keys = jax.random.split(jax.random.fold_in(dropout_key, state.step), microbatches)

        def accumulate(carry, micro_and_key):
            grads, loss = carry
            mb, key = micro_and_key
            (micro_loss, _), g = grad_fn(state.trainable, frozen, rest, mb, total, key)
            return (jax.tree.map(jnp.add, grads, g), loss + micro_loss), None

        (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), (micro, keys))
        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.trainable, loss=loss)
        new_params = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(new_params, state.trainable),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": total, "finite": finite}
        if isinstance(new_opt, SpikeGuardState):
            metrics["spike_skipped"] = new_opt.last_skipped & finite
        return new_state, metrics

    return step


class SpikeGuardState(NamedTuple):
    """The optimizer state under `spike_guard`: running statistics of (loss, gradient norm, update norm)."""
    inner: Any               # the wrapped optimizer's state
    mean: jax.Array          # float32 [3]: exponential moving averages
    var: jax.Array           # float32 [3]: exponential moving variances
    seen: jax.Array          # int32 []: accepted steps since the statistics (re)started
    in_row: jax.Array        # int32 []: updates skipped in a row
    skipped: jax.Array       # int32 []: updates skipped in all
    last_skipped: jax.Array  # bool []: whether the latest update was skipped


SPIKE_MIN_RELATIVE_STD = 0.05  # deviations under sigmas x 5% of the mean never count as spikes


def spike_guard(inner: optax.GradientTransformation, *, sigmas: float, warmup_steps: int, decay: float,
                max_in_row: int) -> optax.GradientTransformationExtraArgs:
    """Skips updates whose loss, gradient norm (before clipping) or update norm exceeds its exponential
    moving mean by more than `sigmas` moving standard deviations, once `warmup_steps` updates were seen.

    A skipped update leaves the parameters (zero update) and `inner`'s state unchanged and does not enter
    the statistics. After `max_in_row` skips in a row the level is taken as a lasting change: the statistics
    restart (a new warm-up). `update(grads, state, params, loss=...)` needs the step's loss.
    """
    def init(params):
        zeros = jnp.zeros((3,), jnp.float32)
        count = jnp.zeros((), jnp.int32)
        return SpikeGuardState(inner.init(params), zeros, zeros, count, count, count, jnp.zeros((), bool))

    def update(grads, state: SpikeGuardState, params=None, *, loss, **extra):
        del extra
        updates, new_inner = inner.update(grads, state.inner, params)
        values = jnp.stack([loss, optax.global_norm(grads), optax.global_norm(updates)]).astype(jnp.float32)
        std = jnp.maximum(jnp.sqrt(state.var), SPIKE_MIN_RELATIVE_STD * jnp.abs(state.mean))
        spike = (state.seen >= warmup_steps) & jnp.any(values > state.mean + sigmas * std)
        accept = ~spike & jnp.all(jnp.isfinite(values))
        delta = values - state.mean
        first = state.seen == 0
        mean = jnp.where(first, values, state.mean + (1 - decay) * delta)
        var = jnp.where(first, 0.0, decay * (state.var + (1 - decay) * delta ** 2))
        restart = spike & (state.in_row + 1 >= max_in_row)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
        new_state = SpikeGuardState(
            inner=pick(new_inner, state.inner), mean=pick(mean, state.mean), var=pick(var, state.var),
            seen=jnp.where(restart, 0, state.seen + accept.astype(jnp.int32)),
            in_row=jnp.where(spike & ~restart, state.in_row + 1, 0),
            skipped=state.skipped + spike.astype(jnp.int32), last_skipped=spike)
        return jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), updates), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def maybe_spike_guard(optimizer: optax.GradientTransformation, guard) -> optax.GradientTransformation:
    """`optimizer` under `spike_guard` when `guard.enabled` (the config's `train.spike_guard`)."""
    if not guard.enabled:
        return optimizer
    return spike_guard(optimizer, sigmas=guard.sigmas, warmup_steps=guard.warmup_steps, decay=guard.decay,
                       max_in_row=guard.max_in_row)


def spike_counts(opt_state) -> dict[str, int]:
    """{"spike_skipped_steps": n} under the spike guard, else {}."""
    return {"spike_skipped_steps": int(opt_state.skipped)} if isinstance(opt_state, SpikeGuardState) else {}


def jit_train_step(step: Callable, mesh: jax.sharding.Mesh, state_shardings, frozen_shardings,
                   rest_shardings) -> Callable:
    """jax.jit of a train step with explicit shardings: the state (parameters and optimizer state in their
    FSDP / tensor shards) in and out, donated; batches split over the batch axes; metrics replicated."""
    batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh=mesh))
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, rest_shardings, batch),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, compute_dtype=jnp.bfloat16, loss_chunk: int = 512) -> Callable:
    """Returns eval(trainable, frozen, rest, batch) -> {"loss_sum", "count"} (sum these over batches).
    Dropout is off."""

    def evaluate(trainable, frozen, rest, batch: Batch):
        compute = in_compute_dtype(trainable, compute_dtype)
        model = nnx.merge(graphdef, compute, frozen, rest)
        model.eval()
        ce_sum, count = batch_loss(model, batch, loss_chunk)
        return {"loss_sum": ce_sum, "count": count}

    return evaluate


def state_shardings(trainable, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of the TrainState: the optimizer's per-parameter leaves (Adam moments) take their
    parameter's sharding, the rest (counts, step) are replicated. trainable: arrays or shape structs with
    shardings."""
    abstract = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
    replicated = NamedSharding(mesh, P())
    by_path = {jax.tree_util.keystr(path): (leaf.shape, leaf.sharding)
               for path, leaf in jax.tree_util.tree_leaves_with_path(trainable)}

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix in range(len(key)):  # the longest parameter path that ends this leaf's path
            found = by_path.get(key[suffix:])
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return replicated

    return TrainState(step=replicated, trainable=jax.tree.map(lambda x: x.sharding, trainable),
                      opt_state=jax.tree_util.tree_map_with_path(pick, abstract.opt_state),
                      nonfinite_streak=replicated, nonfinite_total=replicated)


def init_state(trainable, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                      nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))
