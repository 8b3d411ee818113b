"""The AnyRes demos end to end: `train.inputs.make_data` builds the AnyRes batches of the NeXT demo exactly in
the `data.batch` contract (fast), the ov demo's pipeline keeps its multi-image and video samples, a finished
OneVision demo scores its held-out questions (`train.demo`), and the NeXT and OneVision demos train, resume and
export a folder transformers loads to our model's logits (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.train.test_loop import jax_cache, losses, run_cli  # noqa: F401 (fixtures)

AnyResDemo = {"next": "configs/next.py:demo", "onevision": "configs/onevision.py:ov,demo"}


def _demo_setup(tmp_path, config: str):
    import importlib.util

    from llava_jax.data import synthetic
    from llava_jax.train import model_init
    from tests.train.test_loop import REPO

    path, arg = config.split(":")
    spec = importlib.util.spec_from_file_location("anyres_cfg", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.train.global_batch_size = 4
    c.data.worker_count = 0
    media = dict(num_multi_image=6, num_video=4) if c.demo.num_multi_image else {}
    paths = synthetic.generate(tmp_path / "data", num_stage1=4, num_stage2=24, num_eval=2,
                               image_size=c.demo.image_size, varied_sizes=c.demo.varied_sizes,
                               template=c.data.template, **media)
    tokenizer = model_init.load_tokenizer(c, paths.tokenizer)
    video = model_init.video_token_id(tokenizer) if model_init.family(c) == "llava_onevision" else None
    cfg = model_init.demo_anyres_config(c, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), video)
    return c, tokenizer, cfg, paths


def test_make_data_builds_next_demo_batches_in_the_batch_contract(tmp_path):
    from llava_jax.data import batch as batch_spec
    from llava_jax.train import inputs

    c, tokenizer, cfg, paths = _demo_setup(tmp_path, AnyResDemo["next"])
    data = inputs.make_data(c, tokenizer, cfg, paths)
    assert data.image_seq_length == cfg.tile_tokens == 16   # FLOPs count tiles of 16 features each
    tiles_per_row = set()
    for _ in range(3):
        batch = next(data.iterator)
        tokens = batch["input_ids"].shape[1]
        layout = batch_spec.Layout(4, tokens, c.data.max_tiles_per_row, (3, 28, 28), anyres=True)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_spec.shapes(layout)
        tiles_per_row |= set(batch["image_mask"].sum(axis=1).tolist())
        taps = batch["image_taps_weight"].sum(axis=-1) > 0
        assert (batch["input_ids"][taps] == cfg.image_token_index).all()
    assert len(tiles_per_row - {0}) > 1, tiles_per_row   # images of varied sizes: different AnyRes grids


def _logits_check(name: str, export_dir, tokenizer_dir) -> None:
    """transformers' class loads the export and gives our model's logits on one image of a new size."""
    import transformers
    from PIL import Image

    import llava_jax.convert as convert
    from llava_jax.models import llava_next
    from tests.models import anyres_helpers as H

    model_class = {"next": transformers.LlavaNextForConditionalGeneration,
                   "onevision": transformers.LlavaOnevisionForConditionalGeneration}[name]
    hf, info = model_class.from_pretrained(export_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = convert.from_hf(export_dir, dtype="float32")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8))
    pixels = dict(transformers.AutoImageProcessor.from_pretrained(export_dir)([image], return_tensors="np"))
    index, _, _ = llava_next.image_taps(ours.config, [(40, 50)])
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tok("what shape is it?")["input_ids"]
    ids = np.array([[ours.config.image_token_index] * len(index) + text], np.int32)
    inputs = {**pixels, "input_ids": ids, "attention_mask": np.ones_like(ids)}
    H.assert_close(H.our_logits(ours, inputs), H.torch_logits(hf.eval(), inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AnyResDemo))
def test_anyres_demo_trains_resumes_and_exports_for_transformers(name, tmp_path, jax_cache):
    from tests.train.test_loop import REPO

    workdir = tmp_path / name
    flags = {"demo.num_stage1": 16, "demo.num_stage2": 48, "demo.num_eval": 4, "train.global_batch_size": 4,
             "log_every": 1, "checkpoint_every": 2}
    config = f"{REPO}/{AnyResDemo[name]}"
    first = run_cli(config, workdir, {**flags, "train.num_steps": 2}, demo_data=None, jax_cache=jax_cache,
                    variant="")
    assert "held-out accuracy" in first.stdout and (workdir / "demo_eval.json").is_file()
    done = run_cli(config, workdir, {**flags, "train.num_steps": 4, "export_hf": workdir / "hf"}, demo_data=None,
                   jax_cache=jax_cache, variant="")
    assert f"resumed from {workdir / 'checkpoints'} step 2" in done.stdout
    assert sorted(losses(workdir)) == [1, 2, 3, 4] and all(np.isfinite(list(losses(workdir).values())))
    assert json.loads((workdir / "result.json").read_text())["step"] == 4
    _logits_check(name, workdir / "hf", workdir / "data" / "tokenizer")


def test_onevision_layouts_and_sources_read_one_frame_count(tmp_path):
    from llava_jax.train import inputs

    c, _, cfg, paths = _demo_setup(tmp_path, AnyResDemo["onevision"])
    layouts = inputs.anyres_layouts(c, cfg)
    (source,), _ = inputs.make_sources(c, paths)
    assert c.data.video_frames == layouts.video_frames == source.video_frames == 4
    assert (layouts.image.max_tiles, layouts.multi_image.kind, layouts.multi_image.newline) == (2, "single", True)
    assert layouts.video.kind == "video" and layouts.video_token_id == cfg.video_token_index
    c.data.tile_size = 56
    with pytest.raises(ValueError, match="config.data.tile_size"):
        inputs.anyres_layouts(c, cfg)


def test_ov_demo_pipeline_keeps_a_multi_image_sample_as_single_tiles(tmp_path):
    """data.max_images_per_sample of the ov demo (4): a 3-image sample is batched, one tile + newline an image."""
    from llava_jax.data.pipeline import make_train_iterator
    from llava_jax.data.sources import LlavaJsonSource
    from llava_jax.train import inputs

    c, tokenizer, cfg, paths = _demo_setup(tmp_path, AnyResDemo["onevision"])
    names = sorted(p.name for p in paths.images.glob("stage2_*.png"))[:3]
    record = {"id": "three", "image": names, "conversations": [
        {"from": "human", "value": "<image>\n<image>\n<image>\nWhat shape is in the image?"},
        {"from": "gpt", "value": "circle"}]}
    (tmp_path / "multi.json").write_text(json.dumps([record]))
    source = LlavaJsonSource(tmp_path / "multi.json", paths.images)
    pc = inputs.pipeline_config(c, cfg, (source,), num_epochs=1, worker_count=0)
    iterator = make_train_iterator(pc, tokenizer)
    batch = next(iterator)
    assert iterator.bad_sample_counts() == {}
    assert batch["image_mask"][0].sum() == 3              # one tile an image (single_newline)
    image_tokens = int((batch["input_ids"][0] == cfg.image_token_index).sum())
    assert image_tokens == 3 * (cfg.tile_tokens + 1)      # 16 features and a newline an image
    c.data.max_images_per_sample = 2
    pc = inputs.pipeline_config(c, cfg, (source,), num_epochs=1, worker_count=0)
    iterator = make_train_iterator(pc, tokenizer)
    with pytest.raises(StopIteration):
        next(iterator)
    assert iterator.bad_sample_counts() == {"too_many_images": 1}


def test_ov_demo_trains_on_single_images_multi_image_and_video_samples(tmp_path):
    """One pass of the ov demo's stage-2 file: every sample batched (none dropped), no <unk> (its tokenizer covers
    the qwen_1_5 template); the multi-image rows hold one tile an image, the video rows its 4 sampled frames
    under <video> tokens."""
    from llava_jax.data.pipeline import make_train_iterator
    from llava_jax.train import inputs

    c, tokenizer, cfg, paths = _demo_setup(tmp_path, AnyResDemo["onevision"])
    sources, _ = inputs.make_sources(c, paths)
    pc = inputs.pipeline_config(c, cfg, sources, num_epochs=1, worker_count=0)
    iterator = make_train_iterator(pc, tokenizer)
    videos, image_counts = 0, []
    for batch in iterator:
        for row in range(len(batch["input_ids"])):
            ids, tiles = batch["input_ids"][row], int(batch["image_mask"][row].sum())
            assert tokenizer.unk_token_id not in ids and tokenizer.unk_token_id not in batch["labels"][row]
            video_tokens = int((ids == cfg.video_token_index).sum())
            if video_tokens:
                videos += 1
                assert tiles == c.data.video_frames == 4 and video_tokens == 4 * 4 + 1   # 2 x 2 pooled + newline
            elif tiles:
                image_counts.append((tiles, int((ids == cfg.image_token_index).sum())))
    assert iterator.bad_sample_counts() == {}
    assert videos == 4
    multi = [(tiles, tokens) for tiles, tokens in image_counts if tokens == tiles * (cfg.tile_tokens + 1)]
    assert len(multi) == 6 and {tiles for tiles, _ in multi} <= {2, 3}   # a tile of 16 features + newline each
    assert len(image_counts) - len(multi) == 24 - 1     # the single images (one of 24 samples is text-only)


def test_anyres_demo_ends_with_its_held_out_accuracy(tmp_path, jax_cache):
    """A 2-step ov demo answers every held-out question with its images and with blank ones (the evaluation
    runner, AnyRes generation) and writes the scores of those answers to demo_eval.json."""
    from tests.train.test_loop import REPO

    workdir = tmp_path / "ov"
    flags = {"demo.num_stage1": 4, "demo.num_stage2": 12, "demo.num_multi_image": 4, "demo.num_video": 4,
             "demo.num_eval": 6, "demo.eval_batch_size": 3, "train.global_batch_size": 4, "train.num_steps": 2}
    done = run_cli(f"{REPO}/{AnyResDemo['onevision']}", workdir, flags, demo_data=None, jax_cache=jax_cache,
                   variant="")
    assert "held-out accuracy" in done.stdout and "evaluate: 6 held-out questions" in done.stdout
    data = workdir / "data"
    gold = {a["question_id"]: a for a in map(json.loads, (data / "eval_answers.jsonl").read_text().splitlines())}
    result = json.loads((workdir / "demo_eval.json").read_text())
    assert result == json.loads((workdir / "result.json").read_text())["demo_eval"]
    for name in ("images", "blank"):
        answers = [json.loads(line) for line in (workdir / f"eval_answers_{name}.jsonl").read_text().splitlines()]
        assert sorted(a["question_id"] for a in answers) == sorted(gold)
        hits = {a["question_id"]: a["text"].rstrip(".").lower() == gold[a["question_id"]]["answer"] for a in answers}
        assert result[name]["accuracy"] == sum(hits.values()) / len(hits)
        for category in {g["category"] for g in gold.values()}:
            mine = [hits[q] for q, g in gold.items() if g["category"] == category]
            assert result[name][category] == sum(mine) / len(mine)
    assert set(result["chance"]) == {g["category"] for g in gold.values()}
