"""Training bounded by an epoch count (`train.num_steps=-1`): the run's steps are the epochs over the data
in global batches, read from the endless training stream."""

from tests.train.test_loop import demo_data, jax_cache, run_cli, step_records  # noqa: F401  (fixtures)


def test_an_epoch_count_sets_the_steps(tmp_path, demo_data, jax_cache):  # noqa: F811
    workdir = tmp_path / "run"
    run_cli(1, workdir, {"train.num_steps": -1, "train.num_epochs": 1, "train.global_batch_size": 16},
            demo_data=demo_data, jax_cache=jax_cache)
    steps = [r["step"] for r in step_records(workdir) if "loss" in r]
    assert steps == [1, 2, 3]  # 48 stage-1 samples, 16 a step
