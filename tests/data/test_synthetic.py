"""The embedded demo dataset and its tokenizer.

Answers are checked against what the pixels show (measured here with numpy, independently of the drawing
code), prompts are rendered as llava/conversation.py does (and with the official templates when llava-torch
is installed), and the tokenizer is loaded back with transformers' AutoTokenizer.
"""

from __future__ import annotations

import collections
import importlib
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import synthetic

IMAGE_SIZE = 42
SIZES = dict(num_stage1=37, num_stage2=211, num_eval=83)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> synthetic.SyntheticPaths:
    return synthetic.generate(tmp_path_factory.mktemp("demo"), image_size=IMAGE_SIZE, seed=3, **SIZES)


@pytest.fixture(scope="module")
def tokenizer(data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.tokenizer)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _samples(data) -> list[dict]:
    return json.loads(data.stage1.read_text()) + json.loads(data.stage2.read_text())


# ---------------------------------------------------------------------------------------------------------
# What an image shows, measured from its pixels


def _measure(image: Image.Image) -> dict:
    """shape / color / count / quadrants of a demo image, from its pixels alone."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    palette = np.array(list(synthetic.COLORS.values()))
    distances = np.abs(rgb[:, :, None, :] - palette).sum(-1)  # [H, W, colors]
    solid = distances.min(-1) < 40  # inside a shape (edges are blended with the background)
    color = list(synthetic.COLORS)[np.bincount(distances.argmin(-1)[solid], minlength=len(palette)).argmax()]
    half = rgb.shape[0] // 2
    quadrants = [q for q in range(4) if solid[(q // 2) * half:(q // 2 + 1) * half,
                                                (q % 2) * half:(q % 2 + 1) * half].sum() > 10]
    q = quadrants[0]
    blob = solid[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half]
    rows, cols = np.nonzero(blob)
    box = blob[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = box.mean()
    widest_row = np.argmax(box.sum(1)) / (box.shape[0] - 1)
    if fill > 0.9:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    else:
        shape = "triangle" if widest_row > 0.75 else "diamond"
    return dict(shape=shape, color=color, count=len(quadrants), quadrants=tuple(quadrants))


def _expected_answer(measured: dict, category: str) -> str:
    if category == "count":
        return synthetic.COUNT_WORDS[measured["count"] - 1]
    if category == "position":
        assert measured["count"] == 1
        return synthetic.POSITIONS[measured["quadrants"][0]]
    return measured[category]


def _category(question: str) -> str:
    question = question.removeprefix("<image>\n").removesuffix(synthetic.SHORT_ANSWER_SUFFIX)
    (category,) = [c for c, texts in synthetic.QUESTIONS.items() if question in texts]
    return category


# ---------------------------------------------------------------------------------------------------------
# Files


def test_generate_is_deterministic_and_seeded(tmp_path):
    sizes = dict(num_stage1=7, num_stage2=23, num_eval=11, image_size=26)
    first = synthetic.generate(tmp_path / "a", seed=5, **sizes)
    second = synthetic.generate(tmp_path / "b", seed=5, **sizes)
    other = synthetic.generate(tmp_path / "c", seed=6, **sizes)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert len(files(first.root)) == 7 + 23 - 1 + 11 + 5 + 2  # images (one text-only) + JSON(L)s + tokenizer
    assert files(first.root) == files(second.root)
    for name in ("stage1.json", "stage2.json", "eval_questions.jsonl", "eval_answers.jsonl", "images/eval_000000.png"):
        assert files(first.root)[name] != files(other.root)[name], name
    assert files(first.root)["tokenizer/tokenizer.json"] == files(other.root)["tokenizer/tokenizer.json"]


def test_splits_have_their_own_random_streams(tmp_path):
    small = synthetic.generate(tmp_path / "a", num_stage1=3, num_stage2=20, num_eval=5, image_size=26)
    large = synthetic.generate(tmp_path / "b", num_stage1=9, num_stage2=20, num_eval=5, image_size=26)
    assert small.stage2.read_bytes() == large.stage2.read_bytes()
    assert small.eval_answers.read_bytes() == large.eval_answers.read_bytes()
    assert json.loads(large.stage1.read_text())[:3] == json.loads(small.stage1.read_text())


def test_llava_json_format(data):
    stage1, stage2 = json.loads(data.stage1.read_text()), json.loads(data.stage2.read_text())
    assert (len(stage1), len(stage2)) == (SIZES["num_stage1"], SIZES["num_stage2"])
    samples = stage1 + stage2
    assert len({s["id"] for s in samples}) == len(samples)
    text_only = 0
    for sample in samples:
        turns = sample["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0, sample["id"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2), sample["id"]
        assert all(t["value"].strip() for t in turns), sample["id"]
        all_text = "".join(t["value"] for t in turns)
        if "image" in sample:
            with Image.open(data.images / sample["image"]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
            assert turns[0]["value"].startswith("<image>\n") and all_text.count("<image>") == 1, sample["id"]
        else:
            text_only += 1
            assert "<image>" not in all_text
    assert text_only == int(SIZES["num_stage2"] * synthetic.TEXT_ONLY_FRACTION) > 0
    assert all(len(s["conversations"]) == 2 and "image" in s for s in stage1)
    assert {len(s["conversations"]) // 2 for s in stage2 if "image" in s} == {2, 3}


def test_captions_describe_the_pixels(data):
    caption_re = re.compile(r"a (\w+) (\w+) in the ([\w-]+) corner|(\w+) (\w+) (\w+)s")
    for sample in json.loads(data.stage1.read_text()):
        caption = sample["conversations"][1]["value"]
        assert sample["conversations"][0]["value"].removeprefix("<image>\n") in synthetic.CAPTION_INSTRUCTIONS
        with Image.open(data.images / sample["image"]) as image:
            measured = _measure(image)
        match = caption_re.fullmatch(caption)
        assert match, caption
        if match[1]:
            described = dict(color=match[1], shape=match[2], count=1,
                             quadrants=(synthetic.POSITIONS.index(match[3]),))
            assert measured == described, (sample["id"], caption)
        else:
            assert (measured["count"], measured["color"], measured["shape"]) == (
                synthetic.COUNT_WORDS.index(match[4]) + 1, match[5], match[6]), (sample["id"], caption)


def test_stage2_answers_match_the_pixels_and_are_balanced(data):
    answers = collections.defaultdict(list)
    for sample in json.loads(data.stage2.read_text()):
        turns = sample["conversations"]
        questions, replies = [t["value"] for t in turns[::2]], [t["value"] for t in turns[1::2]]
        if "image" not in sample:
            qa = dict(synthetic.TEXT_ONLY_QA)
            assert all(qa[q] == a for q, a in zip(questions, replies)), sample["id"]
            continue
        with Image.open(data.images / sample["image"]) as image:
            measured = _measure(image)
        categories = [_category(q) for q in questions]
        assert len(set(categories)) == len(categories), sample["id"]  # no question asked twice
        for category, reply in zip(categories, replies):
            assert reply == _expected_answer(measured, category), (sample["id"], category)
            answers[category].append(reply)
    for category, values in answers.items():
        assert set(values) == set(synthetic.OPTIONS[category])
        top_share = collections.Counter(values).most_common(1)[0][1] / len(values)
        assert top_share <= 0.3, (category, collections.Counter(values))


def test_eval_files_are_consistent_balanced_and_correct(data):
    questions, answers = _read_jsonl(data.eval_questions), _read_jsonl(data.eval_answers)
    assert len(questions) == SIZES["num_eval"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert len({q["question_id"] for q in questions}) == len(questions)
    train_images = {s.get("image") for s in _samples(data)}
    for question, answer in zip(questions, answers):
        assert set(question) == {"question_id", "image", "text", "category"}
        assert set(answer) == {"question_id", "answer", "category"}
        assert question["category"] == answer["category"] == _category(question["text"])
        assert question["text"].endswith(synthetic.SHORT_ANSWER_SUFFIX)
        assert question["image"] not in train_images
        with Image.open(data.images / question["image"]) as image:
            assert answer["answer"] == _expected_answer(_measure(image), question["category"]), question
    chance = json.loads(data.info.read_text())["chance"]
    by_category = collections.defaultdict(list)
    for answer in answers:
        by_category[answer["category"]].append(answer["answer"])
    assert set(by_category) == set(synthetic.CATEGORIES) == set(chance)
    for category, values in by_category.items():
        majority = collections.Counter(values).most_common(1)[0][1] / len(values)
        assert chance[category]["majority"] == pytest.approx(majority) and majority <= 0.3
        assert chance[category]["uniform"] == pytest.approx(1 / len(set(values)))
        assert chance[category]["uniform"] <= 0.25
        assert chance[category]["num"] == len(values)


def test_cli_writes_the_dataset(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num-stage1", "5", "--num-stage2", "3", "--num-eval", "4",
                    "--image-size", "30", "--seed", "2"])
    assert len(json.loads((tmp_path / "stage1.json").read_text())) == 5
    assert len(_read_jsonl(tmp_path / "eval_questions.jsonl")) == 4
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    with Image.open(tmp_path / "images" / "eval_000003.png") as image:
        assert image.size == (30, 30)
    assert "chance 25%" in capsys.readouterr().out


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_eval"):
        synthetic.generate(tmp_path, num_eval=-1)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(tmp_path, image_size=4)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _render_plain(conversations: list[dict]) -> str:
    """`preprocess_plain`: the image placeholder, then the caption and the separator."""
    return "<image>" + conversations[1]["value"] + "\n"


def _render_vicuna_v1(conversations: list[dict]) -> str:
    """`conv_vicuna_v1.get_prompt()` (sep_style TWO, seps " " and "</s>")."""
    prompt = VICUNA_SYSTEM + " "
    for i, turn in enumerate(conversations):
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        prompt += f"{role}: {turn['value']}" + (" " if i % 2 == 0 else "</s>")
    return prompt


def _all_texts(data) -> list[str]:
    samples = _samples(data)
    texts = [t["value"] for s in samples for t in s["conversations"]]
    texts += [q["text"] for q in _read_jsonl(data.eval_questions)]
    texts += [_render_vicuna_v1(s["conversations"]) for s in samples]
    texts += [_render_plain(s["conversations"]) for s in json.loads(data.stage1.read_text())]
    texts += [_render_vicuna_v1([{"from": "human", "value": "<image>\n" + q["text"]}])[:-1] + "ASSISTANT:"
              for q in _read_jsonl(data.eval_questions)]  # generation prompts
    return texts


def test_tokenizer_loads_with_llama_special_tokens(tokenizer):
    assert type(tokenizer).__name__ in {"PreTrainedTokenizerFast", "TokenizersBackend"}
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>")
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.added_tokens_decoder[image_id].special and "<image>" in tokenizer.all_special_tokens
    assert len(tokenizer) < 512
    assert sorted(tokenizer.get_vocab().values()) == list(range(len(tokenizer)))  # dense ids
    ids = tokenizer("two red circles").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer("two red circles", add_special_tokens=False).input_ids == ids[1:]
    assert tokenizer("USER: <image>\nWhere is the shape?").input_ids.count(image_id) == 1
    assert tokenizer.padding_side == "right"


def test_tokenizer_covers_the_dataset_and_templates_and_round_trips(data, tokenizer):
    texts = _all_texts(data)
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for text, ids, offsets in zip(texts, encodings.input_ids, encodings.offset_mapping):
        assert tokenizer.unk_token_id not in ids, [
            tokenizer.convert_ids_to_tokens(i) for i in ids]
        assert tokenizer.decode(ids) == text
        for token, (start, end) in zip(tokenizer.convert_ids_to_tokens(ids), offsets):
            assert text[start:end] in {token.replace("▁", " "), token.removeprefix("▁")}, (token, text)


def test_answers_decode_exactly_from_the_rendered_conversation(data, tokenizer):
    for sample in json.loads(data.stage2.read_text()):
        prompt = _render_vicuna_v1(sample["conversations"])
        encoding = tokenizer(prompt, return_offsets_mapping=True)
        start = 0
        for turn in sample["conversations"][1::2]:
            answer_start = prompt.index(" ASSISTANT: " + turn["value"] + "</s>", start) + len(" ASSISTANT: ")
            start = answer_start + len(turn["value"])
            answer_ids = [i for i, (a, b) in zip(encoding.input_ids, encoding.offset_mapping)
                          if a < start and b > answer_start]
            assert tokenizer.decode(answer_ids) == turn["value"]


def _official_conversation_module():
    """`llava.conversation` from llava-torch, with `llava.model` (the PyTorch model stack) stubbed as
    tests/data/official_llava.py does; importing only this module keeps the test fast."""
    if importlib.util.find_spec("llava") is None:
        pytest.skip("llava-torch is not installed")
    if "llava.model" not in sys.modules:
        stub = types.ModuleType("llava.model")
        stub.__dict__.update(LlavaLlamaForCausalLM=None, __all__=[])
        sys.modules["llava.model"] = stub
    return importlib.import_module("llava.conversation")


def test_official_templates_are_covered(data, tokenizer):
    templates = _official_conversation_module().conv_templates
    assert templates["vicuna_v1"].system == VICUNA_SYSTEM
    prompts = [f"<image>{s['conversations'][1]['value']}{templates['plain'].sep}"  # preprocess_plain
               for s in json.loads(data.stage1.read_text())]
    for sample in _samples(data)[::3]:
        for name in ("vicuna_v1", "llava_v1"):
            conv = templates[name].copy()
            conv.messages = []
            for i, turn in enumerate(sample["conversations"]):
                conv.append_message(conv.roles[i % 2], turn["value"])
            prompts.append(conv.get_prompt())
            if name == "vicuna_v1":
                assert prompts[-1] == _render_vicuna_v1(sample["conversations"])
            conv.messages = conv.messages[:1]
            conv.append_message(conv.roles[1], None)
            prompts.append(conv.get_prompt())  # the generation prompt, ending with "ASSISTANT:"
    assert prompts[-1].endswith("ASSISTANT:")
    for prompt, ids in zip(prompts, tokenizer(prompts).input_ids):
        assert tokenizer.unk_token_id not in ids, prompt
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == prompt


def _supervised_runs(labels: np.ndarray) -> list[list[int]]:
    """The contiguous runs of supervised (!= -100) label ids."""
    runs, current = [], []
    for label in labels.tolist() + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


def test_training_labels_decode_to_the_exact_answers(data, tokenizer):
    """Through the project's tokenize_conversation: stage 1 with `plain`, stage 2 with `vicuna_v1`."""
    from llava_jax.data.conversation import get_template
    from llava_jax.data.tokenize import add_image_token, tokenize_conversation

    image_id = add_image_token(tokenizer)
    assert image_id == tokenizer.convert_tokens_to_ids("<image>")  # present already, nothing added
    for path, template, end in ((data.stage1, "plain", "\n"), (data.stage2, "vicuna_v1", "</s>")):
        for sample in json.loads(path.read_text()):
            tokenized = tokenize_conversation(sample["conversations"], tokenizer, get_template(template),
                                              image_token_id=image_id, image_seq_length=7, max_length=512,
                                              sample_id=sample["id"])
            assert tokenizer.unk_token_id not in tokenized.input_ids, sample["id"]
            answers = [turn["value"] + end for turn in sample["conversations"][1::2]]
            decoded = [tokenizer.decode(run) for run in _supervised_runs(tokenized.labels)]
            assert decoded == answers, sample["id"]


def test_blank_image_is_the_background_of_every_image(data):
    blank = np.asarray(synthetic.blank_image(IMAGE_SIZE))
    assert blank.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and (blank == blank[0, 0]).all()
    with Image.open(data.images / "eval_000000.png") as image:
        pixels = np.asarray(image)
    background = (pixels == blank).all(-1)
    assert 0.3 < background.mean() < 1  # shapes on the same plain background


# ---------------------------------------------------------------------------------------------------------
# Multi-image and video samples (asked for: the OneVision demo)

MEDIA = dict(num_multi_image=14, num_video=7)


@pytest.fixture(scope="module")
def media_data(tmp_path_factory) -> synthetic.SyntheticPaths:
    return synthetic.generate(tmp_path_factory.mktemp("media"), image_size=IMAGE_SIZE, seed=4, num_stage1=2,
                              num_stage2=20, num_eval=4, **MEDIA)


def _blob(rgb: np.ndarray) -> tuple[str, str, tuple[float, float]]:
    """(color, shape, centre) of the one shape of a frame, anywhere in it, from its pixels."""
    palette = np.array(list(synthetic.COLORS.values()))
    distances = np.abs(rgb.astype(np.int32)[:, :, None, :] - palette).sum(-1)
    solid = distances.min(-1) < 40
    color = list(synthetic.COLORS)[np.bincount(distances.argmin(-1)[solid], minlength=len(palette)).argmax()]
    rows, cols = np.nonzero(solid)
    box = solid[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill, widest_row = box.mean(), np.argmax(box.sum(1)) / (box.shape[0] - 1)
    shape = ("square" if fill > 0.9 else "circle" if fill > 0.68 else
             "triangle" if widest_row > 0.75 else "diamond")
    return color, shape, (rows.mean(), cols.mean())


def test_media_samples_follow_stage2_only_when_asked(data, media_data):
    plain = json.loads(data.stage2.read_text())
    assert not any("video" in s or isinstance(s.get("image"), list) for s in plain)
    assert not (data.images / synthetic.MULTI_IMAGE_DIR).exists() and not (data.images / synthetic.VIDEO_DIR).exists()
    stage2 = json.loads(media_data.stage2.read_text())
    assert len(stage2) == 20 + MEDIA["num_multi_image"] + MEDIA["num_video"]
    assert [s["id"].split("-")[0] for s in stage2[20:]] == ["multi"] * 14 + ["video"] * 7
    assert synthetic.is_complete(media_data.root) and synthetic.paths_of(media_data.root) == media_data
    info = json.loads(media_data.info.read_text())
    assert (info["num_multi_image"], info["num_video"]) == (14, 7)
    # The single-image and text-only samples are those of a generation without media (their own streams).
    alone = synthetic.generate(media_data.root.parent / "alone", image_size=IMAGE_SIZE, seed=4, num_stage1=2,
                               num_stage2=20, num_eval=4)
    assert json.loads(alone.stage2.read_text()) == stage2[:20]


def test_multi_image_answers_match_the_pixels(media_data):
    ordinal_re = re.compile(r"What shape is in the (\w+) image\?")
    count_re = re.compile(r"How many images show a (\w+) shape\?")
    sizes = set()
    for sample in json.loads(media_data.stage2.read_text())[20:34]:
        measured = []
        for name in sample["image"]:
            with Image.open(media_data.images / name) as image:
                measured.append(_measure(image))
        sizes.add(len(measured))
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n" * len(measured))
        assert "<image>" not in turns[0]["value"][len("<image>\n") * len(measured):]
        for question, answer in zip(turns[::2], turns[1::2]):
            text = question["value"].removeprefix("<image>\n" * len(measured))
            text = text.removesuffix(synthetic.SHORT_ANSWER_SUFFIX)
            if match := ordinal_re.fullmatch(text):
                assert measured[synthetic.ORDINALS.index(match[1])]["shape"] == answer["value"], sample["id"]
            else:
                color = count_re.fullmatch(text)[1]
                showing = sum(m["color"] == color for m in measured)
                assert synthetic.COUNT_WORDS[showing - 1] == answer["value"], sample["id"]
    assert sizes == set(synthetic.MULTI_IMAGE_COUNTS)


def test_video_answers_match_the_frames_and_the_shape_moves(media_data):
    questions = {q: c for c, texts in synthetic.VIDEO_QUESTIONS.items() for q in texts}
    for sample in json.loads(media_data.stage2.read_text())[34:]:
        folder = media_data.images / sample["video"]
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))]
        assert len(frames) == synthetic.VIDEO_FRAMES and {f.shape for f in frames} == {(IMAGE_SIZE, IMAGE_SIZE, 3)}
        blobs = [_blob(f) for f in frames]
        assert len({(color, shape) for color, shape, _ in blobs}) == 1, sample["id"]
        (start, end) = np.array(blobs[0][2]), np.array(blobs[-1][2])
        assert np.abs(end - start).max() > IMAGE_SIZE / 3, sample["id"]     # border to border
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in turns) == 1
        for question, answer in zip(turns[::2], turns[1::2]):
            text = question["value"].removeprefix("<image>\n").removesuffix(synthetic.SHORT_ANSWER_SUFFIX)
            category = questions[text]
            assert answer["value"] == dict(color=blobs[0][0], shape=blobs[0][1])[category], sample["id"]


def test_media_tokenizer_covers_their_questions_and_the_plain_one_is_unchanged(media_data, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(media_data.tokenizer)
    texts = [t["value"] for s in json.loads(media_data.stage2.read_text()) for t in s["conversations"]]
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(tokenizer(texts[-1], add_special_tokens=False).input_ids) == texts[-1]
    plain = synthetic.build_tokenizer(tmp_path / "plain")
    default = synthetic.generate(tmp_path / "default", num_stage1=1, num_stage2=1, num_eval=1, image_size=26)
    assert (plain / "tokenizer.json").read_bytes() == (default.tokenizer / "tokenizer.json").read_bytes()
    plain_tokenizer = AutoTokenizer.from_pretrained(plain)
    assert plain_tokenizer.unk_token_id in plain_tokenizer("Which shape is moving?").input_ids


# ---------------------------------------------------------------------------------------------------------
# A tokenizer that covers the demo's template (the OneVision demo: qwen_1_5, chatml)

# What the default tokenizer (no template, or one of the LLaVA-1.5 templates) gives, as before templates counted.
DEFAULT_VOCAB_SIZE, MEDIA_VOCAB_SIZE = 188, 204
DEFAULT_SAMPLE = "USER: <image>\nHow many shapes are there? ASSISTANT: three</s>"
DEFAULT_SAMPLE_IDS = [1, 111, 10, 101, 4, 5, 17, 152, 168, 120, 174, 11, 104, 10, 176, 2]


@pytest.fixture(scope="module")
def qwen_data(tmp_path_factory) -> synthetic.SyntheticPaths:
    return synthetic.generate(tmp_path_factory.mktemp("qwen"), image_size=IMAGE_SIZE, seed=5, num_stage1=4,
                              num_stage2=40, num_eval=12, template="qwen_1_5", **MEDIA)


def test_default_tokenizer_is_unchanged_by_the_covered_templates(tmp_path):
    from transformers import AutoTokenizer

    default = synthetic.build_tokenizer(tmp_path / "default")
    for name in ("plain", "v1", "vicuna_v1", "llava_v1"):
        assert synthetic.template_texts(name) == () and synthetic.template_special_tokens(name) == ()
        covered = synthetic.build_tokenizer(tmp_path / name, template=name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert (covered / file).read_bytes() == (default / file).read_bytes(), (name, file)
    tokenizer = AutoTokenizer.from_pretrained(default)
    assert len(tokenizer) == DEFAULT_VOCAB_SIZE
    assert tokenizer(DEFAULT_SAMPLE).input_ids == DEFAULT_SAMPLE_IDS
    assert len(AutoTokenizer.from_pretrained(synthetic.build_tokenizer(tmp_path / "media", media=True))) == \
        MEDIA_VOCAB_SIZE


def test_chatml_tokenizer_has_the_template_markers_as_special_tokens(qwen_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_data.tokenizer)
    assert synthetic.template_special_tokens("qwen_1_5") == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>",
                                            "<|im_end|>"]) == list(range(7))
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert marker in tokenizer.all_special_tokens
        ids = tokenizer(marker, add_special_tokens=False).input_ids   # a stop string Generator can stop on
        assert len(ids) == 1 and tokenizer.decode(ids) == marker
    assert sorted(tokenizer.get_vocab().values()) == list(range(len(tokenizer)))   # dense ids
    system = tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(system.input_ids) == [
        "<|im_start|>", "system", "\n", "You", "▁are", "▁a", "▁helpful", "▁assistant", ".", "<|im_end|>"]


def _qwen_prompts(data) -> list[str]:
    """Every stage-2 conversation rendered with qwen_1_5, and every held-out question's generation prompt."""
    from llava_jax.data.conversation import generation_prompt, get_template, render

    template = get_template("qwen_1_5")
    prompts = [render(template, [t["value"] for t in s["conversations"]])
               for s in json.loads(data.stage2.read_text())]
    prompts += [generation_prompt(template, ["<image>\n" + q["text"]]) for q in _read_jsonl(data.eval_questions)]
    return prompts


def test_chatml_tokenizer_covers_rendered_qwen_conversations_and_round_trips(qwen_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_data.tokenizer)
    prompts = _qwen_prompts(qwen_data)
    assert prompts[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompts[-1].endswith("<|im_end|>\n<|im_start|>assistant\n")
    for prompt, ids in zip(prompts, tokenizer(prompts).input_ids):
        assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == prompt
        assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == prompt.count("<|im_end|>")


def test_chatml_training_labels_decode_to_the_answers_and_their_end_of_turn(qwen_data):
    """Through the project's tokenize_conversation with qwen_1_5: the labels are the answers and <|im_end|>."""
    from transformers import AutoTokenizer

    from llava_jax.data.conversation import get_template
    from llava_jax.data.tokenize import add_image_token, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(qwen_data.tokenizer)
    image_id = add_image_token(tokenizer)
    samples = json.loads(qwen_data.stage2.read_text())
    assert {s["id"].split("-")[0] for s in samples} == {"stage2", "multi", "video"}
    for sample in samples:
        tokenized = tokenize_conversation(sample["conversations"], tokenizer, get_template("qwen_1_5"),
                                          image_token_id=image_id, image_seq_length=7, max_length=512,
                                          sample_id=sample["id"])
        assert tokenizer.unk_token_id not in tokenized.input_ids, sample["id"]
        answers = [turn["value"] + "<|im_end|>" for turn in sample["conversations"][1::2]]
        assert [tokenizer.decode(run) for run in _supervised_runs(tokenized.labels)] == answers, sample["id"]


def test_every_template_can_be_covered(tmp_path):
    """Any template a demo could name: its prompts around demo texts encode without <unk> and round-trip."""
    from transformers import AutoTokenizer

    from llava_jax.data.conversation import TEMPLATES, generation_prompt, get_template, render

    question, answer = "<image>\nHow many shapes are there?" + synthetic.SHORT_ANSWER_SUFFIX, "three"
    for name in sorted(TEMPLATES):
        tokenizer = AutoTokenizer.from_pretrained(synthetic.build_tokenizer(tmp_path / name, template=name))
        template = get_template(name)
        prompts = [render(template, [question, answer, "Where is the shape?", "top-left"]),
                   generation_prompt(template, [question])]
        for prompt, ids in zip(prompts, tokenizer(prompts, add_special_tokens=False).input_ids):
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == prompt, (name, prompt)
