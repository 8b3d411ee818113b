"""The loop's seams: a `Hook` sees each step's host batch, the host metrics of each finished step (one step
behind the device, in order) and the step's end; `run` is setup -> train_loop -> finish."""

from __future__ import annotations

import numpy as np

from tests.train.test_configs import with_values
from tests.train.test_loop import demo_data, link_data, step_records  # noqa: F401 (fixture)


class Recorder:
    def __init__(self):
        self.calls = []

    def before_step(self, run, step, batch):
        self.calls.append(("before", step, tuple(batch["input_ids"].shape)))

    def on_metrics(self, run, step, host, counts):
        self.calls.append(("metrics", step, float(host["loss"]), counts["tokens"]))

    def after_step(self, run, step):
        self.calls.append(("after", step))


def test_hooks_see_every_step_in_order(tmp_path, demo_data):  # noqa: F811
    from llava_jax.train import loop

    c = with_values(1, {"demo.num_stage1": 48, "demo.num_stage2": 48, "demo.num_eval": 4, "demo.evaluate": False,
                        "train.global_batch_size": 4, "log_every": 1, "data.length_buckets": (160,),
                        "train.num_steps": 3, "checkpoint_every": 100})
    workdir = tmp_path / "run"
    link_data(workdir, demo_data)
    hook = Recorder()
    result = loop.run(c, workdir, hooks=[hook])
    assert result["step"] == 3 and "model" in result
    kinds = [(call[0], call[1]) for call in hook.calls]
    # Step n's metrics arrive once step n + 1 is dispatched; the last step's before its checkpoint.
    assert kinds == [("before", 1), ("after", 1), ("before", 2), ("metrics", 1), ("after", 2), ("before", 3),
                     ("metrics", 2), ("metrics", 3), ("after", 3)]
    assert all(call[2] == (4, 160) for call in hook.calls if call[0] == "before")
    logged = {r["step"]: r["loss"] for r in step_records(workdir)}
    seen = {call[1]: call[2] for call in hook.calls if call[0] == "metrics"}
    assert seen.keys() == logged.keys() == {1, 2, 3}
    np.testing.assert_allclose([seen[s] for s in (1, 2, 3)], [logged[s] for s in (1, 2, 3)], rtol=1e-6)
    assert all(call[3] > 0 for call in hook.calls if call[0] == "metrics")
