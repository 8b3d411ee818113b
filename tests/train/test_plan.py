"""`python -m llava_jax.plan`: the train step compiled ahead of time from abstract shapes, its memory,
FLOPs and collectives per device; clear errors for bad targets and meshes."""

import os
import re
import subprocess
import sys

import pytest

from llava_jax.train import plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config=configs/stage2.py:demo", "--config.train.global_batch_size=16", "--config.data.max_length=64",
        "--config.model.dtype=bfloat16", "--config.model.frozen_dtype=bfloat16"]


def run_plan(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "llava_jax.plan", *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env=dict(env, PYTHONPATH=REPO))


def gigabytes(out: str, label: str) -> float:
    return float(re.search(rf"{label}\s+([\d.]+) GB", out).group(1))


def test_plan_on_fake_cpu_devices():
    done = run_plan(*TINY, "--devices=cpu:8", "--mesh.data=1", "--mesh.fsdp=8")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "CPU (fake devices) x 8" in out and "'fsdp': 8" in out and ": fits" in out
    # Adam's two float32 moments per trainable parameter, sharded like the parameters themselves.
    assert gigabytes(out, "optimizer state") == pytest.approx(2 * gigabytes(out, "gradients"), abs=0.011)
    collectives = re.findall(r"^  (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\s+(\w+)",
                             out, re.M)
    assert ("all-gather", "bf16") in collectives          # FSDP weight gathers in the compute dtype
    assert re.search(r"roofline .* step >= [\d.]+ ms", out)


def test_plan_errors_name_what_is_wrong():
    done = run_plan(*TINY, "--topology=v5p-7")
    assert done.returncode == 2 and "unknown v5p slice size" in done.stderr
    done = run_plan(*TINY, "--devices=cpu:8", "--mesh.data=1", "--mesh.fsdp=3")
    assert done.returncode == 2 and "must equal the 8 devices" in done.stderr
    done = run_plan(*TINY, "--devices=cpu:8", "--mesh.data=1", "--mesh.fsdp=8", "--config.data.packing=best_fit",
                    "--config.train.global_batch_size=12")
    assert done.returncode == 2 and "12 is not divisible by data*fsdp (8)" in done.stderr
    assert "counts rows" in done.stderr and "--config.data.pack_length" in done.stderr
    with pytest.raises(ValueError, match="exactly one of --topology"):
        plan.parse_target("v5p-8", "cpu:8")


def test_topology_names():
    v5p = plan.parse_target("v5p-64", "")       # 64 TensorCores = 32 chips
    assert (v5p.num_devices, v5p.tpu_topology) == (32, "v5p:2x4x4")
    assert plan.parse_target("v5e-256", "").tpu_topology == "v5e:16x16"
    gpu = plan.parse_target("h100x8", "")
    assert gpu.kind == "cpu" and gpu.num_devices == 8 and gpu.chip.name.startswith("H100")


def test_a_plan_that_does_not_fit_says_what_to_change():
    chip = plan.Chip("small", 1e12, 1e9, 1e11, 1e10)
    report = plan.Report(plan.Target(chip, "tpu", 8), {"fsdp": 8}, 2e9, 0, 0, 1e9, 3e9, 1e12, 0, 0, [])
    text = plan.format_report(report, plan.recipes.stage_config(2, "demo"))
    assert "DOES NOT FIT" in text and "more fsdp" in text and "remat" in text and "microbatches" in text


def test_plan_for_a_tpu_topology():
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")
    done = run_plan(*TINY, "--topology=v5p-8", "--mesh.data=1", "--mesh.fsdp=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TPU v5p x 4 (v5p:2x2x1)" in done.stdout and ": fits" in done.stdout


def test_a_packed_recipe_is_planned_with_its_packed_rows():
    """Packing (the recipes' default) feeds rows of `pack_length` tokens with several image slots and
    segment ids: the plan compiles that batch, not one image per `max_length` row."""
    from llava_jax import sharding

    c = plan.recipes.stage_config(2, "demo")
    c.data.packing, c.data.pack_length, c.data.max_images_per_row = "best_fit", 128, 3
    c.train.global_batch_size = 4
    step = plan.plan_step(c, sharding.make_mesh(1, 1, 1, devices=plan.jax.devices()[:1]))
    shapes = step.batch_shapes
    assert shapes["input_ids"] == shapes["segment_ids"] == shapes["positions"] == (4, 128)
    assert shapes["pixel_values"][:2] == (4, 3) and shapes["image_mask"] == (4, 3)
    compiled = plan.lower_and_compile(step)
    report = plan.report(c, plan.parse_target("", "cpu:1"), step, compiled, compiled.as_text())
    assert "batch: 4 rows x 128 tokens, 3 image slot(s) a row (packed: best_fit)" in plan.format_report(report, c)
    unpacked = plan.recipes.stage_config(2, "demo")
    unpacked.train.global_batch_size = 4
    assert plan.batch_layout(unpacked) == (4, unpacked.data.max_length, 1)


def test_the_planner_lowers_the_step_training_lowers(tmp_path):
    """Training's step (built by `train.setup` on the demo data, lowered with a real batch) and the planner's
    (abstract shapes) have the same StableHLO on 8 fake devices, with LoRA, the spike guard, Adam's b1/b2/eps,
    loss_chunk and microbatches set; dropping the spike guard from the planner's config changes it."""
    import json

    done = subprocess.run([sys.executable, os.path.join("tests", "train", "plan_hlo_script.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["lines"] > 1000
    assert found["equal"], "\n".join(found["diff"])
    assert not found["without_guard_equal"]
