"""Config errors: invalid or contradictory values stop the run before any device work with a message naming the
field; a config whose weights and data are not on this machine stops at once, saying what to do."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.train.test_loop import REPO, demo_config, jax_cache  # noqa: F401
from tests.train.test_loop import cli_command, cli_env


@pytest.fixture
def no_device_work(monkeypatch):
    """Any use of the devices or of jax.distributed fails the test."""
    import jax

    from llava_jax import sharding
    from llava_jax.train import model_init

    def forbidden(*args, **kwargs):
        raise AssertionError("device work before the config was checked")

    monkeypatch.setattr(jax, "devices", forbidden)
    monkeypatch.setattr(jax.distributed, "initialize", forbidden)
    monkeypatch.setattr(sharding, "create_sharded", forbidden)
    monkeypatch.setattr(model_init, "build_model", forbidden)


def with_values(stage: int, values: dict):
    c = demo_config(stage)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


@pytest.mark.parametrize("values, field", [
    ({"optim.lr": -1.0}, "config.optim.lr"),
    ({"optim.warmup_ratio": 1.5}, "config.optim.warmup_ratio"),
    ({"train.global_batch_size": 0}, "config.train.global_batch_size"),
    ({"train.global_batch_size": 6, "train.microbatches": 4}, "config.train.microbatches"),
    ({"data.template": "vicuna_v9"}, "config.data.template"),
    ({"data.max_length": 4096}, "config.data.length_buckets"),
    ({"model.remat": "sometimes"}, "config.model.remat"),
    ({"model.attention_impl": "flash"}, "config.model.attention_impl"),
    ({"data.packing": "tight"}, "config.data.packing"),
    ({"data.packing": "best_fit", "data.pack_length": 100}, "config.data.pack_length"),
    ({"model.llava_path": "/ckpt/llava", "model.stage1_workdir": "/runs/stage1"}, "config.model.llava_path"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh"),
    ({"train.num_steps": -1, "train.num_epochs": 0}, "config.train.num_epochs"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints"),
    ({"keep_checkpoints": -2}, "config.keep_checkpoints"),
    ({"train.max_nonfinite": 0}, "config.train.max_nonfinite"),
    ({"distributed.coordinator": "127.0.0.1:1234"}, "config.distributed.num_processes"),
    ({"distributed.coordinator": "127.0.0.1:1234", "distributed.num_processes": 2,
      "distributed.process_id": 2}, "config.distributed.process_id"),
    # Every float finite and in range: not only optim.lr.
    ({"optim.projector_lr": float("nan")}, "config.optim.projector_lr"),
    ({"optim.vision_lr": float("inf")}, "config.optim.vision_lr"),
    ({"optim.projector_lr": 0.0}, "config.optim.projector_lr"),
    ({"optim.vision_lr": -3.0}, "config.optim.vision_lr"),
    ({"optim.lr": float("inf")}, "config.optim.lr"),
    ({"optim.weight_decay": float("nan")}, "config.optim.weight_decay"),
    ({"optim.warmup_ratio": float("nan")}, "config.optim.warmup_ratio"),
    ({"optim.clip_norm": float("inf")}, "config.optim.clip_norm"),
    ({"optim.b1": 1.0}, "config.optim.b1"),
    ({"optim.b2": float("nan")}, "config.optim.b2"),
    ({"optim.eps": 0.0}, "config.optim.eps"),
    ({"train.spike_guard.sigmas": float("inf")}, "config.train.spike_guard.sigmas"),
    ({"train.spike_guard.decay": float("nan")}, "config.train.spike_guard.decay"),
    ({"data.weight": 0.0}, "config.data.weight"),
    ({"data.extra_sources": [{"json": "a.json", "images": "img", "weight": float("nan")}]},
     "config.data.extra_sources[0].weight"),
    ({"peak_tflops": 0.0}, "config.peak_tflops"),
    ({"lora.enabled": True, "lora.alpha": float("nan")}, "config.lora.alpha"),
])
def test_invalid_values_fail_before_device_work_naming_the_field(tmp_path, no_device_work, values, field):
    from llava_jax.train import loop

    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        loop.run(with_values(2, values), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_layout_errors_name_the_field(tmp_path):
    """Settings that only the device count contradicts fail at mesh creation, before the model is built."""
    import jax

    from llava_jax.train import loop

    devices = jax.device_count()
    with pytest.raises(ValueError, match=r"^config\.mesh: .*devices"):
        loop.run(with_values(1, {"mesh.data": devices + 1, "mesh.fsdp": 1}), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    if devices > 1:
        with pytest.raises(ValueError, match=r"^config\.train\.global_batch_size: .*not divisible"):
            loop.run(with_values(1, {"train.global_batch_size": devices + 1}), tmp_path / "b")


def test_cli_invalid_value_exits_2_naming_the_field(tmp_path, jax_cache):
    done = subprocess.run(cli_command(2, tmp_path / "run", {"optim.lr": -1}), cwd=REPO, env=cli_env(jax_cache),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "invalid config: config.optim.lr: must be positive, got -1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, field", [("optim.projector_lr=nan", "optim.projector_lr"),
                                         ("train.spike_guard.decay=inf", "train.spike_guard.decay")])
def test_cli_non_finite_value_exits_2_naming_the_field(tmp_path, jax_cache, flag, field):
    command = cli_command(2, tmp_path / "run") + [f"--config.{flag}"]
    done = subprocess.run(command, cwd=REPO, env=cli_env(jax_cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"invalid config: config.{field}: must be a finite number")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_default_config_without_weights_stops_at_once_with_instructions(tmp_path, jax_cache):
    from llava_jax.train import model_init

    # Run from an empty folder: the recipe's relative weight and data paths do not exist there.
    command = [sys.executable, "-m", "llava_jax.train", f"--config={REPO}/configs/stage2.py",
               f"--workdir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(jax_cache), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    problems = model_init.missing_inputs(demo_config(2, None), f"{REPO}/configs/stage2.py")
    assert [p.split("=")[0] for p in problems] == ["model.clip_path", "model.llm_path", "data.json"]
    assert done.stderr.strip() == model_init.explain_missing(problems, f"{REPO}/configs/stage2.py", 2)
    for needed in ("model.clip_path='openai/clip-vit-large-patch14-336'", "model.llm_path='lmsys/vicuna-7b-v1.5'",
                   "--config=configs/stage2.py:demo"):
        assert needed in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()

