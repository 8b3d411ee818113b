"""User errors of the training CLI are one line on stderr and exit 2: unknown flags and config fields, values
of the wrong type, broken config files and variants, a workdir that is a file, lies below one, or that the system
refuses."""

from __future__ import annotations

import subprocess
import sys

from tests.train.test_loop import REPO, cli_env, demo_data, jax_cache  # noqa: F401

CONFIG = f"{REPO}/configs/stage2.py:demo"


def cases(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "unknown_field": ([f"--config={CONFIG}", "--config.nope=1"], "unknown config field --config.nope"),
        "unknown_nested_field": ([f"--config={CONFIG}", "--config.optim.nope=1"],
                                 "unknown config field --config.optim.nope"),
        "wrong_type": ([f"--config={CONFIG}", "--config.optim.lr=abc"], "--config.optim.lr=abc"),
        "unknown_variant": ([f"--config={REPO}/configs/stage2.py:nope"], "unknown variant(s) ['nope']"),
        "missing_config_file": ([f"--config={REPO}/configs/nope.py"], "No such file or directory"),
        "unknown_flag": ([f"--config={CONFIG}", "--nope"], "Unknown command line flag 'nope'"),
        "no_config": ([], "--config"),
        "workdir_is_a_file": ([f"--config={CONFIG}", f"--workdir={tmp_path / 'a_file'}"],
                              f"--workdir {tmp_path / 'a_file'} is not a folder"),
        "workdir_below_a_file": ([f"--config={CONFIG}", f"--workdir={tmp_path / 'a_file' / 'run'}"],
                                 f"{tmp_path / 'a_file'} is not a folder"),
        "workdir_refused_by_the_system": ([f"--config={CONFIG}", "--workdir=/proc/llava_jax_run"],
                                          "/proc/llava_jax_run"),  # /proc takes no new folders, even from root
        "keep_no_checkpoint": ([f"--config={CONFIG}", "--config.keep_checkpoints=0",
                                f"--workdir={tmp_path / 'run'}"], "config.keep_checkpoints: must be an integer >= 1"),
    }


def test_user_errors_are_one_line_and_exit_2(tmp_path, jax_cache):
    runs = {name: (subprocess.Popen([sys.executable, "-m", "llava_jax.train", *args], cwd=tmp_path,
                                    env=cli_env(jax_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True), expected)
            for name, (args, expected) in cases(tmp_path).items()}
    for name, (process, expected) in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, err[-3000:])
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert expected in err, (name, err)
    assert not (tmp_path / "run").exists()


def test_strict_mode_stops_training_with_one_line_naming_the_sample(tmp_path, demo_data, jax_cache):
    """A corrupt image in the demo data with data.strict: exit 2, one line naming the sample and the reason."""
    import json
    import shutil

    from tests.train.test_loop import cli_command

    workdir = tmp_path / "run"
    shutil.copytree(demo_data, workdir / "data")
    first = json.loads((workdir / "data" / "stage1.json").read_text())[0]
    image = workdir / "data" / "images" / first["image"]
    image.write_bytes(image.read_bytes()[:40])  # truncated PNG
    done = subprocess.run(cli_command(1, workdir, {"data.strict": True, "train.num_steps": 12}), cwd=REPO,
                          env=cli_env(jax_cache), capture_output=True, text=True, timeout=400)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert last.startswith("bad sample (data.strict is set): sample ") and "[corrupt_image]" in last
    assert f"sample {str(first['id'])!r}" in last


def test_missing_config_file_is_one_line_naming_it(tmp_path, jax_cache):
    """Training and the planner: `error: ...configs/nope.py: No such file or directory`, no raw [Errno 2]."""
    for module, *more in (("llava_jax.train",), ("llava_jax.plan", "--devices=cpu:1")):
        done = subprocess.run([sys.executable, "-m", module, "--config=configs/nope.py", *more], cwd=REPO,
                              env=cli_env(jax_cache), capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (module, done.stderr[-3000:])
        assert done.stderr.count("\n") == 1 and "Errno" not in done.stderr, (module, done.stderr)
        assert done.stderr.startswith("error: ") and "configs/nope.py: No such file or directory" in done.stderr
