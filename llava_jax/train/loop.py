"""The training run: config -> sharded model -> grain batches -> jitted steps -> checkpoints -> export."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llava_jax import sharding
from llava_jax.train import checkpoint as ckpt_lib
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import model_init, recipes
from llava_jax.train import optimizer as opt
from llava_jax.train import step as step_lib

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def maybe_initialize_distributed(c: mlc.ConfigDict) -> None:
    """jax.distributed.initialize when several processes run: explicit flags (`distributed.coordinator=
    HOST:PORT`, `num_processes`, `process_id`), or auto-detection (`coordinator=auto`, and by default on SLURM
    jobs with several tasks and on TPU pods)."""
    d = c.distributed
    check_distributed(d)
    if d.coordinator == "auto":
        jax.distributed.initialize()
    elif d.coordinator:
        jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def check_distributed(d: mlc.ConfigDict) -> None:
    """An explicit coordinator needs the process count and this process's id."""
    if not d.coordinator or d.coordinator == "auto":
        return
    if d.num_processes < 1:
        raise ValueError(f"config.distributed.num_processes: set it (>= 1) with distributed.coordinator="
                         f"{d.coordinator!r}, got {d.num_processes}")
    if not 0 <= d.process_id < d.num_processes:
        raise ValueError(f"config.distributed.process_id: must be in [0, {d.num_processes}), got {d.process_id}")


@dataclasses.dataclass
class DataSetup:
    iterator: object
    num_samples: int
    image_seq_length: int
    demo_paths: object = None


def prepare_demo_data(c: mlc.ConfigDict, workdir: Path):
    from llava_jax.data import synthetic

    root = workdir / "data"
    if not (root / "info.json").is_file():
        if jax.process_index() == 0:
            synthetic.generate(root, num_stage1=c.demo.num_stage1, num_stage2=c.demo.num_stage2,
                               num_eval=c.demo.num_eval, image_size=c.demo.image_size, seed=c.demo.seed)
        _barrier("demo-data")
    return synthetic.SyntheticPaths(root=root, images=root / "images", stage1=root / "stage1.json",
                                    stage2=root / "stage2.json", eval_questions=root / "eval_questions.jsonl",
                                    eval_answers=root / "eval_answers.jsonl", info=root / "info.json",
                                    tokenizer=root / "tokenizer")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def image_config(c: mlc.ConfigDict, model_cfg):
    from llava_jax.data.images import ImageConfig

    size = model_cfg.vision.image_size
    return ImageConfig(size=size, crop_size=size, aspect=c.data.image_aspect)


def make_sources(c: mlc.ConfigDict, demo_paths) -> tuple[list, list[float]]:
    from llava_jax.data.sources import LlavaJsonSource

    if demo_paths is not None:
        json_path = demo_paths.stage1 if c.stage == 1 else demo_paths.stage2
        return [LlavaJsonSource(json_path, demo_paths.images)], [1.0]
    if c.data.tfds_dir:
        from llava_jax.data.tfds_builder import TfdsLlavaSource
        main = TfdsLlavaSource(c.data.tfds_dir)
    else:
        main = LlavaJsonSource(c.data.json, c.data.images)
    sources, weights = [main], [float(c.data.weight)]
    for extra in c.data.extra_sources:
        sources.append(LlavaJsonSource(extra["json"], extra["images"]))
        weights.append(float(extra.get("weight", 1.0)))
    return sources, weights


def make_data(c: mlc.ConfigDict, tokenizer, model_cfg, demo_paths, seed_offset: int = 0) -> DataSetup:
    from llava_jax.data.pipeline import PipelineConfig, make_train_iterator

    sources, weights = make_sources(c, demo_paths)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token != model_cfg.image_token_index:
        raise ValueError(f"the tokenizer's <image> id {image_token} differs from the model's image_token_index "
                         f"{model_cfg.image_token_index} (check config.data.tokenizer)")
    pc = PipelineConfig(sources=tuple(sources), weights=tuple(weights) if len(sources) > 1 else None,
                        template=c.data.template, max_length=c.data.max_length,
                        length_buckets=tuple(c.data.length_buckets), global_batch_size=c.train.global_batch_size,
                        seed=c.train.seed + seed_offset, num_epochs=None,
                        group_by_modality_length=c.data.group_by_modality_length,
                        image_config=image_config(c, model_cfg), image_seq_length=model_cfg.image_seq_length,
                        image_token_id=image_token, strict=c.data.strict, worker_count=c.data.worker_count,
                        report_every=0)
    return DataSetup(make_train_iterator(pc, tokenizer), sum(len(s) for s in sources),
                     model_cfg.image_seq_length, demo_paths)


class HeldOut:
    """The held-out loss: token-weighted cross entropy over the first `data.eval_batches` batches of
    `data.eval_json` (images under `data.images`), the same batches every time."""

    def __init__(self, c: mlc.ConfigDict, tokenizer, model_cfg, demo_paths, graphdef, pad_token_id: int):
        import itertools

        from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
        from llava_jax.data.sources import LlavaJsonSource

        images = demo_paths.images if demo_paths is not None else c.data.images
        pc = PipelineConfig(sources=(LlavaJsonSource(c.data.eval_json, images),), template=c.data.template,
                            max_length=c.data.max_length, length_buckets=tuple(c.data.length_buckets),
                            global_batch_size=c.train.global_batch_size, seed=c.train.seed, num_epochs=None,
                            image_config=image_config(c, model_cfg), image_seq_length=model_cfg.image_seq_length,
                            image_token_id=model_cfg.image_token_index, worker_count=0, report_every=0)
        iterator = make_train_iterator(pc, tokenizer)
        self.batches = [common_length(b, pad_token_id) for b in itertools.islice(iterator, c.data.eval_batches)]
        self.step = jax.jit(step_lib.make_eval_step(graphdef, model_init.DTYPES[c.model.dtype]))

    def loss(self, trainable, frozen, rest, mesh) -> float:
        sums = [self.step(trainable, frozen, rest, to_global(b, mesh)) for b in self.batches]
        total = sum(float(s["loss_sum"]) for s in sums)
        return total / max(sum(int(s["count"]) for s in sums), 1)


def total_steps(c: mlc.ConfigDict, num_samples: int) -> int:
    if c.train.num_steps > 0:
        return int(c.train.num_steps)
    return max(1, int(c.train.num_epochs * num_samples // c.train.global_batch_size))


def group_specs(c: mlc.ConfigDict) -> dict[str, opt.GroupSpec]:
    o = c.optim
    pick = lambda v: o.lr if v is None or v <= 0 else v
    return {"llm": opt.GroupSpec(o.lr, o.weight_decay), "lora": opt.GroupSpec(o.lr, o.weight_decay),
            "projector": opt.GroupSpec(pick(o.projector_lr), o.weight_decay),
            "vision": opt.GroupSpec(pick(o.vision_lr), o.weight_decay)}


def restore_stage1_projector(model: nnx.Module, stage1_workdir: str) -> None:
    """Copies the projector of the latest stage-1 checkpoint into `model` (stage 2 start)."""
    checkpointer = ckpt_lib.Checkpointer(stage1_workdir)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{stage1_workdir}/checkpoints: no stage-1 checkpoint to start from")
        restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        checkpointer.close()
    saved = restored["state"]["trainable"].get("multi_modal_projector")
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


class Preemption:
    """SIGTERM -> save a checkpoint after the current step, then exit cleanly.

    One process: our own SIGTERM handler sets a flag. Several processes: JAX's preemption service (started by
    jax.distributed.initialize) spreads the notice and picks the same step on every process.
    """

    def __init__(self):
        self.requested = False
        self._multihost = jax.process_count() > 1
        self._previous = None if self._multihost else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step, on every process)."""
        if self._multihost:
            from jax.experimental import multihost_utils
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def to_global(batch: dict, mesh) -> dict:
    """This process's rows -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def common_length(local: dict, pad_token_id: int) -> dict:
    """Right-pads every process's token arrays [b, T] to the longest T of all processes (each process picks
    its length bucket from its own rows; the global batch needs one)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    length = local["input_ids"].shape[1]
    target = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    if target == length:
        return local
    fill = {"input_ids": pad_token_id, "labels": step_lib.IGNORE_INDEX, "attention_mask": 0}
    return {k: np.pad(v, ((0, 0), (0, target - length)), constant_values=fill[k]) if k in fill else v
            for k, v in local.items()}


def check_batch_layout(c: mlc.ConfigDict, mesh) -> None:
    """The global batch must split evenly over processes, batch shards and microbatches."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, n in (("processes", jax.process_count()), ("data*fsdp batch shards", shards),
                    ("train.microbatches * data*fsdp shards", c.train.microbatches * shards)):
        if c.train.global_batch_size % n:
            raise ValueError(f"config.train.global_batch_size: {c.train.global_batch_size} is not divisible by "
                             f"{n} ({name})")


def make_run_mesh(c: mlc.ConfigDict):
    try:
        return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    except ValueError as e:
        raise ValueError(f"config.{e}") from None


def gather_to_host(model: nnx.Module) -> nnx.Module:
    """The model with parameters sharded across processes gathered onto every host (a collective on
    several hosts; a no-op where this process can read every shard)."""
    if jax.process_count() == 1:
        return model
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(model)
    gather = lambda x: (multihost_utils.process_allgather(x, tiled=True)
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else x)
    return nnx.merge(graphdef, jax.tree.map(gather, state))


def run(c: mlc.ConfigDict, workdir: str | os.PathLike, *, config_name: str = "config") -> dict:
    """Trains per `c` in `workdir` (resuming from its latest checkpoint).

    Writes `<workdir>/metrics.jsonl` (one line per step: loss, grad_norm, supervised_tokens, skipped; and
    {"step", "eval_loss"} lines every `eval_every` steps when `data.eval_json` is set),
    TensorBoard logs, checkpoints and `result.json`. Returns {"step", "history" (the logged lines),
    "bad_samples", "model" (the final model, when training completed)}.
    Raises ValueError("config.<field>: ...") on bad settings, MissingInputs, NonFiniteError.
    """
    recipes.validate(c)
    problems = model_init.missing_inputs(c, config_name)
    if problems:
        raise model_init.MissingInputs(model_init.explain_missing(problems, config_name, c.stage))
    maybe_initialize_distributed(c)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    mesh = make_run_mesh(c)
    check_batch_layout(c, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))

    demo_paths = prepare_demo_data(c, workdir) if c.model.preset == "demo" else None
    tokenizer = model_init.load_tokenizer(c, demo_paths.tokenizer if demo_paths else None)
    model = model_init.build_model(c, mesh, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                   vocab_size=len(tokenizer),
                                   image_size=c.demo.image_size if demo_paths else None)
    if c.stage == 2 and c.model.stage1_workdir:
        restore_stage1_projector(model, c.model.stage1_workdir)
    if c.lora.enabled:
        from llava_jax.train import lora
        lora.add_adapters(model, rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                          rngs=nnx.Rngs(c.train.seed + 1))
    params = nnx.state(model, nnx.Param)
    groups = opt.resolve_groups(params, [tuple(r) for r in c.trainable])
    # The tower's output is cut from the gradient only when no rule trains the tower.
    vision_trained = any(g is not None for path, g in groups.items() if path.startswith("vision_tower/"))
    model.config = model_cfg = dataclasses.replace(model.config, freeze_vision_tower=not vision_trained)
    if is_main:
        print(opt.group_table(params, groups), flush=True)
    del params
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    del model
    trainable = jax.tree.map(lambda x: x.astype(model_init.DTYPES[c.model.param_dtype]), trainable)
    frozen = jax.tree.map(lambda x: x.astype(model_init.DTYPES[c.model.frozen_dtype])
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)

    data = make_data(c, tokenizer, model_cfg, demo_paths)
    steps = total_steps(c, data.num_samples)
    specs = group_specs(c)
    tx = opt.make_optimizer(groups, specs, total_steps=steps, warmup_ratio=c.optim.warmup_ratio,
                            clip_norm=c.optim.clip_norm, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda t: step_lib.init_state(t, tx),
                        out_shardings=step_lib.state_shardings(trainable, tx, mesh))(trainable)

    checkpointer = ckpt_lib.Checkpointer(workdir, keep=c.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state, meta = checkpointer.restore(start, ckpt_lib.abstract_like(state), data_iterator=data.iterator,
                                           global_batch_size=c.train.global_batch_size)
        if is_main:
            print(f"resumed from {workdir}/checkpoints step {start}", flush=True)

    compute_dtype = model_init.DTYPES[c.model.dtype]
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, microbatches=c.train.microbatches, compute_dtype=compute_dtype,
                                 dropout_seed=c.train.seed),
        mesh, shardings(state), shardings(frozen), shardings(rest))
    pad_token_id = _pad_token_id(tokenizer)
    held_out = HeldOut(c, tokenizer, model_cfg, demo_paths, graphdef, pad_token_id) \
        if c.data.eval_json and c.eval_every > 0 else None
    flop_model = metrics_lib.FlopModel.for_groups(model_cfg, groups, c.lora.rank if c.lora.enabled else 0)
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    reporter = metrics_lib.Reporter(total_steps=steps, start_step=start, every=c.log_every, writer=writer,
                                    peak_flops=metrics_lib.device_peak_flops(c.peak_tflops),
                                    num_devices=jax.device_count(), is_main=is_main)
    step_log = metrics_lib.StepLog(workdir / "metrics.jsonl", start_step=start, enabled=is_main)
    monitor = NonFiniteMonitor(int(state.nonfinite_streak), c.train.max_nonfinite, checkpointer)
    history = []

    def record(step: int, device_metrics, counts: dict) -> None:
        """Host-side bookkeeping of a finished step (runs one step behind the device)."""
        host = jax.device_get(device_metrics)
        reporter.add(**counts)
        values = {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"])}
        step_log.write({"step": step, **values, "supervised_tokens": int(host["supervised_tokens"]),
                        "skipped": not bool(host["finite"])})
        if reporter.due(step) or step == steps:
            lrs = opt.learning_rates({g: specs[g] for g in set(groups.values()) if g},
                                     step - 1, total_steps=steps, warmup_ratio=c.optim.warmup_ratio)
            history.append({"step": step, **reporter.emit(step, {**values, **{f"lr/{g}": v for g, v in
                                                                             sorted(lrs.items())}})})
        monitor.check(step, bool(host["finite"]))

    def evaluate(step: int) -> None:
        loss = held_out.loss(state.trainable, frozen, rest, mesh)
        step_log.write({"step": step, "eval_loss": loss})
        history.append({"step": step, **reporter.emit_eval(step, {"loss": loss})})

    preemption = Preemption()
    pending = None
    step = start
    try:
        with jax.set_mesh(mesh):
            while step < steps:
                t_wait = time.perf_counter()
                local = common_length(next(data.iterator), pad_token_id)
                data_wait = time.perf_counter() - t_wait
                state, m = train_step(state, frozen, rest, to_global(local, mesh))
                step += 1
                if pending is not None:  # The previous step, while this one runs.
                    record(*pending)
                lengths = local["attention_mask"].sum(axis=1)
                images = int(local["image_mask"].sum()) * jax.process_count()
                pending = (step, m, dict(
                    tokens=int(lengths.sum()) * jax.process_count(), images=images, data_wait=data_wait,
                    flops=flop_model.step_flops(lengths, images // jax.process_count(),
                                                data.image_seq_length) * jax.process_count()))
                if held_out is not None and (step % c.eval_every == 0 or step == steps):
                    record(*pending)
                    pending = None
                    evaluate(step)
                preempted = preemption.reached(step)
                if step % c.checkpoint_every == 0 or step == steps or preempted:
                    if pending is not None:
                        record(*pending)
                        pending = None
                    checkpointer.save(step, state, data_iterator=data.iterator,
                                      meta={"step": step, "bad_samples": data.iterator.bad_sample_counts()})
                if preempted:
                    checkpointer.wait()
                    if is_main:
                        print(f"preempted: checkpoint saved at step {step}; rerun the same command to resume",
                              flush=True)
                    break
            if pending is not None:
                record(*pending)
    finally:
        preemption.restore()
        reporter.close()
        step_log.close()
        checkpointer.close()
        if writer is not None:
            writer.close()

    result = {"step": step, "history": history, "bad_samples": data.iterator.bad_sample_counts(),
              "nonfinite_steps": int(state.nonfinite_total)}
    if is_main:
        write_result(workdir, result)
    if step >= steps:
        final = nnx.merge(graphdef, state.trainable, frozen, rest)
        if c.lora.enabled:
            from llava_jax.train import lora
            final = lora.merged(final)
        result["model"] = final
        if c.export_hf:
            gathered = gather_to_host(final)  # every process takes part; process 0 writes
            if is_main:
                from llava_jax import convert
                convert.to_hf(gathered, c.export_hf, tokenizer=tokenizer)
                print(f"exported Hugging Face LLaVA to {c.export_hf}", flush=True)
        if c.model.preset == "demo" and c.demo.evaluate:
            from llava_jax.train import demo
            result["demo_eval"] = demo.evaluate(final, tokenizer, data.demo_paths, c, workdir)
            if is_main:
                write_result(workdir, result)
    return result


def write_result(workdir: Path, result: dict) -> None:
    summary = {k: v for k, v in result.items() if k not in ("history", "model")}
    (workdir / "result.json").write_text(json.dumps(summary, indent=2, default=str))


class NonFiniteMonitor:
    """Counts consecutive steps whose update was skipped (non-finite loss or gradients) and stops the run
    after `limit` in a row."""

    def __init__(self, streak: int, limit: int, checkpointer: ckpt_lib.Checkpointer):
        self.streak, self.limit, self.checkpointer = streak, limit, checkpointer

    def check(self, step: int, finite: bool) -> None:
        self.streak = 0 if finite else self.streak + 1
        if finite:
            return
        logger.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, self.streak)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"step {step}: {self.streak} non-finite steps in a row (train.max_nonfinite={self.limit}); "
                f"stopping. Skipped steps leave the parameters unchanged; last checkpoint: "
                f"{self._last_checkpoint()}. Lower optim.lr, check the data, or compute in float32 "
                f"(--config.model.dtype=float32)")

    def _last_checkpoint(self) -> str:
        step = self.checkpointer.latest_step()
        return "none" if step is None else f"step {step} ({self.checkpointer.directory / str(step)})"


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    return 0 if pad is None else int(pad)
