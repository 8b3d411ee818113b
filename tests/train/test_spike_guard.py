"""The optional loss-spike guard (train.spike_guard): an absurd learning-rate spike, or a batch whose loss
and gradients jump, is skipped inside the jitted step (parameters and optimizer state unchanged, counted);
without the guard the same spike blows the weights up. Off by default: the step is then unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from flax import nnx

from llava_jax.train import optimizer as opt
from llava_jax.train import step as train_step
from tests.train.test_step import RULES, make_batch
from tests.train.toy import ToyLM

SPIKE_AT = 40  # the step whose learning rate is absurd


def guard_config(enabled: bool) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(enabled=enabled, sigmas=6.0, warmup_steps=20, decay=0.9, max_in_row=5))


def run(enabled: bool, steps: int = SPIKE_AT + 10, lr_at=lambda step: 1e4 if step == SPIKE_AT else 1e-3,
        batch_at=None):
    """Adam at the learning rate lr_at(step) (set in the optimizer state before each step)
    -> (params per step, metrics per step, final state)."""
    model = ToyLM(rngs=nnx.Rngs(0))
    groups = opt.resolve_groups(nnx.state(model, nnx.Param), RULES)
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    tx = train_step.maybe_spike_guard(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                                      guard_config(enabled))
    fn = jax.jit(train_step.make_train_step(graphdef, tx, compute_dtype=jnp.float32))
    state = train_step.init_state(trainable, tx)
    params, metrics = [], []
    for step in range(1, steps + 1):
        adam = state.opt_state.inner if enabled else state.opt_state
        adam.hyperparams["learning_rate"] = jnp.asarray(lr_at(step), jnp.float32)
        batch = (batch_at or {}).get(step) or make_batch(seed=step % 4)
        state, m = fn(state, frozen, rest, batch)
        params.append(jax.device_get(state.trainable))
        metrics.append(jax.device_get(m))
    return params, metrics, state


def max_abs(tree) -> float:
    return max(float(np.abs(x).max()) for x in jax.tree.leaves(tree))


def test_absurd_learning_rate_step_is_skipped_and_weights_stay_sane():
    guarded, metrics, state = run(True)
    skipped = [i + 1 for i, m in enumerate(metrics) if m["spike_skipped"]]
    assert skipped == [SPIKE_AT]
    jax.tree.map(np.testing.assert_array_equal, guarded[SPIKE_AT - 1], guarded[SPIKE_AT - 2])  # unchanged
    assert int(state.opt_state.skipped) == 1 and train_step.spike_counts(state.opt_state) == {
        "spike_skipped_steps": 1}
    assert max_abs(guarded[-1]) < 10 and np.isfinite(metrics[-1]["loss"]) and metrics[-1]["loss"] < 5

    unguarded, plain_metrics, plain_state = run(False)
    assert "spike_skipped" not in plain_metrics[0] and train_step.spike_counts(plain_state.opt_state) == {}
    assert max_abs(unguarded[SPIKE_AT - 1]) > 1000  # the same spike blows the weights up
    # Before the spike both runs are the same computation (the guard only watches).
    jax.tree.map(np.testing.assert_array_equal, guarded[SPIKE_AT - 2], unguarded[SPIKE_AT - 2])


@pytest.mark.parametrize("jump", ["loss", "grad_norm"])
def test_a_jump_of_the_loss_or_the_gradient_norm_is_skipped(jump):
    """The guard on its own over SGD: 30 ordinary steps (loss ~1, gradient norm ~1, both noisy), then one
    whose loss or gradient is 10x: zero update, inner state unchanged, counted; then ordinary again."""
    tx = train_step.maybe_spike_guard(optax.sgd(0.1, momentum=0.9), guard_config(True))
    params = {"w": jnp.ones((4,))}
    state = tx.init(params)
    noise = np.random.default_rng(0).normal(size=40) * 0.05
    update = jax.jit(tx.update)
    for step in range(40):
        scale = 10.0 if step == 30 else 1.0
        grads = {"w": jnp.full((4,), 0.5 * (1 + noise[step]) * (scale if jump == "grad_norm" else 1.0))}
        loss = jnp.float32((1 + noise[step]) * (scale if jump == "loss" else 1.0))
        before = state
        updates, state = update(grads, state, params, loss=loss)
        assert bool(state.last_skipped) == (step == 30), step
        if step == 30:
            np.testing.assert_array_equal(updates["w"], 0.0)
            jax.tree.map(np.testing.assert_array_equal, state.inner, before.inner)
        params = optax.apply_updates(params, updates)
    assert int(state.skipped) == 1


def test_a_lasting_change_is_accepted_after_max_in_row_skips():
    """The learning rate stays 100x higher from SPIKE_AT on: skipped max_in_row (5) times, then the
    statistics restart and the new level is trained with."""
    _, metrics, _ = run(True, steps=SPIKE_AT + 8, lr_at=lambda step: 1e-1 if step >= SPIKE_AT else 1e-3)
    flags = [bool(m["spike_skipped"]) for m in metrics]
    assert not any(flags[:SPIKE_AT - 1])
    assert flags[SPIKE_AT - 1:SPIKE_AT + 4] == [True] * 5 and not any(flags[SPIKE_AT + 4:])
