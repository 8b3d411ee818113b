"""Training configs of the AnyRes families: LLaVA-NeXT (`configs/next.py`) and LLaVA-OneVision
(`configs/onevision.py`), built on the LLaVA-1.5 configs of `recipes.py` (same fields, same validation) plus
the model family, its grid pinpoints, and the image layouts the input pipeline needs.

Machinery stages: `c.stage` 1 trains the projector from the towers (model.clip_path: CLIP or SigLIP,
model.llm_path); `c.stage` 2 starts from a stage-1 run's projector (model.stage1_workdir) or a finished model
(model.llava_path: the previous stage's Hugging Face export). `c.recipe_stage` names the recipe's stage.

Data fields for the AnyRes input pipeline (`vision_layout.ImageLayout`, all plain values):
  data.image_layout        a lone image: "single" (one tile, LLaVA-1.5 style), "anyres" (LLaVA-NeXT) or
                           "anyres_max_N" (OneVision; = model.vision_aspect_ratio)
  data.multi_image_layout  images of a multi-image sample: "anyres" (as a lone one), or "single_newline"
                           (OneVision: one tile each, a newline after it)
  data.video_frames        frames sampled per video (0: no videos); the one count sources and layouts read
  data.video_root          where video records' files are ("": below data.images)
  data.max_tiles_per_row   P, the tile slots of a batch row (packing); more tiles are a BadSample
  data.max_images_per_sample  images a sample may have (more: skipped, "too_many_images"); all of them in
                           data.multi_image_layout must fit data.max_tiles_per_row (single layouts: one tile
                           an image, anyres ones: up to 1 + the largest pinpoint grid each)
  data.tile_size, data.patch_size: the tower's (tiles of [3, S, S]); grid pinpoints: model.grid_pinpoints
"""

from __future__ import annotations

import ml_collections as mlc

from llava_jax.train import recipes

# LLaVA-NeXT (llava-v1.6-*): 336 px CLIP tiles, grids up to 2 x 2.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# LLaVA-OneVision: 384 px SigLIP tiles, every grid from 1 x 1 to 6 x 6 ("(1x1),...,(6x6)").
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
DEMO_TILE, DEMO_PATCH = 28, 7            # 4 x 4 = 16 features a tile
DEMO_PINPOINTS = ((28, 56), (56, 28), (56, 56))

# Trainable rules (regex over parameter paths, group). Stage 1: the projector only (image_newline unused by
# single tiles, frozen). Stage 2 (the LLaVA-NeXT repo's mm_tunable_parts "mm_vision_tower,mm_mlp_adapter,
# mm_language_model"): the tower at its own learning rate (optim.vision_lr), projector, LLM and image_newline
# (part of the language-model side there).
ANYRES_STAGE1_RULES = (
    ("vision_tower/.*", None),
    ("multi_modal_projector/.*", "projector"),
    ("image_newline", None),
    ("language_model/.*", None),
)
ANYRES_STAGE2_RULES = (
    ("vision_tower/.*", "vision"),
    ("multi_modal_projector/.*", "projector"),
    ("image_newline", "llm"),
    ("language_model/.*", "llm"),
)
# LoRA: adapters instead of the LLM (image_newline stays frozen, as in the repo's LoRA mode).
ANYRES_STAGE2_LORA_RULES = (
    ("vision_tower/.*", "vision"),
    ("multi_modal_projector/.*", "projector"),
    ("image_newline", None),
    ("language_model/.*/lora_[ab]", "lora"),
    ("language_model/(?!.*/lora_[ab]$).*", None),
)

NEXT_MODELS = {
    "vicuna7b": dict(llm_path="lmsys/vicuna-7b-v1.5", template="vicuna_v1", preset="llava_next_vicuna_7b"),
    "vicuna13b": dict(llm_path="lmsys/vicuna-13b-v1.5", template="vicuna_v1", preset="llava_next_vicuna_13b"),
    "mistral7b": dict(llm_path="mistralai/Mistral-7B-Instruct-v0.2", template="mistral_instruct",
                      preset="llava_next_mistral_7b"),
}
ONEVISION_MODELS = {
    "qwen7b": dict(llm_path="Qwen/Qwen2-7B-Instruct", preset="llava_onevision_qwen2_7b"),
    "qwen0_5b": dict(llm_path="Qwen/Qwen2-0.5B-Instruct", preset="llava_onevision_qwen2_0_5b"),
}
NEXT_STAGES = ("stage1", "stage2")
ONEVISION_STAGES = ("stage1", "stage1_5", "si", "ov")


def parse(arg: str | None, stages: tuple, models: tuple, default_stage: str, default_model: str,
          what: str) -> tuple[str, str, bool]:
    """'stage2,vicuna13b,lora' -> ('stage2', 'vicuna13b', True). Unknown or repeated words raise."""
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    unknown = [w for w in words if w not in stages + models + ("demo", "lora")]
    if unknown:
        raise ValueError(f"config string {arg!r}: unknown variant(s) {unknown}; {what} takes one stage of {stages}, "
                         f"one model of {models + ('demo',)} and optionally 'lora'")
    picked_stages, picked_models = [w for w in words if w in stages], [w for w in words if w in models + ("demo",)]
    if len(picked_stages) > 1 or len(picked_models) > 1:
        raise ValueError(f"config string {arg!r}: more than one stage or model")
    return (picked_stages[0] if picked_stages else default_stage,
            picked_models[0] if picked_models else default_model, "lora" in words)


def _base(stage: int, model: str, lora: bool) -> mlc.ConfigDict:
    """The LLaVA-1.5 config of the machinery stage (its data, optimizer, train and mesh fields)."""
    return recipes.stage_config(stage, ("demo" if model == "demo" else "vicuna7b") + (",lora" if lora else ""))


def _anyres_fields(c: mlc.ConfigDict, family: str, pinpoints, tile: int, patch: int) -> None:
    c.model.family = family
    c.model.grid_pinpoints = tuple(pinpoints)
    c.model.vision_feature_select_strategy = "default"
    c.data.tile_size, c.data.patch_size = tile, patch
    c.data.image_layout = "single"
    c.data.multi_image_layout = "anyres"
    c.data.video_frames = 0
    c.data.video_root = ""     # video files / frame folders ("": below data.images)
    c.data.max_tiles_per_row = c.data.max_images_per_row
    c.data.max_images_per_sample = 1    # single-image stages; ov and NeXT stage 2 take more
    c.trainable = ANYRES_STAGE1_RULES if c.stage == 1 else c.trainable


def _demo_fields(c: mlc.ConfigDict) -> None:
    """The tiny demo model on tiles of DEMO_TILE px (synthetic images of that size)."""
    c.model.grid_pinpoints = DEMO_PINPOINTS
    c.demo.image_size, c.demo.patch_size, c.demo.tower = DEMO_TILE, DEMO_PATCH, "clip"
    c.demo.varied_sizes = True            # images of DEMO_TILE x {1, 2} per side: AnyRes grids differ
    c.data.tile_size, c.data.patch_size = DEMO_TILE, DEMO_PATCH
    c.data.max_length = 512
    c.data.length_buckets = (128, 256, 384, 512)


def _stage2_anyres(c: mlc.ConfigDict, lora: bool, vision_lr: float) -> None:
    """The stage-2 rules; the tower at `vision_lr` (the demo's random tower at the run's lr)."""
    c.trainable = ANYRES_STAGE2_LORA_RULES if lora else ANYRES_STAGE2_RULES
    c.optim.vision_lr = -1.0 if c.model.preset == "demo" else vision_lr


def _recipe_base(stage_name: str, stage: int, model: str, lora: bool) -> mlc.ConfigDict:
    """`_base` of a parsed config string, named by it (LoRA is a stage-2 variant)."""
    if lora and stage == 1:
        raise ValueError("config string: 'lora' is a stage-2 variant (stage 1 trains only the projector)")
    c = _base(stage, model, lora)
    c.recipe_stage = stage_name
    c.variant = ",".join([stage_name, model] + ["lora"] * lora)
    return c


def next_config(arg: str | None = None) -> mlc.ConfigDict:
    """LLaVA-NeXT (LLaVA-1.6): stage 1 the projector on LCS-558K (single 336 px tiles, lr 1e-3, 256 samples
    a step); stage 2 the tower (lr 2e-6), projector and LLM (lr 2e-5, 128 samples a step) on AnyRes images
    (NEXT_PINPOINTS: a base tile plus up to 2 x 2 grid tiles)."""
    stage_name, model, lora = parse(arg, NEXT_STAGES, tuple(NEXT_MODELS), "stage2", "vicuna7b", "configs/next.py")
    stage = NEXT_STAGES.index(stage_name) + 1
    c = _recipe_base(stage_name, stage, model, lora)
    _anyres_fields(c, "llava_next", NEXT_PINPOINTS, 336, 14)
    if model != "demo":
        m = NEXT_MODELS[model]
        c.model.preset, c.model.llm_path = m["preset"], m["llm_path"]
        c.data.template = "plain" if stage == 1 else m["template"]
    else:
        _demo_fields(c)
    if stage == 2:
        c.data.json = c.data.json if model == "demo" else "data/llava_v1_6_760k.json"
        c.data.image_layout = c.data.multi_image_layout = "anyres"
        c.data.max_length = c.data.max_length if model == "demo" else 4096
        c.data.length_buckets = c.data.length_buckets if model == "demo" else (2048, 3072, 4096)
        c.data.max_tiles_per_row = 10     # two 5-tile images (base + 2 x 2) fill a 4096-token row
        c.data.max_images_per_sample = 2  # as many AnyRes images as those tile slots hold
        c.data.samples_per_row = 2.0      # estimate: ~1.5-2.9k tokens a sample at AnyRes
        c.train.global_batch_size = 64 if c.data.packing != "none" else c.train.global_batch_size
        _stage2_anyres(c, lora, vision_lr=2e-6)
    return c


def onevision_config(arg: str | None = None) -> mlc.ConfigDict:
    """LLaVA-OneVision (SigLIP so400m-384 + Qwen2, qwen_1_5): stage1 the projector on LCS-558K (single 384 px
    tiles, lr 1e-3); stage1_5 (high-quality knowledge), si (single image) and ov (single image, multi-image,
    video) the full model: tower lr 2e-6, projector and LLM lr 1e-5, anyres_max_9 over grids 1x1..6x6,
    multi-image samples as single tiles with a newline, videos of 32 frames (2 x 2 pooled)."""
    stage_name, model, lora = parse(arg, ONEVISION_STAGES, tuple(ONEVISION_MODELS), "si", "qwen7b",
                                    "configs/onevision.py")
    stage = 1 if stage_name == "stage1" else 2
    c = _recipe_base(stage_name, stage, model, lora)
    _anyres_fields(c, "llava_onevision", ONEVISION_PINPOINTS, 384, 14)
    c.model.vision_feature_select_strategy = "full"     # SigLIP: no CLS, all 27 x 27 patches
    c.model.vision_aspect_ratio = "anyres_max_9"
    c.model.clip_path = "" if model == "demo" else "google/siglip-so400m-patch14-384"
    c.data.template = "plain" if stage == 1 else "qwen_1_5"
    if model != "demo":
        m = ONEVISION_MODELS[model]
        c.model.preset, c.model.llm_path = m["preset"], m["llm_path"]
    else:
        _demo_fields(c)
        c.demo.tower = "siglip"
        c.model.vision_aspect_ratio = "anyres_max_2"
    if stage == 2:
        _onevision_stage2(c, stage_name, model, lora)
    return c


def _onevision_stage2(c: mlc.ConfigDict, stage_name: str, model: str, lora: bool) -> None:
    """Stages 1.5, si and ov: the full model at the paper's learning rates on AnyRes data."""
    if model != "demo":
        c.optim.lr = 2e-4 if lora else 1e-5
        c.optim.projector_lr = 2e-5 if lora else -1.0
    _stage2_anyres(c, lora, vision_lr=2e-6)
    c.data.image_layout = c.data.multi_image_layout = c.model.vision_aspect_ratio
    if stage_name == "ov":
        c.data.multi_image_layout = "single_newline"
        c.data.video_frames = 4 if model == "demo" else 32
        c.data.max_images_per_sample = 4 if model == "demo" else 12   # OneVision's multi-image data: up to 12
        if model == "demo":   # synthetic multi-image samples (2-3 scenes) and videos (frame folders) too
            c.demo.num_multi_image, c.demo.num_video = 800, 400
    if model == "demo":
        c.data.max_tiles_per_row = 8
        return
    c.data.json = {"stage1_5": "data/onevision_mid_stage.json", "si": "data/onevision_single_image.json",
                   "ov": "data/onevision_mix.json"}[stage_name]
    c.data.max_length = c.data.pack_length = 16384     # a 6x6 image: 729 x 10 tokens; 32 frames: 32 x 196
    c.data.length_buckets = (4096, 8192, 16384)
    c.data.max_tiles_per_row = 48      # a 6 x 6 grid and its base tile (37), or 32 frames, and a bit more
    c.data.samples_per_row = 4.0       # estimate
    c.train.global_batch_size = 64 if c.data.packing != "none" else 256
    c.train.microbatches = 2           # Qwen2-7B on v5p-64 (fsdp 32): 69 GB of 95 a chip (the planner), 1: 421


LAYOUTS = ("single", "anyres")


def validate(c: mlc.ConfigDict) -> None:
    """The AnyRes fields of a config (after `recipes.validate`), failing with the field's name."""
    need = recipes._need
    m, d = c.model, c.data
    pinpoints = tuple(tuple(p) for p in m.grid_pinpoints)
    need(bool(pinpoints) and all(len(p) == 2 and min(p) > 0 and not p[0] % d.tile_size and not p[1] % d.tile_size
                                 for p in pinpoints), "model.grid_pinpoints",
         f"must be (height, width) pairs, positive multiples of data.tile_size {d.tile_size}; got {m.grid_pinpoints}")
    need(m.vision_feature_select_strategy in ("default", "full"), "model.vision_feature_select_strategy",
         f"must be 'default' (CLIP) or 'full' (SigLIP), got {m.vision_feature_select_strategy!r}")
    need(0 < d.patch_size <= d.tile_size, "data.patch_size", f"must be in 1..data.tile_size, got {d.patch_size}")
    for field in ("image_layout", "multi_image_layout"):
        choices = LAYOUTS + (("single_newline",) if field == "multi_image_layout" else ())
        value = d[field]
        need(value in choices or _is_anyres_max(value), f"data.{field}",
             f"must be one of {choices} or 'anyres_max_N', got {value!r}")
    need(d.video_frames >= 0, "data.video_frames", f"must be >= 0, got {d.video_frames}")
    need(not d.video_frames or m.family == "llava_onevision", "data.video_frames",
         "videos are a LLaVA-OneVision feature (config.model.family 'llava_onevision')")
    need(d.max_tiles_per_row >= max(1, d.video_frames), "data.max_tiles_per_row",
         f"must hold a sample's tiles (>= 1, >= data.video_frames {d.video_frames}), got {d.max_tiles_per_row}")
    need(d.max_images_per_sample >= 1, "data.max_images_per_sample", f"must be >= 1, got {d.max_images_per_sample}")
    each = layout_max_tiles(d.multi_image_layout, pinpoints, d.tile_size)
    need(d.max_images_per_sample == 1 or d.max_images_per_sample * each <= d.max_tiles_per_row,
         "data.max_images_per_sample", f"{d.max_images_per_sample} images of up to {each} tile(s) each "
         f"(data.multi_image_layout {d.multi_image_layout!r}) exceed data.max_tiles_per_row {d.max_tiles_per_row}")


def layout_max_tiles(layout: str, pinpoints: tuple, tile_size: int) -> int:
    """The most tiles one image takes in a layout: 1 for single tiles, 1 + the largest pinpoint grid for
    "anyres" / "anyres_max_N" (N bounds the features kept, not the tiles)."""
    if layout in ("single", "single_newline"):
        return 1
    return 1 + max(h // tile_size * (w // tile_size) for h, w in pinpoints)


def _is_anyres_max(value: str) -> bool:
    digits = value[len("anyres_max_"):] if value.startswith("anyres_max_") else ""
    return digits.isdigit() and int(digits) > 0
