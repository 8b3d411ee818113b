"""Compiles the tiny stage-2 step on 8 fake CPU devices for each mesh and prints, as JSON, the collectives
of the partitioner's output (run by test_layout_hlo.py in a fresh process)."""

import json
import os
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="layout_hlo_")
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count=8 --xla_dump_to={DUMP} "
                           "--xla_dump_hlo_pass_re=spmd-partitioning --xla_dump_hlo_module_re=jit_step")
os.environ["JAX_PLATFORMS"] = "cpu"

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from llava_jax import sharding  # noqa: E402
from llava_jax.train import plan, recipes  # noqa: E402

MESHES = {"fsdp": (1, 8, 1), "tensor": (2, 1, 4), "mix": (1, 2, 4)}
BATCH, LENGTH, MICROBATCHES = 48, 80, 2


def config():
    c = recipes.stage_config(2, "demo")
    c.train.global_batch_size, c.data.max_length, c.train.microbatches = BATCH, LENGTH, MICROBATCHES
    c.model.dtype = c.model.frozen_dtype = "bfloat16"
    c.model.remat = "full"
    c.trainable = tuple(recipes.STAGE2_RULES)     # the recipe: tower frozen, projector and LLM trained
    return c


def partitioned(folder):
    return set(plan.partitioned_dumps(folder))


def main(names, tpu_topology=""):
    devices = plan.target_devices(plan.parse_target(tpu_topology, "")) if tpu_topology else None
    out = {}
    for name in names:
        before = set(partitioned(DUMP))
        step = plan.plan_step(config(), sharding.make_mesh(*MESHES[name], devices=devices))
        plan.lower_and_compile(step)
        (new,) = set(partitioned(DUMP)) - before
        out[name] = [dict(kind=c.kind, dtype=c.dtype, shapes=c.shapes, op=c.op_name, count=n)
                     for c, n in plan.parse_collectives(open(new).read())]
    print(json.dumps(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    tpu = [a.split("=", 1)[1] for a in args if a.startswith("--tpu=")]
    main([a for a in args if not a.startswith("--")] or list(MESHES), tpu[0] if tpu else "")
