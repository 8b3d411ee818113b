"""Lowers the train step twice on 8 fake CPU devices, as training builds it (`train.setup.setup` on the demo
data, a real batch) and as the planner does (`train.plan.plan_step`, abstract shapes), and prints as JSON
whether the two StableHLO texts are equal (run by test_plan.py in a fresh process).

The config turns on what the planner once left out or got wrong: LoRA (adapters and dropout), the spike guard,
Adam's b1/b2/eps, loss_chunk, microbatches, FSDP over 8 devices, bf16 compute and storage."""

import difflib
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from llava_jax.train import inputs, plan, recipes, setup  # noqa: E402


def config():
    c = recipes.stage_config(2, "demo,lora")
    c.demo.num_stage1, c.demo.num_stage2, c.demo.num_eval, c.demo.evaluate = 16, 16, 4, False
    c.data.length_buckets = (c.data.max_length,)     # the planner lowers rows of max_length tokens
    c.train.global_batch_size, c.train.microbatches, c.train.num_steps = 16, 2, 5
    c.train.loss_chunk = 40
    c.train.spike_guard.enabled = True
    c.optim.b1, c.optim.b2, c.optim.eps = 0.8, 0.95, 1e-6
    c.model.dtype = c.model.frozen_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    return c


def lowered_texts(workdir):
    c = config()
    run = setup.setup(c, workdir)
    batch = inputs.to_global(inputs.common_length(next(run.data.iterator), run.pad_token_id), run.mesh)
    cfg = plan.model_config(c, vocab_size=len(run.tokenizer), image_token_index=run.model_cfg.image_token_index)
    unguarded = config()
    unguarded.train.spike_guard.enabled = False
    planned, without_guard = plan.plan_step(c, run.mesh, cfg), plan.plan_step(unguarded, run.mesh, cfg)
    with jax.set_mesh(run.mesh):
        training = run.train_step.lower(run.state, run.frozen, run.rest, batch).as_text()
        planner = planned.jitted.lower(*planned.args).as_text()
        unguarded_text = without_guard.jitted.lower(*without_guard.args).as_text()
    run.checkpointer.close()
    return training, planner, unguarded_text


def main(workdir):
    training, planner, unguarded = lowered_texts(workdir)
    diff = list(difflib.unified_diff(training.splitlines(), planner.splitlines(), "training", "planner", n=0,
                                     lineterm=""))
    print(json.dumps({"equal": training == planner, "lines": len(training.splitlines()),
                      "without_guard_equal": training == unguarded, "diff": diff[:40]}))


if __name__ == "__main__":
    main(sys.argv[1])
