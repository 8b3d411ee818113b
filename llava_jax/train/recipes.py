"""Training configs as ml_collections ConfigDicts: the LLaVA-1.5 recipes, the demo, LoRA, and validation.

`configs/stage1.py` and `configs/stage2.py` call `stage_config(stage, arg)`. The config string `arg` is a
comma-separated list of variants: one model (`vicuna7b` (default), `vicuna13b`, `llama3_8b`, `demo`) and
optionally `lora` (stage 2) and `scienceqa` (stage 2: the ScienceQA fine-tuning of the paper), e.g.
`configs/stage2.py:vicuna13b,lora` or `configs/stage2.py:scienceqa`.
"""

from __future__ import annotations

import math

import ml_collections as mlc

from llava_jax.models.dtypes import DTYPES

MODELS = ("vicuna7b", "vicuna13b", "llama3_8b", "demo")
DATA_VARIANTS = ("scienceqa",)

# Trainable rules per stage: (regex over parameter paths, learning-rate group or None = frozen).
STAGE1_RULES = (
    ("vision_tower/.*", None),
    ("multi_modal_projector/.*", "projector"),
    ("language_model/.*", None),
)
STAGE2_RULES = (
    ("vision_tower/.*", None),
    ("multi_modal_projector/.*", "projector"),
    ("language_model/.*", "llm"),
)
# LoRA: adapters train, the base LLM weights stay frozen (merged into them on export).
STAGE2_LORA_RULES = (
    ("vision_tower/.*", None),
    ("multi_modal_projector/.*", "projector"),
    ("language_model/.*/lora_[ab]", "lora"),
    ("language_model/(?!.*/lora_[ab]$).*", None),
)
# The demo's towers start random, so its vision tower trains too (the real recipes freeze it).
DEMO_STAGE2_RULES = (
    ("vision_tower/.*", "vision"),
    ("multi_modal_projector/.*", "projector"),
    ("language_model/.*", "llm"),
)

_LLM = {
    "vicuna7b": dict(llm_path="lmsys/vicuna-7b-v1.5", preset="llava_1_5_7b"),
    "vicuna13b": dict(llm_path="lmsys/vicuna-13b-v1.5", preset="llava_1_5_13b"),
    "llama3_8b": dict(llm_path="meta-llama/Llama-3.1-8B-Instruct", preset="llava_llama3_8b"),
}


def parse_variants(arg: str | None) -> tuple[str, bool]:
    """'vicuna13b,lora' -> ('vicuna13b', True). Unknown words raise, naming the valid ones."""
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    unknown = [w for w in words if w not in MODELS + ("lora",) + DATA_VARIANTS]
    if unknown:
        raise ValueError(f"config string {arg!r}: unknown variant(s) {unknown}; choose one of {MODELS}, "
                         f"optionally with 'lora' and {DATA_VARIANTS} (e.g. 'vicuna13b,lora')")
    models = [w for w in words if w in MODELS]
    if len(models) > 1:
        raise ValueError(f"config string {arg!r}: more than one model {models}")
    return (models[0] if models else "vicuna7b"), "lora" in words


def _model(name: str) -> mlc.ConfigDict:
    m = mlc.ConfigDict()
    m.preset = "demo" if name == "demo" else _LLM[name]["preset"]
    # Where the towers come from (Hugging Face folders; hub names are the models to download first).
    m.clip_path = "" if name == "demo" else "openai/clip-vit-large-patch14-336"
    m.llm_path = "" if name == "demo" else _LLM[name]["llm_path"]
    m.llava_path = ""            # stage 2 from a finished Hugging Face LLaVA instead of stage 1
    m.stage1_workdir = ""        # stage 2: the stage-1 run whose projector to start from
    m.projector = "mlp2x_gelu"
    m.vision_feature_layer = -2
    m.dtype = "float32" if name == "demo" else "bfloat16"          # compute
    m.param_dtype = "float32"                                       # trainable master copy
    m.frozen_dtype = "float32" if name == "demo" else "bfloat16"   # storage of frozen parameters
    m.remat = "none" if name == "demo" else "full"
    m.attention_impl = "xla"     # "cudnn" on NVIDIA GPUs, "splash" on TPUs (`llava_jax.models.attention`)
    m.scan_layers = True
    return m


def _data(name: str, stage: int) -> mlc.ConfigDict:
    d = mlc.ConfigDict()
    if name == "demo":
        d.json = ""                  # empty: the embedded synthetic data, generated into <workdir>/data
        d.images = ""
    elif stage == 1:
        d.json = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
        d.images = "data/LLaVA-Pretrain/images"
    else:
        d.json = "data/llava_v1_5_mix665k.json"
        d.images = "data"
    d.extra_sources = []             # [{"json", "images", "weight"}]: mixtures
    d.weight = 1.0
    d.tfds_dir = ""                  # ArrayRecord shards built with llava_jax.data.tfds_builder
    d.tokenizer = ""                 # empty: the LLM checkpoint's tokenizer
    d.template = "plain" if stage == 1 else "v1"
    d.max_length = 160 if name == "demo" else 2048
    d.length_buckets = (96, 128, 160) if name == "demo" else (1024, 1536, 2048)
    d.image_aspect = "resize" if stage == 1 else "pad"
    # Packing (`llava_jax.data.packing`): several samples per row; then train.global_batch_size counts rows.
    # Stage 2: rows of 4096 tokens (positions restart per sample) reach ~0.95 real tokens per computed token
    # on a mix665k-like mix (length bucketing: ~0.52); 32 rows x ~3.65 samples ~ the recipe's 128 a step.
    # Stage 1 (576 image tokens + a short caption): rows of 2560 hold 4 samples (~0.93; 2048-token rows hold
    # 3, ~0.87), so 64 rows are the recipe's 256 samples and split evenly over up to 64 batch shards.
    d.packing = "none" if name == "demo" else "best_fit"
    d.pack_length = {1: 2560, 2: 4096}[stage]
    d.pack_window = 256              # samples the packer sees at a time
    d.max_images_per_row = {1: 4, 2: 6}[stage]
    d.samples_per_row = {1: 4.0, 2: 3.65}[stage]   # for the step count of an epoch
    d.group_by_modality_length = stage == 2 and d.packing == "none"
    d.worker_count = 0 if name == "demo" else 8
    d.strict = False
    d.eval_json = ""                 # held-out loss every `eval_every` steps when set
    d.eval_batches = 4
    return d


def batch_split_hint(c: mlc.ConfigDict) -> str:
    """What to change when the global batch does not split over the batch shards (for error messages)."""
    if c.data.packing != "none":
        return ("; with packing, train.global_batch_size counts rows: raise it to a multiple, pack shorter rows "
                "(--config.data.pack_length) for more rows of the same samples, or move devices to --mesh.tensor")
    return "; change --config.train.global_batch_size, or move devices to --mesh.tensor"


def stage_config(stage: int, arg: str | None) -> mlc.ConfigDict:
    name, lora = parse_variants(arg)
    if lora and stage == 1:
        raise ValueError("config string: 'lora' is a stage-2 variant (stage 1 trains only the projector)")
    c = mlc.ConfigDict()
    c.stage = stage
    c.variant = name + (",lora" if lora else "")
    c.model = _model(name)
    c.data = _data(name, stage)

    # quantize_base 8 / 4: QLoRA, the frozen language model stored int8 / int4 (`models.quant`); 0: off.
    c.lora = mlc.ConfigDict(dict(enabled=lora, rank=128, alpha=256.0, dropout=0.05, quantize_base=0,
                                 group_size=128))
    # A tuple of (regex, group) pairs, so `--config.trainable="(('.*', 'llm'),)"` works on the command line.
    c.trainable = tuple(STAGE1_RULES if stage == 1 else STAGE2_LORA_RULES if lora else
                        DEMO_STAGE2_RULES if name == "demo" else STAGE2_RULES)

    c.optim = mlc.ConfigDict()
    c.optim.lr = {1: 1e-3, 2: 2e-4 if lora else 2e-5}[stage]
    c.optim.projector_lr = 2e-5 if lora else -1.0     # -1: same as lr
    c.optim.vision_lr = -1.0
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8

    c.train = mlc.ConfigDict()
    c.train.global_batch_size = {1: 64, 2: 32}[stage] if c.data.packing != "none" else {1: 256, 2: 128}[stage]
    c.train.microbatches = 1
    c.train.num_epochs = 1
    c.train.num_steps = -1            # -1: num_epochs over the data
    c.train.seed = 0
    c.train.max_nonfinite = 10        # stop after that many non-finite steps in a row
    # Skip updates whose loss, gradient norm or update norm jumps `sigmas` std above its moving mean.
    c.train.spike_guard = mlc.ConfigDict(dict(enabled=False, sigmas=6.0, warmup_steps=100, decay=0.99,
                                              max_in_row=20))
    c.train.loss_chunk = 512          # positions per chunk of the output head in the loss

    c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = mlc.ConfigDict(dict(coordinator="", num_processes=-1, process_id=-1))

    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_every = 500
    c.export_hf = ""                  # write a Hugging Face LLaVA folder at the end
    c.peak_tflops = -1.0              # -1: from the device kind

    if name == "demo":
        _demo_overrides(c)
    if "scienceqa" in (arg or "").replace(" ", "").split(","):
        if stage != 2 or name == "demo":
            raise ValueError("config string: 'scienceqa' is a stage-2 variant of a real model")
        _scienceqa_overrides(c)
    return c


def _scienceqa_overrides(c: mlc.ConfigDict) -> None:
    """Fine-tuning on ScienceQA as the paper (official `scripts/finetune_sqa.sh`): the training split converted
    with `python -m llava_jax.data.scienceqa` (QCM-LEA), 12 epochs, lr 2e-5, the stage-2 batch (128 samples
    a step), images resized (no padding), no modality grouping. The paper's run used LLaVA v1 (CLIP-224,
    linear projector, Vicuna-13B v1.3): set `model.clip_path`, `model.projector` and `model.llm_path`."""
    c.variant += ",scienceqa"
    c.data.json = "data/scienceqa/llava_train_QCM-LEA.json"
    c.data.images = "data/scienceqa/images/train"
    c.data.image_aspect = "resize"
    c.data.group_by_modality_length = False
    c.train.num_epochs = 12


def _demo_overrides(c: mlc.ConfigDict) -> None:
    """A tiny model on the embedded synthetic data that learns on a 2-core CPU in minutes."""
    c.train.global_batch_size = 32
    c.train.num_epochs = 5
    c.optim.lr = 2e-3 if c.stage == 1 else 1e-3
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.0
    c.log_every = 20
    c.checkpoint_every = 200
    c.eval_every = 0
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.lora.rank, c.lora.alpha = 8, 16.0     # rank 128 would outweigh the tiny demo model
    c.demo = mlc.ConfigDict(dict(num_stage1=4000, num_stage2=4000, num_eval=400, image_size=32, patch_size=8,
                                 seed=0, num_multi_image=0, num_video=0,   # stage-2 media (OneVision ov)
                                 eval_batch_size=50,
                                 evaluate=c.stage == 2))


def _need(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}: {message}")


def float_fields(node, prefix: str = ""):
    """(dotted name, value) of every float in a config, nested dicts and lists (extra_sources) included."""
    items = node.items() if isinstance(node, (dict, mlc.ConfigDict)) else \
        enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else key
        if isinstance(value, float):
            yield name, value
        else:
            yield from float_fields(value, name)


def validate_numbers(c: mlc.ConfigDict) -> None:
    """Every float finite; learning rates, optimizer and spike-guard settings in their ranges."""
    for field, value in float_fields(c):
        _need(math.isfinite(value), field, f"must be a finite number, got {value}")
    o, guard = c.optim, c.train.spike_guard
    _need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    for group in ("projector_lr", "vision_lr"):
        _need(o[group] == -1 or o[group] > 0, f"optim.{group}",
              f"must be positive, or -1 (the same as optim.lr); got {o[group]} "
              "(to freeze a group, use config.trainable)")
    _need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(o.clip_norm > 0, "optim.clip_norm", f"must be positive, got {o.clip_norm}")
    for beta in ("b1", "b2"):
        _need(0 <= o[beta] < 1, f"optim.{beta}", f"must be in [0, 1), got {o[beta]}")
    _need(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _need(guard.sigmas > 0, "train.spike_guard.sigmas", f"must be positive, got {guard.sigmas}")
    _need(guard.warmup_steps >= 1, "train.spike_guard.warmup_steps", f"must be >= 1, got {guard.warmup_steps}")
    _need(0 < guard.decay < 1, "train.spike_guard.decay", f"must be in (0, 1), got {guard.decay}")
    _need(guard.max_in_row >= 1, "train.spike_guard.max_in_row", f"must be >= 1, got {guard.max_in_row}")
    _need(c.data.weight > 0, "data.weight", f"must be positive, got {c.data.weight}")
    for i, extra in enumerate(c.data.extra_sources):
        weight = extra.get("weight", 1.0)
        _need(weight > 0, f"data.extra_sources[{i}].weight", f"must be positive, got {weight}")
    _need(c.peak_tflops == -1 or c.peak_tflops > 0, "peak_tflops",
          f"must be positive, or -1 for the device kind's; got {c.peak_tflops}")
    if c.lora.enabled:
        _need(c.lora.rank > 0, "lora.rank", "must be positive")
        _need(c.lora.alpha > 0, "lora.alpha", f"must be positive, got {c.lora.alpha}")
        _need(0 <= c.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")


def validate(c: mlc.ConfigDict) -> None:
    """Fails before any device work, naming the field, on invalid or contradictory values."""
    need = _need
    validate_numbers(c)
    need(c.stage in (1, 2), "stage", f"must be 1 or 2, got {c.stage}")
    need(c.train.global_batch_size > 0, "train.global_batch_size", "must be positive")
    need(c.train.microbatches > 0 and c.train.global_batch_size % c.train.microbatches == 0,
         "train.microbatches", f"must divide train.global_batch_size ({c.train.global_batch_size})")
    need(c.train.num_steps > 0 or c.train.num_epochs > 0, "train.num_epochs",
         "set a positive train.num_epochs or train.num_steps")
    need(c.data.template in _templates(), "data.template", f"unknown template {c.data.template!r}; "
         f"choose one of {sorted(_templates())}")
    need(c.data.image_aspect in ("pad", "resize"), "data.image_aspect", "must be 'pad' or 'resize'")
    need(max(c.data.length_buckets) >= c.data.max_length, "data.length_buckets",
         f"the largest bucket must be >= data.max_length ({c.data.max_length})")
    need(c.model.dtype in DTYPES, "model.dtype", f"unknown dtype {c.model.dtype!r}")
    need(c.model.remat in _remat_policies(), "model.remat",
         f"unknown policy {c.model.remat!r}; choose one of {sorted(_remat_policies())}")
    need(c.model.attention_impl in ("xla", "cudnn", "splash"), "model.attention_impl",
         f"unknown kernel {c.model.attention_impl!r}; choose 'xla', 'cudnn' (NVIDIA GPUs) or 'splash' (TPUs)")
    need(c.data.packing in ("none", "first_fit", "best_fit"), "data.packing",
         f"unknown packing {c.data.packing!r}; choose 'none', 'first_fit' or 'best_fit'")
    if c.data.packing != "none":
        need(c.data.pack_length >= c.data.max_length, "data.pack_length",
             f"must be >= data.max_length ({c.data.max_length})")
        need(c.data.samples_per_row > 0, "data.samples_per_row", "must be positive")
    need(c.train.loss_chunk > 0, "train.loss_chunk", "must be positive")
    need(c.checkpoint_every > 0, "checkpoint_every", "must be positive")
    need(isinstance(c.keep_checkpoints, int) and c.keep_checkpoints >= 1, "keep_checkpoints",
         f"must be an integer >= 1 (the checkpoints a rerun resumes from), got {c.keep_checkpoints!r}")
    need(c.train.max_nonfinite >= 1, "train.max_nonfinite", f"must be >= 1, got {c.train.max_nonfinite}")
    need(c.log_every > 0, "log_every", "must be positive")
    need(not (c.model.llava_path and c.model.stage1_workdir), "model.llava_path",
         "set either model.llava_path or model.stage1_workdir, not both")
    if c.lora.enabled:
        need(c.stage == 2, "lora.enabled", "LoRA is for stage 2")
        need(c.lora.quantize_base in (0, 4, 8), "lora.quantize_base", "must be 0 (off), 8 or 4")
        need(c.lora.group_size > 0, "lora.group_size", "must be positive")
    else:
        need(not c.lora.quantize_base, "lora.quantize_base", "quantizes the base of a LoRA run: set lora.enabled")
    for i, rule in enumerate(c.trainable):
        need(len(rule) == 2, f"trainable[{i}]", f"must be (regex, group or None), got {rule!r}")
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    need(sizes.count(-1) <= 1 and all(s == -1 or s > 0 for s in sizes), "mesh",
         f"sizes must be positive with at most one -1, got {dict(c.mesh)}")


def _remat_policies():
    from llava_jax.models.layers import REMAT_POLICIES

    return REMAT_POLICIES


def _templates():
    from llava_jax.data.conversation import TEMPLATES

    return TEMPLATES
