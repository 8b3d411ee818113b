import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.train import optimizer as opt
from llava_jax.train import step as train_step
from tests.train.toy import ToyLM

RULES = [("proj/.*", "projector"), ("layers/.*", "llm"), ("embed/.*", None), ("norm/.*", "llm")]


def make_batch(seed=0, batch=4, length=9, vocab=17):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    labels = ids.copy()
    labels[:, :3] = -100          # prompt
    labels[1, 6:] = -100          # shorter answer
    labels[2, :] = -100           # nothing supervised in this row
    return {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
            "attention_mask": jnp.ones((batch, length), jnp.int32)}


def setup(lr=1e-2):
    model = ToyLM(rngs=nnx.Rngs(0))
    groups = opt.resolve_groups(nnx.state(model, nnx.Param), RULES)
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    tx = opt.make_optimizer(groups, {"projector": opt.GroupSpec(lr), "llm": opt.GroupSpec(lr)},
                            total_steps=10, warmup_ratio=0.0)
    return model, graphdef, trainable, frozen, rest, tx


def test_loss_is_token_weighted_mean_like_torch_cross_entropy():
    model, *_ = setup()
    batch = make_batch()
    logits = np.asarray(model(batch["input_ids"]))
    loss_sum, count = train_step.token_cross_entropy(jnp.asarray(logits), batch["labels"])
    reference = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1].copy()).reshape(-1, logits.shape[-1]),
        torch.from_numpy(np.asarray(batch["labels"])[:, 1:]).reshape(-1).long(), ignore_index=-100)
    np.testing.assert_allclose(float(loss_sum / count), reference.item(), rtol=1e-5)
    assert int(count) == int((np.asarray(batch["labels"])[:, 1:] != -100).sum())


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_matches_one_big_batch(microbatches):
    _, graphdef, trainable, frozen, rest, tx = setup()
    batch = make_batch()
    results = []
    for mb in (1, microbatches):
        fn = jax.jit(train_step.make_train_step(graphdef, tx, microbatches=mb, compute_dtype=jnp.float32))
        state, metrics = fn(train_step.init_state(trainable, tx), frozen, rest, batch)
        results.append((metrics, state))
    (m1, s1), (m2, s2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_step_changes_only_trainable_and_skips_nonfinite_updates():
    _, graphdef, trainable, frozen, rest, tx = setup()
    batch = make_batch()
    fn = jax.jit(train_step.make_train_step(graphdef, tx, compute_dtype=jnp.float32))
    state, metrics = fn(train_step.init_state(trainable, tx), frozen, rest, batch)
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.trainable),
                                                         jax.tree.leaves(trainable)))
    poisoned = dict(batch, input_ids=batch["input_ids"])
    nan_state = train_step.TrainState(state.step, jax.tree.map(lambda x: x * jnp.nan, state.trainable),
                                      state.opt_state, state.nonfinite_streak, state.nonfinite_total)
    after, metrics = fn(nan_state, frozen, rest, poisoned)
    assert not bool(metrics["finite"])
    assert int(after.nonfinite_streak) == 1 and int(after.nonfinite_total) == 1 and int(after.step) == 2
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(nan_state.opt_state)):
        np.testing.assert_array_equal(a, b)
