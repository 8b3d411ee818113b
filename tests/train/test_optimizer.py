import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.train import optimizer as opt
from tests.train.toy import ToyLM

RULES = [("proj/.*", "projector"), ("layers/.*", "llm"), ("embed/.*", None), ("norm/.*", None)]


def params(model):
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("total,ratio", [(100, 0.03), (1000, 0.03), (37, 0.1), (10, 0.0)])
def test_schedule_equals_transformers_cosine_with_warmup(total, ratio):
    warmup = opt.warmup_steps(total, ratio)
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    reference = transformers.get_cosine_schedule_with_warmup(torch_opt, warmup, total)
    ours = opt.warmup_cosine(2e-5, total, ratio)
    for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total}):
        step = max(step, 0)
        expected = 2e-5 * reference.lr_lambdas[0](step)
        np.testing.assert_allclose(float(ours(step)), expected, rtol=1e-5, atol=1e-12, err_msg=f"step {step}")


def test_schedule_formula_at_chosen_steps():
    total, ratio, peak = 1000, 0.03, 1e-3
    schedule = opt.warmup_cosine(peak, total, ratio)
    assert opt.warmup_steps(total, ratio) == 30
    np.testing.assert_allclose(float(schedule(15)), peak * 15 / 30, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(30)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(515)), peak * 0.5 * (1 + np.cos(np.pi * 485 / 970)), rtol=1e-5)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)


def test_every_parameter_matches_exactly_one_rule():
    state = params(ToyLM(rngs=nnx.Rngs(0)))
    groups = opt.resolve_groups(state, RULES)
    assert groups["proj/weight"] == "projector" and groups["layers/bias"] == "llm"
    assert groups["embed/weight"] is None
    with pytest.raises(ValueError, match="norm/weight: matches 0 rules"):
        opt.resolve_groups(state, RULES[:3])
    with pytest.raises(ValueError, match="proj/bias: matches 2 rules"):
        opt.resolve_groups(state, RULES + [("proj/bias", "llm")])
    with pytest.raises(ValueError, match="match no parameter"):
        opt.resolve_groups(state, RULES + [("vision_tower/.*", None)])


def test_frozen_parameters_have_no_optimizer_state_and_table_counts():
    model = ToyLM(rngs=nnx.Rngs(0))
    groups = opt.resolve_groups(params(model), RULES)
    _, trainable, frozen, _ = opt.split_model(model, groups)
    tx = opt.make_optimizer(groups, {"projector": opt.GroupSpec(1e-3), "llm": opt.GroupSpec(2e-5)},
                            total_steps=10, warmup_ratio=0.1)
    state = tx.init(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    # Adam keeps mu and nu per trainable element; nothing for frozen ones.
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n_state == 2 * n_trainable
    frozen_paths = {opt.path_str(p) for p, _ in nnx.to_flat_state(frozen)}
    assert frozen_paths == {"embed/weight", "norm/weight"}
    table = opt.group_table(params(model), groups)
    assert "frozen" in table and f"{8 * 17 + 8:,}" in table


def test_per_group_learning_rate_and_no_decay_on_vectors():
    model = ToyLM(rngs=nnx.Rngs(0))
    groups = opt.resolve_groups(params(model), RULES)
    _, trainable, _, _ = opt.split_model(model, groups)
    tx = opt.make_optimizer(groups, {"projector": opt.GroupSpec(1e-1, weight_decay=0.5),
                                     "llm": opt.GroupSpec(1e-3, weight_decay=0.5)},
                            total_steps=4, warmup_ratio=0.0, clip_norm=1e9)
    zero_grads = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zero_grads, tx.init(trainable), trainable)
    # With zero gradients Adam's step is 0, so the update is exactly -lr * wd * param for decayed leaves.
    flat_updates = {opt.path_str(p): v.get_value() for p, v in nnx.to_flat_state(updates)}
    flat_params = {opt.path_str(p): v.get_value() for p, v in nnx.to_flat_state(trainable)}
    np.testing.assert_allclose(flat_updates["proj/weight"], -1e-1 * 0.5 * flat_params["proj/weight"], rtol=1e-5)
    np.testing.assert_allclose(flat_updates["layers/weight"], -1e-3 * 0.5 * flat_params["layers/weight"],
                               rtol=1e-5)
    assert not np.any(flat_updates["proj/bias"]) and not np.any(flat_updates["layers/bias"])
