"""The model FLOP count (llava_jax.train.metrics.FlopModel) against the compiler's count of the real train
step (`compiled.cost_analysis()["flops"]`), for stage 1 (frozen LLM on the gradient path), stage 2 full
fine-tuning and stage-2 LoRA.

The compiled step is the demo model with its layers unrolled (XLA's cost analysis counts a loop body once)
and without rematerialization (model FLOPs do not count recomputation). XLA's dense attention computes
every score, so the count is taken with causal=False. LoRA dropout is off here: the compiler counts the
random-bit generation of dropout masks as FLOPs. What remains between the two counts is elementwise work
(norms, activations, softmax, the optimizer update), a few percent at this tiny width.
"""

import dataclasses

import numpy as np
import pytest

from llava_jax import sharding
from llava_jax.train import metrics, plan, recipes

CASES = {"stage1": (1, "demo"), "stage2": (2, "demo"), "stage2_lora": (2, "demo,lora")}


def compiled_and_counted(stage, variant):
    c = recipes.stage_config(stage, variant)
    c.train.global_batch_size, c.data.max_length = 4, 64
    c.model.scan_layers, c.lora.dropout = False, 0.0
    if stage == 2 and not c.lora.enabled:
        c.trainable = tuple(recipes.STAGE2_RULES)   # the recipe: the tower stays frozen
    step = plan.plan_step(c, sharding.make_mesh(1, 1, 1, devices=plan.jax.devices()[:1]))
    cost = plan.lower_and_compile(step).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model = metrics.FlopModel.for_groups(step.model_cfg, step.groups, c.lora.rank if c.lora.enabled else 0)
    rows, length = step.batch_shapes["input_ids"]
    counted = model.step_flops(np.full(rows, length), rows, step.model_cfg.image_seq_length, causal=False)
    return model, float(cost["flops"]), counted


@pytest.mark.parametrize("case", list(CASES))
def test_flop_count_matches_the_compiled_step(case):
    model, compiler, counted = compiled_and_counted(*CASES[case])
    assert model.llm == {"stage1": "frozen", "stage2": "trained", "stage2_lora": "lora"}[case]
    assert not model.vision_trained
    assert model.vision_layers == 2            # demo tower: 3 layers, features from layer -2
    assert 1.0 <= compiler / counted < 1.06, (compiler, counted)


def test_conventions():
    cfg = plan.model_config(recipes.stage_config(2, "vicuna7b"))
    full, lora, frozen = (metrics.FlopModel.of(cfg, llm, lora_rank=128) for llm in ("trained", "lora", "frozen"))
    lengths = np.full(4, 2048)
    per_token = lambda m: m.step_flops(lengths, 4, 576) / lengths.sum()
    # LLaVA-1.5 7B: 6.7e9 matmul parameters; a trained weight costs 6 N per token, a frozen one 4 N.
    n = 32 * full.llm_layer_params + full.lm_head_params
    assert 6.5e9 < n < 6.9e9
    assert per_token(full) / per_token(frozen) == pytest.approx(1.5, rel=0.05)
    # LoRA r128: 0.32e9 adapter parameters at 6 FLOPs each on top of the frozen base.
    assert per_token(lora) - per_token(frozen) == pytest.approx(6 * 32 * lora.lora_layer_params, rel=1e-9)
    assert 3.1e8 < 32 * lora.lora_layer_params < 3.3e8
    assert full.vision_layers == 23            # layer -2 of 24: the last layer never runs


def test_anyres_flop_count_matches_the_compiled_step():
    """LLaVA-NeXT with its tower trained: every tile slot through the tower (x3: its backward too), its 16
    features through the projector, every position through the decoder (image tokens are decoder tokens)."""
    from tests.models import anyres_batch
    from tests.train.test_anyres_train import demo_run

    c, mesh, parts, state, step = demo_run(vision_lr=1e-4, lr=1e-3, scan_layers=False)
    cfg = parts.model_cfg
    sample = anyres_batch.sample(cfg, np.random.default_rng(0), [(23, 60)])
    rows, length, slots = 2, 128, 4
    batch = anyres_batch.rows(cfg, [[sample], [sample]], length, slots, packed=False)
    cost = step.lower(state, parts.frozen, parts.rest, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model = metrics.FlopModel.for_groups(cfg, parts.groups)
    assert model.vision_trained and model.llm == "trained" and metrics.features_per_tile(cfg) == 16
    counted = model.step_flops(np.full(rows, length), rows * slots, metrics.features_per_tile(cfg), causal=False)
    frozen_tower = dataclasses.replace(model, vision_trained=False).step_flops(
        np.full(rows, length), rows * slots, 16, causal=False)
    assert counted - frozen_tower > 0.03 * counted     # the tower's backward is a visible share here
    assert 1.0 <= float(cost["flops"]) / counted < 1.06, (float(cost["flops"]), counted)
