"""A run's start: config checks, processes and mesh, model and tokenizer, trainable groups, optimizer, data,
checkpoint restore and the compiled step, gathered in one `Run`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from llava_jax.atomic_files import write_text
from llava_jax.data.tokenize import pad_token_id
from llava_jax.train import anyres_recipes
from llava_jax.train import checkpoint as ckpt_lib
from llava_jax.train import distributed, inputs, lora, model_init, phases, recipes, workdir_lock
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import optimizer as opt
from llava_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
    """Everything a run's loop and finish need; `state` (the trainable parameters and optimizer state) is the
    one field the loop replaces each step."""

    c: mlc.ConfigDict
    workdir: Path
    is_main: bool
    mesh: jax.sharding.Mesh
    tokenizer: object
    model_cfg: object
    groups: dict                    # parameter path -> optimizer group name (None: frozen)
    specs: dict                     # group name -> opt.GroupSpec
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    state: step_lib.TrainState
    frozen: object
    rest: object
    data: inputs.DataSetup
    steps: int                      # total steps of the run
    start: int                      # step restored from the latest checkpoint (0: fresh)
    checkpointer: ckpt_lib.Checkpointer
    train_step: object              # jitted (state, frozen, rest, batch) -> (state, metrics); state donated
    held_out: inputs.HeldOut | None
    flop_model: metrics_lib.FlopModel
    pad_token_id: int
    lock: workdir_lock.WorkdirLock  # this job's hold on the workdir


@dataclasses.dataclass
class Parts:
    """The model split for training: graphdef, trainable / frozen / other state, groups, final config."""

    graphdef: nnx.GraphDef
    trainable: object
    frozen: object
    rest: object
    groups: dict
    model_cfg: object


def setup(c: mlc.ConfigDict, workdir, *, config_name: str = "config") -> Run:
    """Checks the config, starts the processes, takes the workdir's lock (released on failure here, else by
    `Run.lock.release()`), builds everything and restores the latest checkpoint. Raises WorkdirLocked."""
    check_config(c, config_name)
    distributed.maybe_initialize_distributed(c)
    workdir = Path(workdir)
    mesh = distributed.make_run_mesh(c)
    distributed.check_batch_layout(c, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir_lock.acquire(workdir)
    try:
        return build_run(c, workdir, mesh, config_name, lock)
    except BaseException:
        lock.release()
        raise


def build_run(c: mlc.ConfigDict, workdir: Path, mesh, config_name: str, lock: workdir_lock.WorkdirLock) -> Run:
    is_main = jax.process_index() == 0
    if is_main:
        write_text(workdir / "config.json", c.to_json_best_effort(indent=2))
    demo_paths = phases.prepare_demo_data(c, workdir) if c.model.preset == "demo" else None
    tokenizer = model_init.load_tokenizer(c, demo_paths.tokenizer if demo_paths else None)
    parts = model_parts(c, mesh, tokenizer, demo_paths, is_main)
    data = inputs.make_data(c, tokenizer, parts.model_cfg, demo_paths)
    steps, specs = total_steps(c, data.num_samples), group_specs(c)
    tx = make_optimizer(c, parts.groups, steps)
    with jax.set_mesh(mesh):
        state = state_initializer(parts, tx, mesh)(parts.trainable)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=c.keep_checkpoints)
    start, state = restore_latest(c, workdir, checkpointer, state, data, is_main)
    pad_id = pad_token_id(tokenizer)
    held_out = inputs.HeldOut(c, tokenizer, parts.model_cfg, demo_paths, parts.graphdef, pad_id) \
        if c.data.eval_json and c.eval_every > 0 else None
    return Run(c=c, workdir=workdir, is_main=is_main, mesh=mesh, tokenizer=tokenizer, model_cfg=parts.model_cfg,
               groups=parts.groups, specs=specs, tx=tx, graphdef=parts.graphdef, state=state, frozen=parts.frozen,
               rest=parts.rest, data=data, steps=steps, start=start, checkpointer=checkpointer,
               train_step=compile_step(c, parts, tx, mesh, state), held_out=held_out,
               flop_model=flop_model(c, parts), pad_token_id=pad_id, lock=lock)


def check_config(c: mlc.ConfigDict, config_name: str) -> None:
    recipes.validate(c)
    if model_init.family(c) != "llava":
        anyres_recipes.validate(c)
    problems = model_init.missing_inputs(c, config_name)
    if problems:
        raise model_init.MissingInputs(model_init.explain_missing(problems, config_name, c.stage))


def model_parts(c: mlc.ConfigDict, mesh, tokenizer, demo_paths, is_main: bool) -> Parts:
    """Builds the sharded model (stage-1 projector, LoRA adapters), resolves the trainable rules and splits it."""
    video = model_init.video_token_id(tokenizer) if model_init.family(c) == "llava_onevision" else None
    model = model_init.build_model(c, mesh, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                   vocab_size=len(tokenizer),
                                   image_size=c.demo.image_size if demo_paths else None, video_token_index=video)
    if c.stage == 2 and c.model.stage1_workdir:
        restore_stage1_projector(model, c.model.stage1_workdir)
    attach_lora(c, model)
    return split_parts(c, model, show_groups=is_main)


def attach_lora(c: mlc.ConfigDict, model: nnx.Module) -> None:
    """The config's LoRA adapters, added to `model` in place (nothing when LoRA is off)."""
    if c.lora.enabled:
        lora.add_adapters(lora.quantized_base(model, c.lora.quantize_base, c.lora.group_size), rank=c.lora.rank,
                          alpha=c.lora.alpha, dropout=c.lora.dropout, rngs=nnx.Rngs(c.train.seed + 1))


def split_parts(c: mlc.ConfigDict, model: nnx.Module, *, show_groups: bool = False) -> Parts:
    """Resolves the trainable rules, sets the tower's freeze flag and splits `model` (arrays, or shapes under
    `nnx.eval_shape`) into trainable / frozen / other state in their storage dtypes."""
    params = nnx.state(model, nnx.Param)
    groups = opt.resolve_groups(params, [tuple(r) for r in c.trainable])
    # The tower's output is cut from the gradient only when no rule trains the tower.
    model.config = model_cfg = dataclasses.replace(model.config, freeze_vision_tower=not vision_trained(groups))
    if show_groups:
        print(opt.group_table(params, groups), flush=True)
    del params
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    del model
    param_dtype, frozen_dtype = model_init.DTYPES[c.model.param_dtype], model_init.DTYPES[c.model.frozen_dtype]
    trainable = jax.tree.map(lambda x: _as_dtype(x, param_dtype), trainable)
    frozen = jax.tree.map(lambda x: _as_dtype(x, frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          frozen)
    return Parts(graphdef, trainable, frozen, rest, groups, model_cfg)


def _as_dtype(x, dtype):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


def vision_trained(groups: dict) -> bool:
    return any(g is not None for path, g in groups.items() if path.startswith("vision_tower/"))


def flop_model(c: mlc.ConfigDict, parts: Parts) -> metrics_lib.FlopModel:
    return metrics_lib.FlopModel.for_groups(parts.model_cfg, parts.groups, c.lora.rank if c.lora.enabled else 0)


def total_steps(c: mlc.ConfigDict, num_samples: int) -> int:
    if c.train.num_steps > 0:
        return int(c.train.num_steps)
    samples_per_step = c.train.global_batch_size * (c.data.samples_per_row if c.data.packing != "none" else 1)
    return max(1, int(c.train.num_epochs * num_samples // samples_per_step))


def group_specs(c: mlc.ConfigDict) -> dict[str, opt.GroupSpec]:
    o = c.optim
    pick = lambda v: o.lr if v is None or v <= 0 else v
    return {"llm": opt.GroupSpec(o.lr, o.weight_decay), "lora": opt.GroupSpec(o.lr, o.weight_decay),
            "projector": opt.GroupSpec(pick(o.projector_lr), o.weight_decay),
            "vision": opt.GroupSpec(pick(o.vision_lr), o.weight_decay)}


def make_optimizer(c: mlc.ConfigDict, groups: dict, steps: int) -> optax.GradientTransformation:
    """The run's optimizer: AdamW per group with the schedule over `steps`, under the spike guard when on."""
    tx = opt.make_optimizer(groups, group_specs(c), total_steps=steps, warmup_ratio=c.optim.warmup_ratio,
                            clip_norm=c.optim.clip_norm, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
    return step_lib.maybe_spike_guard(tx, c.train.spike_guard)


def state_initializer(parts: Parts, tx: optax.GradientTransformation, mesh):
    """jitted trainable -> TrainState, the optimizer state placed in its parameters' shardings (apply it to
    arrays, or `jax.eval_shape` it for the sharded shapes)."""
    return jax.jit(lambda t: step_lib.init_state(t, tx),
                   out_shardings=step_lib.state_shardings(parts.trainable, tx, mesh))


def compile_step(c: mlc.ConfigDict, parts: Parts, tx: optax.GradientTransformation, mesh, state):
    """The jitted train step with explicit shardings: those of the state, frozen and other arrays as built
    (arrays or sharded shapes)."""
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    step = step_lib.make_train_step(parts.graphdef, tx, microbatches=c.train.microbatches,
                                    compute_dtype=model_init.DTYPES[c.model.dtype], dropout_seed=c.train.seed,
                                    loss_chunk=c.train.loss_chunk)
    return step_lib.jit_train_step(step, mesh, shardings(state), shardings(parts.frozen), shardings(parts.rest))


def restore_latest(c: mlc.ConfigDict, workdir: Path, checkpointer: ckpt_lib.Checkpointer, state,
                   data: inputs.DataSetup, is_main: bool):
    """(start step, state): the newest intact checkpoint's state and data position (damaged newer ones are
    moved aside with a warning), or (0, `state`) when there is none. Raises NoIntactCheckpoint."""
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state), data_iterator=data.iterator,
                                           global_batch_size=c.train.global_batch_size)
    if restored is None:
        return 0, state
    start, state, _ = restored
    if is_main:
        print(f"resumed from {workdir}/checkpoints step {start}", flush=True)
    return start, state


def restore_stage1_projector(model: nnx.Module, stage1_workdir: str) -> None:
    """Copies the projector of the newest intact stage-1 checkpoint into `model` (stage 2 start)."""
    checkpointer = ckpt_lib.Checkpointer(stage1_workdir)
    try:
        step, state = checkpointer.restore_newest_state()  # past damaged ones, with a warning
    except FileNotFoundError:
        raise FileNotFoundError(f"{stage1_workdir}/checkpoints: no stage-1 checkpoint to start from") from None
    finally:
        checkpointer.close()
    saved = state["trainable"].get("multi_modal_projector")
    if saved is None:
        raise ValueError(f"{stage1_workdir}/checkpoints/{step}: the stage-1 run did not train the projector")
    current = nnx.to_pure_dict(nnx.state(model.multi_modal_projector))
    saved = _without_value_keys(saved)
    if jax.tree.structure(saved) != jax.tree.structure(current):
        raise ValueError(f"{stage1_workdir}/checkpoints/{step}: projector {jax.tree.map(np.shape, saved)} does "
                         f"not match this model's {jax.tree.map(np.shape, current)}")
    nnx.update(model.multi_modal_projector, jax.tree.map(
        lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding), current, saved))


def _without_value_keys(tree):
    """Saved nnx states nest each array as {"value": array}; pure dicts hold the array itself."""
    if isinstance(tree, dict):
        return _without_value_keys(tree["value"]) if set(tree) == {"value"} else \
            {k: _without_value_keys(v) for k, v in tree.items()}
    return tree
