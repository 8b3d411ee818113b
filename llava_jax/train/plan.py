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
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.train import model_init, recipes
from llava_jax.train import optimizer as opt
from llava_jax.train import step as step_lib


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


def model_config(c: mlc.ConfigDict):
    """The run's LlavaConfig (preset + runtime fields) without reading any checkpoint."""
    from llava_jax.models.llava import PRESETS

    if c.model.preset == "demo":
        cfg = model_init.demo_model_config(vocab_size=c.plan_vocab_size if "plan_vocab_size" in c else 512,
                                           image_size=c.demo.image_size, image_token_index=3,
                                           patch_size=c.demo.patch_size)
    else:
        cfg = dataclasses.replace(PRESETS[c.model.preset], projector=c.model.projector,
                                  vision_feature_layer=c.model.vision_feature_layer)
    return model_init.with_runtime(cfg, c)


def abstract_model(c: mlc.ConfigDict, cfg):
    """The model as shapes only (LoRA adapters attached when the config asks)."""
    from llava_jax.models.llava import LlavaForConditionalGeneration

    def build():
        model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        if c.lora.enabled:
            from llava_jax.train import lora
            lora.add_adapters(model, rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                              rngs=nnx.Rngs(1))
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


def _with_shardings(tree, shardings, dtype_of=lambda x: x.dtype):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype_of(x), sharding=s), tree, shardings)


def abstract_batch(c: mlc.ConfigDict, cfg, mesh, max_images: int = 1) -> dict:
    """A global batch of `train.global_batch_size` rows of `data.max_length` tokens, one image slot each."""
    b, t, s = c.train.global_batch_size, c.data.max_length, cfg.vision.image_size
    shapes = {"input_ids": ((b, t), jnp.int32), "labels": ((b, t), jnp.int32),
              "attention_mask": ((b, t), jnp.int32), "pixel_values": ((b, max_images, 3, s, s), jnp.float32),
              "image_mask": ((b, max_images), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def plan_step(c: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> StepPlan:
    """Builds the run's train step (as the training loop does) over abstract inputs on `mesh`."""
    cfg = model_config(c)
    model = abstract_model(c, cfg)
    groups = opt.resolve_groups(nnx.state(model, nnx.Param), [tuple(r) for r in c.trainable])
    vision_trained = any(g is not None for path, g in groups.items() if path.startswith("vision_tower/"))
    model.config = cfg = dataclasses.replace(cfg, freeze_vision_tower=not vision_trained)
    graphdef, trainable, frozen, rest = opt.split_model(model, groups)
    param_dtype, frozen_dtype = model_init.DTYPES[c.model.param_dtype], model_init.DTYPES[c.model.frozen_dtype]
    floating = lambda x, d: d if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    trainable = _with_shardings(trainable, sharding.state_shardings(trainable, mesh), lambda x: param_dtype)
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh), lambda x: floating(x, frozen_dtype))
    rest = _with_shardings(rest, sharding.state_shardings(rest, mesh))
    specs = {g: opt.GroupSpec(1e-4) for g in ("llm", "lora", "projector", "vision")}
    tx = opt.make_optimizer(groups, specs, total_steps=1000, warmup_ratio=c.optim.warmup_ratio,
                            clip_norm=c.optim.clip_norm)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda t: step_lib.init_state(t, tx)).lower(trainable).compile()
    state_shardings = state.output_shardings
    abstract_state = _with_shardings(jax.eval_shape(lambda t: step_lib.init_state(t, tx), trainable),
                                     state_shardings)
    fn = step_lib.make_train_step(graphdef, tx, microbatches=c.train.microbatches,
                                  compute_dtype=model_init.DTYPES[c.model.dtype], dropout_seed=c.train.seed)
    jitted = step_lib.jit_train_step(fn, mesh, state_shardings, sharding_of(frozen), sharding_of(rest))
    batch = abstract_batch(c, cfg, mesh)
    return StepPlan(jitted, (abstract_state, frozen, rest, batch), mesh, cfg, groups,
                    {k: v.shape for k, v in batch.items()})


def sharding_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def lower_and_compile(plan: StepPlan):
    with jax.set_mesh(plan.mesh):
        return plan.jitted.lower(*plan.args).compile()
