"""QLoRA: stage-2 LoRA over an int4 frozen base (dequantized per layer inside the step), adapters and Adam in
float32; the loss decreases, a resumed run matches an uninterrupted one bitwise, the export is a float folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from llava_jax.models import quant
from tests.train.test_loop import demo_config, demo_data, link_data, losses  # noqa: F401 (fixture)

STEPS = 8
VALUES = {"demo.num_stage1": 48, "demo.num_stage2": 48, "demo.num_eval": 4, "demo.evaluate": False,
          "train.global_batch_size": 4, "log_every": 1, "data.length_buckets": (160,), "train.num_steps": STEPS,
          "checkpoint_every": 2, "keep_checkpoints": 10, "lora.quantize_base": 4, "lora.group_size": 16,
          "optim.lr": 3e-3}


def qlora_config(**extra):
    c = demo_config(2, "demo,lora")
    for dotted, value in {**VALUES, **extra}.items():
        *parents, leaf = dotted.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


class Stop(Exception):
    pass


class Inspect:
    """Records the frozen parameters' dtypes and stops the run after step `stop_after` (its checkpoint)."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.frozen_dtypes, self.trainable_dtypes = stop_after, set(), set()

    def before_step(self, run, step, batch):
        self.frozen_dtypes = {x.dtype for x in jax.tree.leaves(run.frozen)}
        self.trainable_dtypes = {x.dtype for x in jax.tree.leaves(run.state.trainable)}

    def on_metrics(self, run, step, host, counts):
        pass

    def after_step(self, run, step):
        if step == self.stop_after:
            raise Stop()


@pytest.mark.slow
def test_qlora_trains_resumes_bitwise_and_exports_float(tmp_path, demo_data):  # noqa: F811
    from llava_jax.train import loop

    reference = tmp_path / "reference"
    link_data(reference, demo_data)
    hook = Inspect()
    result = loop.run(qlora_config(export_hf=str(tmp_path / "hf")), reference, hooks=[hook])
    assert jnp.dtype(jnp.int4) in hook.frozen_dtypes  # the base is stored int4 through training
    assert hook.trainable_dtypes == {jnp.dtype(jnp.float32)}  # adapters (and the projector) in float32
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert np.mean([expected[s] for s in (STEPS - 1, STEPS)]) < np.mean([expected[s] for s in (1, 2)]), expected

    interrupted = tmp_path / "interrupted"
    link_data(interrupted, demo_data)
    with pytest.raises(Stop):
        loop.run(qlora_config(), interrupted, hooks=[Inspect(stop_after=4)])
    loop.run(qlora_config(), interrupted)
    assert losses(interrupted) == expected  # bitwise: floats compared exactly

    merged = result["model"]
    assert quant.quantization_of(merged) is None
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    exported = hf.model.language_model.layers[1].self_attn.q_proj.weight.detach().numpy()
    ours = np.asarray(merged.language_model.model.layers.self_attn.q_proj.weight[...][1])
    np.testing.assert_array_equal(exported, ours)


def test_adapters_over_a_quantized_base_and_merge():
    """Adapters attach to int8 / int4 weights with their logical axes; `merged` folds them into the
    dequantized base and the forward pass is unchanged by the merge."""
    from flax import nnx

    from llava_jax.train import lora
    from tests.models.test_quant import tiny_llama

    for bits in (8, 4):
        model = lora.quantized_base(tiny_llama(0), bits, group_size=32)
        lora.add_adapters(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
        q_proj = model.model.layers.self_attn.q_proj
        assert q_proj.lora_a.get_metadata()["out_sharding"] == ("layers", "lora", "embed")
        q_proj.lora_b.set_value(jax.random.normal(jax.random.key(2), q_proj.lora_b.shape) * 0.1)
        ids = jnp.arange(12)[None] % 160
        out = lora.merged(model)
        assert quant.quantization_of(out) is None and quant.quantization_of(model) is not None
        delta = 2.0 * jnp.einsum("lor,lri->loi", q_proj.lora_b[...], q_proj.lora_a[...])
        np.testing.assert_allclose(out.model.layers.self_attn.q_proj.weight[...], q_proj.weight[...] + delta,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out(ids), model(ids), rtol=2e-4, atol=2e-4)
