"""AnyRes training (LLaVA-NeXT / OneVision): the configs' trainable rules and learning rates are the recipes', and
a tiny NeXT model built and compiled by training's own setup pieces trains on hand-built AnyRes batches: the
loss falls, frozen parameters stay bitwise, the tower moves at its own learning rate."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from llava_jax import sharding
from llava_jax.models import llava_next
from llava_jax.train import anyres_recipes, inputs, model_init, optimizer as opt, recipes, setup
from llava_jax.train import checkpoint as ckpt_lib
from tests.models import anyres_batch as A

IMAGE, VIDEO, VOCAB = 61, 62, 64


def groups_of(c) -> dict[str, str | None]:
    """{parameter path: group} of the config's rules over its demo-sized model (shapes only)."""
    c = c.copy_and_resolve_references()
    if c.model.preset != "demo":
        c.model.preset = "demo"
        c.demo = anyres_recipes.recipes.stage_config(2, "demo").demo
        c.demo.image_size, c.demo.patch_size = c.data.tile_size // 12, 2
        c.model.grid_pinpoints = ((c.demo.image_size, 2 * c.demo.image_size),)
        c.demo.tower = "siglip" if c.model.family == "llava_onevision" else "clip"
    cfg = model_init.demo_anyres_config(c, VOCAB, IMAGE, VIDEO)

    def build():
        model = model_init.ANYRES_FAMILIES[c.model.family][1](cfg, rngs=nnx.Rngs(0))
        setup.attach_lora(c, model)
        return model

    model = nnx.eval_shape(build)
    return opt.resolve_groups(nnx.state(model, nnx.Param), [tuple(r) for r in c.trainable])


def by_part(groups: dict) -> dict[str, set]:
    parts = {"vision_tower": set(), "multi_modal_projector": set(), "image_newline": set(), "language_model": set(),
             "lora": set()}
    for path, group in groups.items():
        parts["lora" if "/lora_" in path else path.split("/")[0]].add(group)
    return parts


@pytest.mark.parametrize("family, arg, want", [
    ("next", "stage1", dict(vision={None}, projector={"projector"}, newline={None}, llm={None}, lrs=(1e-3, None))),
    ("next", "stage2", dict(vision={"vision"}, projector={"projector"}, newline={"llm"}, llm={"llm"},
                            lrs=(2e-5, 2e-6))),
    ("next", "stage2,mistral7b,lora", dict(vision={"vision"}, projector={"projector"}, newline={None}, llm={None},
                                           lrs=(2e-4, 2e-6))),
    ("onevision", "stage1", dict(vision={None}, projector={"projector"}, newline={None}, llm={None},
                                 lrs=(1e-3, None))),
    ("onevision", "stage1_5", dict(vision={"vision"}, projector={"projector"}, newline={"llm"}, llm={"llm"},
                                   lrs=(1e-5, 2e-6))),
    ("onevision", "ov,qwen0_5b", dict(vision={"vision"}, projector={"projector"}, newline={"llm"}, llm={"llm"},
                                      lrs=(1e-5, 2e-6))),
])
def test_recipe_trainable_rules_and_learning_rates(family, arg, want):
    c = (anyres_recipes.next_config if family == "next" else anyres_recipes.onevision_config)(arg)
    recipes.validate(c)
    anyres_recipes.validate(c)
    parts = by_part(groups_of(c))
    assert parts["vision_tower"] == want["vision"] and parts["multi_modal_projector"] == want["projector"]
    assert parts["image_newline"] == want["newline"] and parts["language_model"] == want["llm"]
    assert parts["lora"] == ({"lora"} if c.lora.enabled else set())
    specs, (lr, vision_lr) = setup.group_specs(c), want["lrs"]
    assert specs["llm"].lr == lr and (vision_lr is None or specs["vision"].lr == vision_lr)
    assert c.model.family == f"llava_{'next' if family == 'next' else 'onevision'}"


def test_recipe_data_fields():
    si, ov, nxt = (anyres_recipes.onevision_config("si"), anyres_recipes.onevision_config("ov"),
                   anyres_recipes.next_config("stage2"))
    assert (si.data.image_layout, si.data.video_frames, si.data.template) == ("anyres_max_9", 0, "qwen_1_5")
    assert (ov.data.multi_image_layout, ov.data.video_frames) == ("single_newline", 32)
    assert ov.model.vision_feature_select_strategy == "full" and len(ov.model.grid_pinpoints) == 36
    assert ov.data.max_tiles_per_row >= 37        # a 6 x 6 grid and its base tile
    assert nxt.data.image_layout == "anyres" and nxt.model.grid_pinpoints == anyres_recipes.NEXT_PINPOINTS
    assert anyres_recipes.next_config("stage1").data.image_layout == "single"
    images_per_sample = {arg: anyres_recipes.onevision_config(arg).data.max_images_per_sample
                         for arg in ("stage1", "stage1_5", "si", "ov", "ov,demo")}
    assert images_per_sample == {"stage1": 1, "stage1_5": 1, "si": 1, "ov": 12, "ov,demo": 4}
    assert (nxt.data.max_images_per_sample, anyres_recipes.next_config("stage1").data.max_images_per_sample) == (2, 1)


def test_bad_anyres_fields_are_named():
    c = anyres_recipes.next_config("stage2")
    c.data.video_frames = 8
    with pytest.raises(ValueError, match="config.data.video_frames: videos are a LLaVA-OneVision feature"):
        anyres_recipes.validate(c)
    c = anyres_recipes.onevision_config("ov")
    c.model.grid_pinpoints = ((384, 500),)
    with pytest.raises(ValueError, match="config.model.grid_pinpoints: must be .* multiples of data.tile_size 384"):
        anyres_recipes.validate(c)
    with pytest.raises(ValueError, match="unknown variant"):
        anyres_recipes.onevision_config("si,vicuna7b")
    c = anyres_recipes.onevision_config("ov")
    c.data.max_images_per_sample = 49      # 49 single tiles > 48 slots
    with pytest.raises(ValueError, match="config.data.max_images_per_sample: 49 images of up to 1 tile"):
        anyres_recipes.validate(c)
    c = anyres_recipes.next_config("stage2")
    c.data.max_images_per_sample = 3       # 3 AnyRes images of up to 5 tiles > 10 slots
    with pytest.raises(ValueError, match="3 images of up to 5 tile\\(s\\) each .*'anyres'.*data.max_tiles_per_row 10"):
        anyres_recipes.validate(c)
    c.data.max_images_per_sample = 0
    with pytest.raises(ValueError, match="config.data.max_images_per_sample: must be >= 1"):
        anyres_recipes.validate(c)


def demo_run(vision_lr: float, lr: float, scan_layers: bool = True):
    """NeXT stage-2 demo through setup's builders on one device; the LLM's embedding table frozen."""
    c = anyres_recipes.next_config("stage2,demo")
    c.model.scan_layers = scan_layers
    c.optim.lr, c.optim.vision_lr, c.optim.warmup_ratio, c.train.num_steps = lr, vision_lr, 0.0, 100
    c.trainable = (("vision_tower/.*", "vision"), ("multi_modal_projector/.*", "projector"),
                   ("image_newline", "llm"), ("language_model/model/embed_tokens/.*", None),
                   ("language_model/(?!model/embed_tokens/).*", "llm"))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = model_init.build_model(c, mesh, image_token_index=IMAGE, vocab_size=VOCAB)
    assert isinstance(model, llava_next.LlavaNextForConditionalGeneration)
    parts = setup.split_parts(c, model)
    tx = setup.make_optimizer(c, parts.groups, c.train.num_steps)
    with jax.set_mesh(mesh):
        state = setup.state_initializer(parts, tx, mesh)(parts.trainable)
    return c, mesh, parts, state, setup.compile_step(c, parts, tx, mesh, state)


def test_demo_next_trains_on_anyres_batches(tmp_path):
    c, mesh, parts, state, step = demo_run(vision_lr=1e-4, lr=1e-2)
    cfg = parts.model_cfg
    assert not cfg.freeze_vision_tower and cfg.tile_tokens == 16
    rng = np.random.default_rng(0)
    samples = [A.sample(cfg, rng, [(23, 60)]), A.sample(cfg, rng, [(47, 50), (60, 23)]), A.sample(cfg, rng),
               A.sample(cfg, rng, [(30, 29)])]
    batch = inputs.to_global(A.rows(cfg, [[s] for s in samples], 256, 10, packed=False), mesh)
    before = jax.tree.map(np.asarray, state.trainable)
    frozen = jax.tree.map(np.asarray, parts.frozen)
    losses = []
    for i in range(6):
        state, metrics = step(state, parts.frozen, parts.rest, batch)
        losses.append(float(metrics["loss"]))
        if i == 0:
            first = jax.tree.map(np.asarray, state.trainable)
    assert losses[-1] < 0.8 * losses[0], losses
    # Adam's first step moves each weight by about its group's learning rate (|m / sqrt(v)| = 1; float32
    # rounding of weights near 1 adds ~1e-7).
    moved = lambda part: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first[part]),
                                                                           jax.tree.leaves(before[part])))
    assert 0.5e-4 < moved("vision_tower") < 1.01e-4
    assert 0.5e-2 < moved("language_model") < 1.01e-2 and 0.5e-2 < moved("image_newline") < 1.01e-2
    assert "embed_tokens" in str(jax.tree_util.tree_structure(frozen))
    for a, b in zip(jax.tree.leaves(parts.frozen), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Resume: a checkpoint of step 6 restored continues exactly as the run itself.
    checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(int(state.step), state)
    checkpointer.wait()
    _, restored, _ = checkpointer.restore_latest(ckpt_lib.abstract_like(state))
    checkpointer.close()
    _, going_on = step(state, parts.frozen, parts.rest, batch)
    _, resumed = step(restored, parts.frozen, parts.rest, batch)
    assert float(resumed["loss"]) == float(going_on["loss"])


@pytest.mark.slow
def test_demo_next_lora_step_trains_adapters_tower_and_projector_only():
    c = anyres_recipes.next_config("stage2,demo,lora")
    c.train.num_steps, c.optim.warmup_ratio = 10, 0.0
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = model_init.build_model(c, mesh, image_token_index=IMAGE, vocab_size=VOCAB)
    setup.attach_lora(c, model)
    parts = setup.split_parts(c, model)
    assert set(parts.groups.values()) == {None, "vision", "projector", "lora"}
    tx = setup.make_optimizer(c, parts.groups, c.train.num_steps)
    with jax.set_mesh(mesh):
        state = setup.state_initializer(parts, tx, mesh)(parts.trainable)
    step = setup.compile_step(c, parts, tx, mesh, state)
    samples = [A.sample(parts.model_cfg, np.random.default_rng(i), [(23, 60)]) for i in range(2)]
    batch = inputs.to_global(A.rows(parts.model_cfg, [[s] for s in samples], 192, 4, packed=False), mesh)
    before = jax.tree.map(np.asarray, state.trainable)
    state, metrics = step(state, parts.frozen, parts.rest, batch)
    assert bool(metrics["finite"])
    flat = lambda tree: {opt.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}
    old, new = flat(before), flat(state.trainable)
    changed = {k: not np.array_equal(v, old[k]) for k, v in new.items()}
    assert all(v for k, v in changed.items() if k.startswith("multi_modal_projector/"))
    assert any(v for k, v in changed.items() if k.startswith("vision_tower/"))  # its last layer is unused (-2)
    assert any(v for k, v in changed.items() if k.endswith("lora_b"))    # lora_a follows once lora_b != 0
    assert all(k.endswith(("lora_a", "lora_b")) for k in changed if k.startswith("language_model/"))


@pytest.mark.parametrize("arg, family, tile_tokens", [("next", "stage2", 576), ("onevision", "si", 729)])
def test_planner_model_side_of_the_released_sizes(arg, family, tile_tokens):
    """The planner's abstract AnyRes run (no compile): the preset's model, tile slots and the taps fields."""
    from llava_jax.train import plan

    c = (anyres_recipes.next_config if arg == "next" else anyres_recipes.onevision_config)(family)
    cfg = plan.model_config(c)
    assert type(cfg).__name__ == ("LlavaNextConfig" if arg == "next" else "LlavaOnevisionConfig")
    assert cfg.tile_tokens == tile_tokens and cfg.image_grid_pinpoints == tuple(c.model.grid_pinpoints)
    batch = plan.abstract_batch(c, cfg, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    b, t, p = c.train.global_batch_size, c.data.pack_length, c.data.max_tiles_per_row
    s = cfg.vision.image_size
    assert batch["pixel_values"].shape == (b, p, 3, s, s) and batch["image_mask"].shape == (b, p)
    assert batch["image_taps_index"].shape == batch["image_taps_weight"].shape == (b, t, 4)
    assert batch["image_taps_index"].dtype == np.int32 and batch["segment_ids"].shape == (b, t)
    model = plan.abstract_model(c, cfg)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert (7.0e9 < params < 7.2e9) if arg == "next" else (8.0e9 < params < 8.1e9), params
