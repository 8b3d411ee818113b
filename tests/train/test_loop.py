"""The training CLI end to end on the demo: what is frozen stays bitwise unchanged, the optimizer holds exactly
the trainable leaves, stage 2 starts from stage 1's projector, non-finite steps are skipped and stop the run.

Also holds the helpers of the other CLI tests (test_resume, test_multihost, test_configs): every run is a
subprocess of `python -m llava_jax.train` on shared tiny demo data, with a shared persistent compilation
cache so that runs of one config compile once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# A tiny demo run: few samples, batch 4, one length bucket (one compiled step), no evaluation.
DEMO_OVERRIDES = {"demo.num_stage1": 48, "demo.num_stage2": 48, "demo.num_eval": 4, "demo.evaluate": False,
                  "train.global_batch_size": 4, "log_every": 1, "data.length_buckets": "(160,)"}


@pytest.fixture
def demo_data(tmp_path_factory) -> Path:
    """The demo data of DEMO_OVERRIDES, generated once per session (runs link it into their workdir)."""
    root = tmp_path_factory.getbasetemp() / "llava_train_demo_data"
    if not (root / "info.json").is_file():
        from llava_jax.data import synthetic

        synthetic.generate(root, num_stage1=48, num_stage2=48, num_eval=4, image_size=32, seed=0)
    return root


@pytest.fixture
def jax_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by the session's CLI runs."""
    path = tmp_path_factory.getbasetemp() / "llava_train_jax_cache"
    path.mkdir(exist_ok=True)
    return path


def cli_env(jax_cache: Path, devices: int = 1) -> dict:
    # A fixed hash seed keeps compiled programs identical across runs (set order), so the cache hits.
    return dict(os.environ, PYTHONHASHSEED="0", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def cli_command(stage: int | str, workdir: Path, overrides: dict | None = None, variant: str = "demo") -> list[str]:
    """stage: 1 or 2 (configs/stage{1,2}.py:variant), or a config file (with its variant)."""
    flags = {**(DEMO_OVERRIDES if variant == "demo" else {}), **(overrides or {})}
    config = f"{REPO}/configs/stage{stage}.py:{variant}" if isinstance(stage, int) else stage
    return [sys.executable, "-m", "llava_jax.train", f"--config={config}",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def link_data(workdir: Path, demo_data: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data").exists():
        (workdir / "data").symlink_to(demo_data, target_is_directory=True)


def start_cli(stage: int | str, workdir: Path, overrides: dict, *, demo_data: Path, jax_cache: Path,
              devices: int = 1) -> subprocess.Popen:
    link_data(workdir, demo_data)
    return subprocess.Popen(cli_command(stage, workdir, overrides), cwd=REPO, env=cli_env(jax_cache, devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(stage: int | str, workdir: Path, overrides: dict, *, demo_data: Path | None, jax_cache: Path,
            devices: int = 1, check: bool = True, timeout: float = 400,
            variant: str = "demo") -> subprocess.CompletedProcess:
    if demo_data is not None:
        link_data(workdir, demo_data)
    done = subprocess.run(cli_command(stage, workdir, overrides, variant), cwd=REPO, env=cli_env(jax_cache, devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"training CLI failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


def step_records(workdir: Path) -> list[dict]:
    from llava_jax.train.metrics import read_step_log

    return read_step_log(workdir / "metrics.jsonl")


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(workdir)}


# ------------------------------------------------------------------------------------------------ freezing


@functools.lru_cache(maxsize=1)
def initial_demo_params(tokenizer_dir: Path) -> dict:
    """{parameter path: array} of the demo model as a run builds it before training (the same for both
    stages: seed and config do not depend on the stage)."""
    import jax

    from llava_jax import sharding
    from llava_jax.train import model_init

    c = demo_config(1)
    tokenizer = model_init.load_tokenizer(c, tokenizer_dir)
    mesh = sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    return flat_params(model_init.build_model(c, mesh, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                              vocab_size=len(tokenizer), image_size=c.demo.image_size))


def demo_config(stage: int, variant: str | None = "demo"):
    """configs/stage{stage}.py:variant as a ConfigDict."""
    spec = importlib.util.spec_from_file_location(f"stage{stage}_config", REPO / "configs" / f"stage{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def flat_params(model) -> dict:
    from flax import nnx

    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def exported_params(export: Path) -> dict:
    """The parameters of a run's Hugging Face export, imported back (float32 round trip is exact)."""
    from llava_jax import convert

    return flat_params(convert.from_hf(export, dtype="float32"))


def changed_groups(initial: dict, final: dict) -> tuple[set, set]:
    """(top-level modules with a changed tensor, top-level modules bitwise unchanged)."""
    assert initial.keys() == final.keys()
    changed = {name.split("/")[0] for name in initial if not np.array_equal(initial[name], final[name])}
    return changed, {name.split("/")[0] for name in initial} - changed


def checkpoint_tree(workdir: Path, step: int) -> dict:
    """The raw saved training state of `step` (nested dicts of numpy arrays)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(step) / "state")


def array_leaves(tree, prefix=()) -> dict[tuple, tuple]:
    """{path: shape} of a nested dict / list tree (None entries are empty); nnx's `value` keys dropped."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif tree is None:
        return {}
    else:
        return {prefix[:-1] if prefix[-1:] == ("value",) else prefix: np.shape(tree)}
    return {path: shape for k, v in items for path, shape in array_leaves(v, prefix + (k,)).items()}


def flat_arrays(tree, prefix=()) -> dict[tuple, np.ndarray]:
    """{path: array} of a nested dict / list tree."""
    if isinstance(tree, (dict, list, tuple)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {path: a for k, v in items for path, a in flat_arrays(v, prefix + (k,)).items()}
    return {} if tree is None else {prefix: np.asarray(tree)}


def parameter_key(path: tuple) -> str:
    """The parameter a (possibly optimizer-state) path refers to: from the top-level module on."""
    tops = [i for i, k in enumerate(path) if k in ("vision_tower", "multi_modal_projector", "language_model")]
    return "/".join(map(str, path[tops[0]:])) if tops else ""


@pytest.fixture
def stage1_run(tmp_path_factory, demo_data, jax_cache) -> Path:
    """A 3-step stage-1 run with its HF export, shared by the tests below."""
    workdir = tmp_path_factory.getbasetemp() / "stage1_run"
    if not (workdir / "result.json").is_file():
        run_cli(1, workdir, {"train.num_steps": 3, "export_hf": workdir / "hf"}, demo_data=demo_data,
                jax_cache=jax_cache)
    return workdir


def test_stage1_trains_only_the_projector(stage1_run):
    initial, final = initial_demo_params(stage1_run / "data" / "tokenizer"), exported_params(stage1_run / "hf")
    changed, unchanged = changed_groups(initial, final)
    assert changed == {"multi_modal_projector"}
    assert unchanged == {"vision_tower", "language_model"}
    projector = [n for n in initial if n.startswith("multi_modal_projector")]
    assert all(not np.array_equal(initial[n], final[n]) for n in projector if n.endswith("weight"))

    state = checkpoint_tree(stage1_run, 3)
    trainable = {parameter_key(p): shape for p, shape in array_leaves(state["trainable"]).items()}
    assert set(trainable) == set(projector)
    assert all(trainable[n] == initial[n].shape for n in projector)
    # Adam's two moments: one leaf per trainable leaf each; scalars (step counts) aside, nothing else.
    moments = [(parameter_key(p), shape) for p, shape in array_leaves(state["opt_state"]).items() if shape]
    assert sorted(moments) == sorted(list(trainable.items()) * 2)
    records = step_records(stage1_run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in records)


def stage2_config_file(path: Path, rules: str) -> str:
    """A config file: the stage-2 demo with other trainable rules (a list field: not overridable by flag)."""
    path.write_text("from llava_jax.train import recipes\n\n\n"
                    "def get_config(arg=None):\n"
                    "    c = recipes.stage_config(2, 'demo')\n"
                    f"    c.trainable = [list(r) for r in {rules}]\n"
                    "    return c\n")
    return str(path)


def test_stage2_real_rules_freeze_only_the_vision_tower(tmp_path, demo_data, jax_cache):
    config = stage2_config_file(tmp_path / "real_rules.py", "recipes.STAGE2_RULES")
    workdir = tmp_path / "stage2"
    run_cli(config, workdir, {"train.num_steps": 2, "export_hf": tmp_path / "hf"}, demo_data=demo_data,
            jax_cache=jax_cache)
    initial, final = initial_demo_params(workdir / "data" / "tokenizer"), exported_params(tmp_path / "hf")
    changed, unchanged = changed_groups(initial, final)
    assert changed == {"multi_modal_projector", "language_model"}
    assert unchanged == {"vision_tower"}
    state = checkpoint_tree(workdir, 2)
    trainable = {parameter_key(p) for p in array_leaves(state["trainable"])}
    assert trainable == {n for n in initial if not n.startswith("vision_tower/")}


def test_stage2_starts_from_the_stage1_projector(tmp_path, stage1_run, demo_data, jax_cache):
    # The projector is frozen here so that the export shows the one stage 2 started from.
    config = stage2_config_file(tmp_path / "frozen_projector.py",
                                "[('vision_tower/.*', None), ('multi_modal_projector/.*', None), "
                                "('language_model/.*', 'llm')]")
    workdir = tmp_path / "stage2"
    run_cli(config, workdir, {"train.num_steps": 1, "export_hf": tmp_path / "hf",
                              "model.stage1_workdir": stage1_run}, demo_data=demo_data, jax_cache=jax_cache)
    stage1, stage2 = exported_params(stage1_run / "hf"), exported_params(tmp_path / "hf")
    initial = initial_demo_params(workdir / "data" / "tokenizer")
    projector = [n for n in stage1 if n.startswith("multi_modal_projector/")]
    assert all(np.array_equal(stage2[n], stage1[n]) for n in projector)
    assert not all(np.array_equal(stage2[n], initial[n]) for n in projector)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, demo_data, jax_cache):
    # A huge learning rate (no warmup) makes step 1's update overflow the model: every later loss is NaN.
    workdir = tmp_path / "run"
    done = run_cli(2, workdir, {"train.num_steps": 10, "optim.lr": 1e30, "optim.warmup_ratio": 0.0,
                                "train.max_nonfinite": 3, "checkpoint_every": 1, "keep_checkpoints": 10},
                   demo_data=demo_data, jax_cache=jax_cache, check=False)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "training stopped: step 4: 3 non-finite steps in a row (train.max_nonfinite=3)" in done.stderr
    assert "last checkpoint: step 3" in done.stderr
    assert "Traceback" not in done.stderr
    records = step_records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert np.isfinite(records[0]["loss"]) and not any(np.isfinite(r["loss"]) for r in records[1:])
    # Skipped steps leave parameters and optimizer state as they were after step 1, and are counted.
    after_1, after_3 = checkpoint_tree(workdir, 1), checkpoint_tree(workdir, 3)
    for name in ("trainable", "opt_state"):
        first, last = flat_arrays(after_1[name]), flat_arrays(after_3[name])
        assert first.keys() == last.keys()
        assert all(np.array_equal(first[k], last[k]) for k in first), name
    assert int(after_3["nonfinite_streak"]) == 2 and int(after_3["nonfinite_total"]) == 2
    assert int(after_3["step"]) == 3


def test_held_out_loss_every_eval_every_steps(tmp_path, demo_data, jax_cache):
    # The held-out set is the training set here, read in the same order (stage 1 does not group), one batch:
    # after step 1, whose learning rate is 0 (warmup starts at 0), the held-out loss is step 1's training loss.
    workdir = tmp_path / "run"
    done = run_cli(1, workdir, {"train.num_steps": 2, "eval_every": 1, "data.eval_batches": 1,
                                "data.eval_json": demo_data / "stage1.json"}, demo_data=demo_data, jax_cache=jax_cache)
    records = step_records(workdir)
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    held_out = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(train) == sorted(held_out) == [1, 2]
    np.testing.assert_allclose(held_out[1], train[1], rtol=1e-6)
    assert held_out[2] < held_out[1]  # Step 2 (learning rate 2e-3) trained on part of it.
    assert re.search(r"^step 2: eval_loss \d", done.stdout, re.M)


def test_demo_rules_train_the_vision_tower_too(tmp_path, demo_data, jax_cache):
    """A rule that trains the tower lets gradients through it (the tower is cut off only when frozen)."""
    workdir = tmp_path / "demo_stage2"
    run_cli(2, workdir, {"train.num_steps": 2, "export_hf": workdir / "hf"}, demo_data=demo_data,
            jax_cache=jax_cache)
    initial, final = initial_demo_params(workdir / "data" / "tokenizer"), exported_params(workdir / "hf")
    changed, _ = changed_groups(initial, final)
    assert changed == {"vision_tower", "multi_modal_projector", "language_model"}
    patches = "vision_tower/vision_model/embeddings/patch_embedding/weight"
    assert not np.array_equal(initial[patches], final[patches])


def test_packed_run_reports_token_efficiency(tmp_path, demo_data, jax_cache):
    """Stage 2 with packed rows (several samples and images per row): trains, and the log lines and
    metrics.jsonl carry real / computed tokens."""
    workdir = tmp_path / "packed"
    done = run_cli(2, workdir, {"train.num_steps": 2, "data.packing": "best_fit", "data.pack_length": 320,
                                "data.max_images_per_row": 4, "train.global_batch_size": 2},
                   demo_data=demo_data, jax_cache=jax_cache)
    records = step_records(workdir)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert all(0.5 < r["token_efficiency"] <= 1.0 for r in records)
    assert re.search(r"^step 2: .*token_efficiency 0\.\d+", done.stdout, re.M)
