"""LoRA adapters against peft, configured as the official LLaVA does (LoraConfig over find_all_linear_names),
on tiny random transformers LLaMA and LLaVA models; stage-2 LoRA training rules and dropout."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llava_jax.convert as convert
from llava_jax.convert.hf_llava import llava_tensor_name_to_ours
from llava_jax.convert.params import state_dict
from llava_jax.train import lora, recipes
from llava_jax.train import optimizer as opt
from llava_jax.train import step as train_step
from tests.convert import helpers
from tests.data import official_llava

peft = pytest.importorskip("peft")

RANK, ALPHA = 5, 7.0
IMAGE = helpers.VOCAB - 1  # the tiny LLaVA's image_token_index
TARGET_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def official_target_modules(model: torch.nn.Module) -> list[str]:
    """The official `find_all_linear_names` (llava/train/train.py) on a transformers model."""
    return official_llava._modules()[1].find_all_linear_names(model)


def randomize_adapters_(peft_model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def peft_adapters(peft_model) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, 'self_attn.q_proj'): (A [r, in], B [out, r])} of every peft LoRA module."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layer, sub = re.search(r"layers\.(\d+)\.(.+)$", name).groups()
            out[int(layer), sub] = (module.lora_A["default"].weight.detach().numpy(),
                                    module.lora_B["default"].weight.detach().numpy())
    return out


def ours_by_name(model) -> dict[str, object]:
    """{'self_attn.q_proj': our stacked Linear} of the adapted Linears."""
    return {path.split("/layers/")[1].replace("/", "."): linear for path, linear in lora.adapted_linears(model)}


def copy_peft_adapters_(peft_model, model) -> None:
    """Copies peft's adapters into ours; the adapted module sets must be identical."""
    theirs, ours = peft_adapters(peft_model), ours_by_name(model)
    num_layers = 1 + max(layer for layer, _ in theirs)
    assert set(theirs) == {(layer, sub) for layer in range(num_layers) for sub in ours}
    for sub, linear in ours.items():
        linear.lora_a.set_value(jnp.asarray(np.stack([theirs[i, sub][0] for i in range(num_layers)])))
        linear.lora_b.set_value(jnp.asarray(np.stack([theirs[i, sub][1] for i in range(num_layers)])))


def torch_logits(model, **inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(peft LlamaForCausalLM as the official recipe wraps it, our LlamaForCausalLM with its adapters)."""
    path = tmp_path_factory.mktemp("llama")
    hf = helpers.save_tiny_llama(path)
    targets = official_target_modules(hf)
    assert set(targets) == TARGET_NAMES
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, bias="none",
                             task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf, config).eval()
    randomize_adapters_(reference, seed=1)
    model = lora.add_adapters(convert.from_hf(path, dtype=jnp.float32), rank=RANK, alpha=ALPHA, dropout=0.0,
                              rngs=nnx.Rngs(0))
    copy_peft_adapters_(reference, model)
    return reference, model, path


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(peft on the language model of a transformers LLaVA, our LLaVA with adapters, source dir)."""
    path = tmp_path_factory.mktemp("llava")
    hf = helpers.save_tiny_llava(path)
    targets = official_target_modules(hf.model.language_model)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                             target_modules=rf"model\.language_model\..*\.({'|'.join(targets)})")
    reference = peft.get_peft_model(hf, config).eval()
    randomize_adapters_(reference, seed=2)
    model = lora.add_adapters(convert.from_hf(path, dtype=jnp.float32), rank=RANK, alpha=ALPHA, dropout=0.0,
                              rngs=nnx.Rngs(0))
    copy_peft_adapters_(reference, model)
    return reference, model, path


def test_llama_logits_and_merge_match_peft(llama):
    reference, model, _ = llama
    ids = np.array([[0, 0, 5, 17, 3, 99, 42, 8], [1, 7, 9, 11, 200, 4, 6, 2]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch_logits(reference, input_ids=ids, attention_mask=mask)
    with reference.disable_adapter():
        base = torch_logits(reference, input_ids=ids, attention_mask=mask)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=2e-5 * np.abs(expected).max())
    assert np.abs(expected - base)[real].max() > 100 * 2e-5 * np.abs(expected).max()  # the adapters matter

    merged = lora.merged(model)
    reference_merged = copy.deepcopy(reference).merge_and_unload().state_dict()
    ours = state_dict(merged)
    assert set(ours) == set(reference_merged)  # no adapter tensors left
    for name, value in ours.items():
        np.testing.assert_allclose(value, reference_merged[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert len(list(lora.adapted_linears(model))) == len(TARGET_NAMES)  # the original keeps its adapters
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))[real],
                               got[real], atol=2e-5 * np.abs(expected).max())


def test_llava_logits_match_peft_and_merged_export_loads_in_transformers(llava, tmp_path):
    reference, model, _ = llava
    # Only the language model's Linears are adapted: not the vision tower's q/k/v, not the projector.
    paths = {path for path, _ in lora.adapted_linears(model)}
    assert {p.split("/")[-1] for p in paths} == TARGET_NAMES and all(p.startswith("model/layers/") for p in paths)
    assert not any("lora" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(
        nnx.state(model.vision_tower, nnx.Param)))
    ids, pix = helpers.image_ids([5, 9], [7, 8, 3], IMAGE), helpers.pixels()
    expected = torch_logits(reference, input_ids=ids, pixel_values=pix)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(pix))), expected,
                               atol=2e-5 * np.abs(expected).max())

    exported = convert.to_hf(lora.merged(model), tmp_path / "merged")
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(exported).eval()
    np.testing.assert_allclose(torch_logits(loaded, input_ids=ids, pixel_values=pix), expected,
                               atol=2e-5 * np.abs(expected).max())
    reference_merged = copy.deepcopy(reference).merge_and_unload().state_dict()
    ours = state_dict(lora.merged(model))
    merged_names = [n for n in reference_merged if "language_model" in n and n.endswith("_proj.weight")]
    assert len(merged_names) == len(TARGET_NAMES) * reference.config.text_config.num_hidden_layers
    for name in merged_names:
        np.testing.assert_allclose(ours[llava_tensor_name_to_ours(name)], reference_merged[name].numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=name)


def test_fresh_adapters_initialize_like_peft(tmp_path):
    hf = helpers.save_tiny_llama(tmp_path, num_hidden_layers=2)
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_NAMES)))
    base = convert.from_hf(tmp_path, dtype=jnp.float32)
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = np.asarray(base(ids))
    model = lora.add_adapters(base, rank=RANK, alpha=ALPHA, dropout=0.05, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model(ids)), before)  # B = 0: an identity start, as in peft
    theirs, ours = peft_adapters(reference), ours_by_name(model)
    for sub, linear in ours.items():
        a, b = np.asarray(linear.lora_a[...]), np.asarray(linear.lora_b[...])
        ref_a, ref_b = theirs[0, sub]
        assert a.shape == (2, *ref_a.shape) and b.shape == (2, *ref_b.shape), sub
        assert not b.any() and not ref_b.any()
        bound = 1 / np.sqrt(ref_a.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
        for values in (a, ref_a):
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.8 * bound, sub
        assert not np.array_equal(a[0], a[1])  # every layer draws its own
        assert linear.lora_scale == ALPHA / RANK
    q, down = ours["self_attn.q_proj"], ours["mlp.down_proj"]
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "lora", "embed")
    assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "heads", "lora")
    assert down.lora_a.get_metadata()["out_sharding"] == ("layers", "lora", "mlp")
    assert model.lm_head.lora_a is None


@pytest.fixture(scope="module")
def training(llava):
    """Stage-2 LoRA training of our LLaVA (adapters as in `llava`, dropout 0.5): the split state, optimizer,
    jitted train step and a batch with one image per row."""
    _, trained, path = llava
    model = lora.add_adapters(convert.from_hf(path, dtype=jnp.float32), rank=RANK, alpha=ALPHA, dropout=0.5,
                              rngs=nnx.Rngs(3))
    for (_, linear), (_, source) in zip(lora.adapted_linears(model), lora.adapted_linears(trained)):
        linear.lora_a.set_value(source.lora_a[...])
        linear.lora_b.set_value(source.lora_b[...])
    groups = opt.resolve_groups(nnx.state(model, nnx.Param), recipes.STAGE2_LORA_RULES)
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    tx = opt.make_optimizer(groups, {"lora": opt.GroupSpec(1e-2), "projector": opt.GroupSpec(1e-2)},
                            total_steps=3, warmup_ratio=0.0)
    ids = np.concatenate([helpers.image_ids([5], [7, 8, 9, 4], IMAGE), helpers.image_ids([6, 2], [3, 1, 9], IMAGE)])
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(np.where(ids == IMAGE, -100, ids)),
             "attention_mask": jnp.ones(ids.shape, jnp.int32),
             "pixel_values": jnp.asarray(helpers.pixels(2)).reshape(2, 1, 3, helpers.IMAGE_SIZE, -1),
             "image_mask": jnp.ones((2, 1), bool)}
    step_fn = jax.jit(train_step.make_train_step(graphdef, tx, compute_dtype=jnp.float32))
    return dict(model=model, groups=groups, split=(graphdef, trainable, frozen, rest), tx=tx, batch=batch,
                step_fn=step_fn)


def test_stage2_lora_rules_train_only_adapters_and_projector(training):
    model, groups, tx = training["model"], training["groups"], training["tx"]
    graphdef, trainable, frozen, rest = training["split"]
    trained = {name: group for name, group in groups.items() if group is not None}
    adapters = {f"language_model/{p}/{leaf}" for p, _ in lora.adapted_linears(model) for leaf in ("lora_a", "lora_b")}
    assert {n for n, g in trained.items() if g == "lora"} == adapters
    assert {n for n, g in trained.items() if g == "projector"} == {
        n for n in groups if n.startswith("multi_modal_projector/")}
    state = train_step.init_state(trainable, tx)
    # Adam keeps two moments per trainable value and nothing for the frozen weights.
    trainable_size = sum(x.size for x in jax.tree.leaves(trainable))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * trainable_size
    assert trainable_size < sum(x.size for x in jax.tree.leaves(frozen)) / 5

    new = state
    for _ in range(3):
        new, metrics = training["step_fn"](new, frozen, rest, training["batch"])
        assert bool(metrics["finite"])
    for (path, old), (_, value) in zip(nnx.to_flat_state(trainable), nnx.to_flat_state(new.trainable)):
        assert not np.array_equal(old.get_value(), value.get_value()), path
    after = nnx.merge(graphdef, new.trainable, frozen, rest)
    for (path, old), (_, value) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                       nnx.to_flat_state(nnx.state(after, nnx.Param))):
        if groups[opt.path_str(path)] is None:
            np.testing.assert_array_equal(value.get_value(), old.get_value())


def test_dropout_differs_per_step_and_is_off_in_eval(training, llava):
    _, without_dropout, _ = llava  # same weights, dropout 0: no Dropout module at all
    assert all(linear.lora_dropout is None for _, linear in lora.adapted_linears(without_dropout))
    graphdef, trainable, frozen, rest = training["split"]
    batch, model = training["batch"], training["model"]
    state = train_step.init_state(trainable, training["tx"])
    loss_at = lambda step: float(training["step_fn"](dataclasses.replace(state, step=jnp.int32(step)), frozen,
                                                     rest, batch)[1]["loss"])
    step0, again, step1 = loss_at(0), loss_at(0), loss_at(1)
    assert step0 == again and step0 != step1  # a fresh dropout mask per step, reproducible

    pixels = batch["pixel_values"].reshape(2, 3, helpers.IMAGE_SIZE, -1)
    logits = without_dropout(batch["input_ids"], pixels)
    loss_sum, count = train_step.token_cross_entropy(logits, batch["labels"])
    evaluated = train_step.make_eval_step(graphdef, compute_dtype=jnp.float32)(trainable, frozen, rest, batch)
    assert float(evaluated["loss_sum"]) == pytest.approx(float(loss_sum), rel=1e-5)  # eval: dropout off
    assert abs(step0 - float(loss_sum / count)) > 1e-3
    # Direct calls (generation) never drop; model.train() switches dropout on for them.
    text = jnp.where(batch["input_ids"] == IMAGE, 4, batch["input_ids"])
    reference = np.asarray(without_dropout(text))
    np.testing.assert_allclose(np.asarray(model(text)), reference, rtol=1e-5, atol=1e-5)
    model.train()
    assert not np.allclose(np.asarray(model(text)), reference, atol=1e-3)
    model.eval()
    np.testing.assert_allclose(np.asarray(model(text)), reference, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named(llama):
    _, model, _ = llama
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_adapters(model, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(0))
    plain = lora.merged(model)
    with pytest.raises(ValueError, match="rank"):
        lora.add_adapters(plain, rank=0, alpha=ALPHA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank 500 exceeds the size of model/layers/.*/\w+_proj.weight"):
        lora.add_adapters(plain, rank=500, alpha=ALPHA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        lora.add_adapters(plain, rank=RANK, alpha=ALPHA, dropout=1.0, rngs=nnx.Rngs(0))
    assert not list(lora.adapted_linears(plain))


SHARDED_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from llava_jax import sharding
    from llava_jax.train import lora

    config = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=44, num_hidden_layers=2,
                         num_attention_heads=2)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    model = sharding.create_sharded(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    lora.add_adapters(model, rank=4, alpha=6.0, rngs=nnx.Rngs(1))
    for path, linear in lora.adapted_linears(model):
        w, a, b = (tuple(v[...].sharding.spec) for v in (linear.weight, linear.lora_a, linear.lora_b))
        print(json.dumps([path, w, a, b]))
        linear.lora_b.set_value(jax.device_put(jnp.full(linear.lora_b.shape, 0.1), linear.lora_b[...].sharding))
    ids = jnp.arange(14, dtype=jnp.int32).reshape(2, 7)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state)
    local = jax.device_get(state)
    unsharded = nnx.merge(graphdef, local)(ids)
    print("same_logits", bool(np.allclose(sharded, unsharded, atol=1e-5)))
""")


def test_adapters_follow_the_base_weight_shardings():
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "same_logits True"
    specs = [json.loads(line) for line in lines[:-1]]
    assert len(specs) == len(TARGET_NAMES)
    for path, weight, lora_a, lora_b in specs:
        # [L, out, in] / [L, r, in] / [L, out, r]: tensor splits as in the base weight; fsdp takes the rank
        # unless the array's model dimension already has it: no adapter is replicated over fsdp.
        assert lora_a == [weight[0], "fsdp", weight[2] if weight[2] != "fsdp" else None], path
        assert lora_b == [weight[0], weight[1], None if weight[1] == "fsdp" else "fsdp"], path
        assert "fsdp" in weight and "tensor" in weight, path
