"""Plans a training run before renting the hardware: compiles the real train step ahead of time from
abstract shapes (no weights, no data) on the target devices and reports memory, FLOPs, collectives and a
roofline step time per device.

    python -m llava_jax.plan --config=configs/stage2.py:lora --topology=v5p-64 --mesh.fsdp=32
    python -m llava_jax.plan --config=configs/stage2.py:demo --devices=cpu:8
    python -m llava_jax.plan --config=configs/stage2.py --topology=h100x8

TPU topologies compile through libtpu's ahead-of-time path on any host (`pip install -e '.[tpu]'`); GPU
hosts (`h100x8`) are estimated from a compile on as many fake CPU devices, with that GPU's figures.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from llava_jax import sharding
from llava_jax.data import batch as batch_spec
from llava_jax.train import model_init, recipes, setup


@dataclasses.dataclass(frozen=True)
class Chip:
    """Vendor figures of one device: dense bf16 FLOP/s, HBM bytes and bandwidth, interconnect bandwidth
    (bytes/s one way per device, all links)."""
    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    link_bandwidth: float
    cores_per_chip: int = 1     # TPU names count TensorCores (v4-8 = 4 chips); 1 where they count chips


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32e9, 1.2e12, 300e9, cores_per_chip=2),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, 200e9),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2.765e12, 600e9, cores_per_chip=2),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1.64e12, 448e9),
    "a100": Chip("A100 80GB", 312e12, 80e9, 2.039e12, 300e9),
    "h100": Chip("H100 SXM", 989e12, 80e9, 3.35e12, 450e9),
    "h200": Chip("H200 SXM", 989e12, 141e9, 4.8e12, 450e9),
    "cpu": Chip("CPU (fake devices)", 1e12, 16e9, 100e9, 10e9),
}
# libtpu topology names (3-D tori for v4/v5p, 2-D meshes for v5e/v6e) by chip count.
TPU_SHAPES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
        512: "8x8x8"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
TPU_PLATFORM = {"v4": ("v4", 3), "v5p": ("v5p", 3), "v5e": ("v5e", 2), "v6e": ("v6e", 2)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: chip figures and where the devices come from."""
    chip: Chip
    kind: str                   # "tpu" or "cpu" (fake host devices; also the GPU estimate)
    num_devices: int
    tpu_topology: str = ""      # e.g. "v5p:2x4x4"


def parse_target(topology: str, devices: str) -> Target:
    """`--topology` (v5p-64, v5e-256, v5p:2x2x2, h100x8) or `--devices` (cpu:8) -> Target; ValueError when
    invalid, naming the accepted forms."""
    if bool(topology) == bool(devices):
        raise ValueError("give exactly one of --topology (e.g. v5p-64, v5e-256, h100x8) and --devices (cpu:8)")
    if devices:
        match = re.fullmatch(r"cpu:(\d+)", devices)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"--devices={devices!r}: expected cpu:N (N fake CPU devices)")
        return Target(CHIPS["cpu"], "cpu", int(match.group(1)))
    name = topology.lower()
    gpu = re.fullmatch(r"(a100|h100|h200)x(\d+)", name)
    if gpu:
        return Target(CHIPS[gpu.group(1)], "cpu", int(gpu.group(2)))
    explicit = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if explicit:
        chips = int(np.prod([int(d) for d in explicit.group(2).split("x")]))
        return Target(CHIPS[explicit.group(1)], "tpu", chips, name)
    sized = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v5lite|v6e|v6)-(\d+)", name)
    if not sized:
        raise ValueError(f"--topology={topology!r}: expected a TPU slice (v4-32, v5p-64, v5e-256, v6e-64), an "
                         f"explicit libtpu topology (v5p:2x2x2) or a GPU host (a100x8, h100x8, h200x8)")
    family = ALIASES.get(sized.group(1), sized.group(1))
    chip = CHIPS[family]
    cores = int(sized.group(2))
    chips, rest = divmod(cores, chip.cores_per_chip)
    platform, dims = TPU_PLATFORM[family]
    if rest or chips not in TPU_SHAPES[dims]:
        known = sorted(n * chip.cores_per_chip for n in TPU_SHAPES[dims])
        raise ValueError(f"--topology={topology!r}: unknown {family} slice size; known sizes: "
                         f"{', '.join(f'{family}-{n}' for n in known)}")
    return Target(chip, "tpu", chips, f"{platform}:{TPU_SHAPES[dims][chips]}")


def target_devices(target: Target) -> list:
    """The devices to compile for: libtpu's abstract TPU devices, or this host's (fake) CPU devices."""
    if target.kind == "tpu":
        from jax.experimental import topologies

        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=target.tpu_topology)
        except Exception as e:  # libtpu missing or topology unknown to it
            raise ValueError(f"topology {target.tpu_topology}: libtpu cannot describe it ({e}); install the "
                             f"TPU extra: pip install -e '.[tpu]'") from None
        return list(desc.devices)
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_devices:
        raise ValueError(f"{target.num_devices} devices needed but this process has {len(cpus)} CPU devices; "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} before "
                         f"starting (python -m llava_jax.plan does it)")
    return cpus[:target.num_devices]


DEMO_VOCAB = 512


def model_config(c: mlc.ConfigDict, *, vocab_size: int = DEMO_VOCAB, image_token_index: int = 3):
    """The run's LlavaConfig (preset + runtime fields) without reading any checkpoint. The demo's vocabulary
    comes from its generated tokenizer: `vocab_size` and `image_token_index` stand for it (512 is of its
    order)."""
    from llava_jax.models.llava import PRESETS

    if model_init.family(c) != "llava":
        return anyres_model_config(c, vocab_size=vocab_size, image_token_index=image_token_index)
    if c.model.preset == "demo":
        cfg = model_init.demo_model_config(vocab_size=vocab_size, image_size=c.demo.image_size,
                                           image_token_index=image_token_index, patch_size=c.demo.patch_size)
    else:
        cfg = dataclasses.replace(PRESETS[c.model.preset], projector=c.model.projector,
                                  vision_feature_layer=c.model.vision_feature_layer)
    return model_init.with_runtime(cfg, c)


def anyres_model_config(c: mlc.ConfigDict, *, vocab_size: int, image_token_index: int):
    """An AnyRes run's config (LLaVA-NeXT / OneVision preset of `models.llava_next.PRESETS`, or the demo's)
    with the config's pinpoints, projector, feature layer and runtime fields; the demo's <video> follows
    its <image>."""
    from llava_jax.models.llava_next import PRESETS

    if c.model.preset == "demo":
        cfg = model_init.demo_anyres_config(c, vocab_size, image_token_index, image_token_index + 1)
    else:
        preset = PRESETS[c.model.preset]
        cfg = model_init.anyres_config(c, preset.vision, preset.text, image_token_index=preset.image_token_index,
                                       video_token_index=getattr(preset, "video_token_index", None))
    return model_init.with_runtime(cfg, c)


def abstract_model(c: mlc.ConfigDict, cfg):
    """The model as shapes only, with the LoRA adapters training attaches (over an int8 / int4 base with
    lora.quantize_base)."""
    from llava_jax.models.llava import LlavaForConditionalGeneration

    model_class = model_init.ANYRES_FAMILIES[model_init.family(c)][1] if model_init.family(c) != "llava" \
        else LlavaForConditionalGeneration

    def build():
        model = model_class(cfg, rngs=nnx.Rngs(c.train.seed))
        setup.attach_lora(c, model)
        return model

    return nnx.eval_shape(build)


@dataclasses.dataclass
class StepPlan:
    """The jitted train step and abstract (sharded) arguments to lower it with."""
    jitted: object
    args: tuple
    mesh: jax.sharding.Mesh
    model_cfg: object
    groups: dict
    batch_shapes: dict


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_layout(c: mlc.ConfigDict) -> tuple[int, int, int]:
    """(rows, tokens per row, image slots per row) of one global batch as the input pipeline feeds it:
    packed rows of `data.pack_length` tokens with `data.max_images_per_row` slots, else one image a row."""
    if model_init.family(c) != "llava":  # AnyRes: `images` are the row's tile slots
        return c.train.global_batch_size, c.data.pack_length if c.data.packing != "none" else c.data.max_length, \
            c.data.max_tiles_per_row
    if c.data.packing != "none":
        return c.train.global_batch_size, c.data.pack_length, c.data.max_images_per_row
    return c.train.global_batch_size, c.data.max_length, 1


def abstract_batch(c: mlc.ConfigDict, cfg, mesh) -> dict:
    """A global batch in `batch_layout` (the fields of `llava_jax.data.batch`), sharded over the batch axes."""
    b, t, images = batch_layout(c)
    s = cfg.vision.image_size
    layout = batch_spec.Layout(b, t, images, (3, s, s), packed=c.data.packing != "none",
                               anyres=model_init.family(c) != "llava")
    shapes = batch_spec.shapes(layout)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


PLAN_STEPS = 1000   # the schedule's length when the config counts epochs (the data is not read here)


def abstract_parts(c: mlc.ConfigDict, cfg, mesh) -> setup.Parts:
    """Training's split of the model (`setup.split_parts`), as shapes in their shardings on `mesh`."""
    parts = setup.split_parts(c, abstract_model(c, cfg))
    place = lambda tree: _with_shardings(tree, sharding.state_shardings(tree, mesh))
    return dataclasses.replace(parts, trainable=place(parts.trainable), frozen=place(parts.frozen),
                               rest=place(parts.rest))


def plan_step(c: mlc.ConfigDict, mesh: jax.sharding.Mesh, cfg=None) -> StepPlan:
    """The run's train step, built by training's own builders (`train.setup`) over abstract inputs on `mesh`.

    cfg: the model config (default `model_config(c)`)."""
    parts = abstract_parts(c, model_config(c) if cfg is None else cfg, mesh)
    tx = setup.make_optimizer(c, parts.groups, c.train.num_steps if c.train.num_steps > 0 else PLAN_STEPS)
    state = jax.eval_shape(setup.state_initializer(parts, tx, mesh), parts.trainable)
    jitted = setup.compile_step(c, parts, tx, mesh, state)
    batch = abstract_batch(c, parts.model_cfg, mesh)
    return StepPlan(jitted, (state, parts.frozen, parts.rest, batch), mesh, parts.model_cfg, parts.groups,
                    {k: v.shape for k, v in batch.items()})


def lower_and_compile(plan: StepPlan):
    with jax.set_mesh(plan.mesh):
        return plan.jitted.lower(*plan.args).compile()


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (\(.*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\((.*)$")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8\w*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*\{\s*$")
_WHILE = re.compile(r" while\(.*condition=%([\w.-]+), body=%([\w.-]+)")
_TRIP_COUNT = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CALL = re.compile(r"(?:to_apply|calls|body|branch_computations)=\{?%([\w.-]+)")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    dtype: str
    shapes: tuple          # the result arrays (one per operand of a combined collective)
    op_name: str           # the JAX operation it partitions (HLO metadata)

    @property
    def bytes(self) -> int:
        return sum(_BYTES.get(self.dtype, 1) * int(np.prod(s)) for s in self.shapes)


def trip_count(while_line: str, condition: list[str]) -> int:
    """A while loop's trip count: XLA's annotation, else the bound its condition compares the counter with
    (scans count from 0 by 1); 1 when unknown."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    bounds = [int(m) for line in condition for m in re.findall(r"s32\[\] constant\((\d+)\)", line)]
    return max(bounds) if bounds else 1


def parse_collectives(hlo_text: str) -> list[tuple[Collective, int]]:
    """Collectives of an HLO module with how many times one step runs each (while loops with a known trip
    count, e.g. the scanned layers, multiply their bodies)."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = bodies.setdefault(match.group(1), [])
            if line.startswith("ENTRY"):
                bodies["__entry__"] = current
        elif current is not None:
            current.append(line)
    counts: collections.Counter = collections.Counter()

    def visit(name: str, times: int, depth: int = 0):
        for line in bodies.get(name, ()):
            found = _COLLECTIVE.match(line)
            if found:
                arrays = _ARRAY.findall(found.group(1))
                op = re.search(r'op_name="([^"]*)"', line)
                shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays)
                counts[Collective(found.group(2), arrays[0][0] if arrays else "?", shapes,
                                  op.group(1) if op else "")] += times
                continue
            loop = _WHILE.search(line)
            if loop and depth < 8:
                visit(loop.group(2), times * trip_count(line, bodies.get(loop.group(1), ())), depth + 1)
            elif " call(" in line or " conditional(" in line:
                for callee in _CALL.findall(line):
                    visit(callee, times, depth + 1)

    visit("__entry__", 1)
    return sorted(counts.items(), key=lambda kv: -kv[0].bytes * kv[1])


@dataclasses.dataclass
class Report:
    """Per-device figures of one compiled step."""
    target: Target
    mesh_shape: dict
    params_bytes: float         # trainable (master copy) + frozen, this device's shards
    optimizer_bytes: float
    grads_bytes: float          # one gradient per trainable parameter (inside temporaries)
    temp_bytes: float           # activations and temporaries (compiler memory analysis)
    total_bytes: float          # arguments + temporaries + non-aliased outputs
    model_flops: float          # FlopModel count for the batch, per device
    compiler_flops: float       # cost_analysis()["flops"] of the per-device program
    hbm_bytes_accessed: float
    collectives: list
    compiler_error: str = ""    # the compiler's out-of-memory message, when it refused the program

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.total_bytes <= HEADROOM * self.target.chip.hbm_bytes

    def times(self) -> dict:
        chip = self.target.chip
        comm = sum(c.bytes * n * (2.0 if c.kind == "all-reduce" else 1.0) for c, n in self.collectives)
        return {"compute": max(self.model_flops, self.compiler_flops) / chip.peak_flops,
                "memory": self.hbm_bytes_accessed / chip.hbm_bandwidth, "comm": comm / chip.link_bandwidth}


HEADROOM = 0.9      # fits: at most 90% of HBM (the rest for the runtime, fragmentation, input buffers)


def _local_bytes(tree) -> float:
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += float(np.prod(shape)) * jax.dtypes.itemsize_bits(leaf.dtype) / 8  # int4: half a byte
    return total


def flops_per_device(c: mlc.ConfigDict, step: StepPlan, num_devices: int) -> float:
    """The FLOP model's count for a full batch, per device: every row all real tokens (packed rows: one causal
    square per row, an upper bound on what segment-aware kernels compute), every image slot encoded."""
    from llava_jax.train import metrics

    flop_model = metrics.FlopModel.for_groups(step.model_cfg, step.groups, c.lora.rank if c.lora.enabled else 0)
    b, t = step.batch_shapes["input_ids"]
    return flop_model.step_flops(np.full(b, t), int(np.prod(step.batch_shapes["image_mask"])),
                                 metrics.features_per_tile(step.model_cfg)) / num_devices


def report(c: mlc.ConfigDict, target: Target, step: StepPlan, compiled, hlo_text: str) -> Report:
    state, frozen, _, _ = step.args
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable = _local_bytes(state.trainable)
    flops = flops_per_device(c, step, target.num_devices)
    total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes \
        - memory.alias_size_in_bytes
    return Report(target, dict(step.mesh.shape), trainable + _local_bytes(frozen), _local_bytes(state.opt_state),
                  trainable, float(memory.temp_size_in_bytes), float(total), flops,
                  float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                  parse_collectives(hlo_text))


def format_report(r: Report, c: mlc.ConfigDict, top: int = 12) -> str:
    gb = lambda x: f"{x / 1e9:8.2f} GB"
    rows, tokens, images = batch_layout(c)
    times = r.times()
    estimate = max(times.values())
    lines = [f"target: {r.target.chip.name} x {r.target.num_devices}"
             + (f" ({r.target.tpu_topology})" if r.target.tpu_topology else " (fake-device CPU compile)")
             + f", mesh {r.mesh_shape}",
             f"batch: {rows} rows x {tokens} tokens, {images} image slot(s) a row"
             + (f" (packed: {c.data.packing})" if c.data.packing != "none" else "")
             + f", microbatches {c.train.microbatches},"
             f" remat {c.model.remat}, dtype {c.model.dtype}",
             "per device:",
             f"  parameters      {gb(r.params_bytes)}",
             f"  optimizer state {gb(r.optimizer_bytes)}",
             f"  gradients       {gb(r.grads_bytes)}   (inside temporaries)",
             f"  activations and temporaries {gb(r.temp_bytes)}",
             f"  total           {gb(r.total_bytes)} of {r.target.chip.hbm_bytes / 1e9:.0f} GB HBM: "
             + ("fits" if r.fits else "DOES NOT FIT") + f" (limit {HEADROOM:.0%})"]
    if r.compiler_error:
        lines.append(f"  compiler: {r.compiler_error[:200]}")
    if not r.fits:
        lines.append("  to fit: more fsdp (--mesh.fsdp), --config.model.remat=full, more "
                     "--config.train.microbatches, or a smaller --config.train.global_batch_size")
    lines += [f"  step FLOPs      {r.model_flops / 1e12:.2f} TFLOP model count, "
              f"{r.compiler_flops / 1e12:.2f} TFLOP compiler count (loop bodies once)",
              f"  roofline        compute {times['compute'] * 1e3:.1f} ms, HBM {times['memory'] * 1e3:.1f} ms, "
              f"collectives {times['comm'] * 1e3:.1f} ms -> step >= {estimate * 1e3:.1f} ms "
              f"({max(times, key=times.get)}-bound)",
              "collectives per step (kind, dtype, bytes per device, count, op):"]
    for col, n in r.collectives[:top]:
        lines.append(f"  {col.kind:<18} {col.dtype:<5} {col.bytes / 1e6:10.2f} MB x {n:<4} {col.op_name[-60:]}")
    if len(r.collectives) > top:
        rest = r.collectives[top:]
        lines.append(f"  ... {len(rest)} more kinds, {sum(c.bytes * n for c, n in rest) / 1e6:.2f} MB in all")
    return "\n".join(lines)


def apply_mesh(c: mlc.ConfigDict, mesh_flags: mlc.ConfigDict, num_devices: int) -> dict:
    """The mesh sizes: the config's, overridden by --mesh.* (0 keeps the config's); checked against the
    device count."""
    sizes = {k: int(mesh_flags[k]) or int(c.mesh[k]) for k in sharding.MESH_AXES}
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if list(sizes.values()).count(-1) == 1 and num_devices % known == 0:
        sizes = {k: (num_devices // known if s == -1 else s) for k, s in sizes.items()}
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"mesh {sizes}: data*fsdp*tensor must equal the {num_devices} devices of the target "
                         f"(set --mesh.data/--mesh.fsdp/--mesh.tensor; one may be -1)")
    batch_shards = sizes["data"] * sizes["fsdp"]
    if c.train.global_batch_size % (batch_shards * c.train.microbatches):
        raise ValueError(f"config.train.global_batch_size {c.train.global_batch_size} is not divisible by "
                         f"data*fsdp ({batch_shards}) x microbatches ({c.train.microbatches})"
                         f"{recipes.batch_split_hint(c)}")
    return sizes


def run(c: mlc.ConfigDict, target: Target, mesh_flags: mlc.ConfigDict) -> Report:
    """Compiles the step for `target` and returns its report (ValueError on an invalid target or mesh)."""
    recipes.validate(c)
    devices = target_devices(target)
    sizes = apply_mesh(c, mesh_flags, len(devices))
    mesh = sharding.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    step = plan_step(c, mesh)
    try:
        compiled = lower_and_compile(step)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return out_of_memory_report(c, target, step, str(e))
    return report(c, target, step, compiled, partitioned_hlo(compiled))


def out_of_memory_report(c: mlc.ConfigDict, target: Target, step: StepPlan, message: str) -> Report:
    """The compiler refused the program for the chip's HBM: a report from what its message says."""
    needed = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    temp = float(needed.group(1)) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[needed.group(2)] \
        if needed else float("nan")
    state, frozen, _, _ = step.args
    trainable = _local_bytes(state.trainable)
    arguments = trainable + _local_bytes(frozen) + _local_bytes(state.opt_state)
    flops = flops_per_device(c, step, target.num_devices)
    return Report(target, dict(step.mesh.shape), trainable + _local_bytes(frozen), _local_bytes(state.opt_state),
                  trainable, temp, arguments + temp, flops, 0.0, 0.0, [], compiler_error=message.splitlines()[0])


def partitioned_dumps(folder: str) -> list[str]:
    """The train step's HLO files written right after SPMD partitioning (CPU/GPU and TPU pass names)."""
    import glob
    import os

    return [f for pattern in ("*jit_step*after_spmd-partitioning*", "*jit_step*after_tpu-spmd-partitioning*")
            for f in glob.glob(os.path.join(folder, pattern))]


def partitioned_hlo(compiled) -> str:
    """The per-device program's HLO text as the SPMD partitioner wrote it, when `python -m llava_jax.plan`
    had it dumped (before backend passes: XLA:CPU widens bf16 collectives to float32 and the TPU compiler
    splits collectives into pipelined pieces, neither of which changes the bytes a step moves), else the
    compiled text."""
    import os

    dump = os.environ.get("LLAVA_PLAN_DUMP", "")
    files = partitioned_dumps(dump) if dump else []
    return open(max(files, key=os.path.getmtime)).read() if files else compiled.as_text()


def main() -> None:
    from llava_jax import cli

    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/stage2.py:lora.",
                                             lock_config=False)
    mesh = config_flags.DEFINE_config_dict("mesh", mlc.ConfigDict(dict(data=0, fsdp=0, tensor=0)),
                                           "Mesh sizes overriding the config's (0: the config's; one may be -1).")
    topology = flags.DEFINE_string("topology", "", "TPU slice (v5p-64, v5e-256, v5p:2x2x2) or GPU host (h100x8).")
    devices = flags.DEFINE_string("devices", "", "cpu:N: N fake CPU devices.")
    flags.mark_flags_as_required(["config"])

    def run_main(argv):
        del argv
        try:
            target = parse_target(topology.value, devices.value)
            print(format_report(run(config.value, target, mesh.value), config.value), flush=True)
        except (ValueError, OSError) as e:  # OSError: a missing config file
            cli.fail(cli.error_line(e))

    app.run(run_main)
