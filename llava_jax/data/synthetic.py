"""Embedded demo data: a deterministic synthetic visual dataset in the LLaVA format and its tokenizer.

Each image shows 1-4 copies of one solid shape of one colour, one per quadrant, on a plain background:

  shape    circle | square | triangle | diamond            (chance 1/4)
  color    red | green | blue | yellow | purple            (chance 1/5)
  count    one | two | three | four                        (chance 1/4)
  position top-left | top-right | bottom-left | bottom-right  (single-shape images only; chance 1/4)

`generate` writes, under `out_dir`:

  images/*.png             the images (the image root of every file below)
  stage1.json              LLaVA JSON captions: "<image>\\n<instruction>" -> "a red circle in the top-left corner"
  stage2.json              LLaVA JSON multi-turn questions with one-word answers (2-3 per image), plus a few
                           text-only samples; when asked, multi-image and video samples after them (below)
  eval_questions.jsonl     held-out questions in the official model_vqa format (question_id, image, text, category)
  eval_answers.jsonl       their answers (question_id, answer, category)
  info.json                sizes, the answer options and the chance level of every category
  tokenizer/               a small word-level tokenizer that `transformers.AutoTokenizer` loads; it covers the
                           plain / vicuna_v1 / llava_v1 templates, and the one `template` names when asked
                           (the OneVision demo's qwen_1_5: <|im_start|>, <|im_end|> special, its system prompt)

Asked for (`num_multi_image`, `num_video`: the OneVision demo), stage2.json ends with LLaVA-NeXT style
multi-image samples (2-3 scenes under images/multi/, one `<image>` line each; "What shape is in the second
image?", "How many images show a red shape?") and video samples (images/videos/<id>/frame_*.png, VIDEO_FRAMES
frames of one shape moving in a straight line; the `"video"` key names the folder, its one `<image>` stands for
the video; "What color is the moving shape?"); the tokenizer then covers their questions too.

The JSON files are written to a temporary sibling and renamed into place, and `info.json` last: a generation
killed halfway leaves no `info.json`, `is_complete` says so and the next `generate` redoes it.

Answers are drawn from shuffled decks (every option once per round), so each category is balanced and chance
is 1 / number of options. Everything is a function of the seed: two runs write byte-identical files.

CLI: python -m llava_jax.data.synthetic --out DIR [--num-stage1 N] [--num-stage2 N] [--num-eval N]
     [--num-multi-image N] [--num-video N] [--image-size PX] [--seed S] [--template NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llava_jax import atomic_files, cli
from llava_jax.data.conversation import TEMPLATES, get_template, render

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 60, 189),
}
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS = ("one", "two", "three", "four")
BACKGROUND = (225, 225, 225)

# Answer options of every question category.
OPTIONS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "count": COUNT_WORDS,
    "position": POSITIONS,
}
CATEGORIES = tuple(OPTIONS)

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is in the image?", "What is the shape of the object?", "Which shape do you see?"),
    "color": ("What color is the shape?", "What is the color of the object?", "Which color do you see?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "How many shapes do you see?"),
    "position": ("Where is the shape?", "In which corner is the shape?", "Which corner is the object in?"),
}
# The suffix LLaVA-1.5 uses for short-answer questions; every eval question and half of stage 2's carry it.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in this picture?",
)

# Text-only questions (stage 2 mixes a few in, as mix665k does) with their exact answers.
TEXT_ONLY_QA = (
    *((f"What number comes after {a}?", b) for a, b in zip(COUNT_WORDS, COUNT_WORDS[1:])),
    *((f"What number comes before {b}?", a) for a, b in zip(COUNT_WORDS, COUNT_WORDS[1:])),
    ("How many corners does a triangle have?", "three"),
    ("How many corners does a square have?", "four"),
    ("How many corners does a diamond have?", "four"),
    *((f"Is {c} a shape or a color?", "color") for c in COLORS),
    *((f"Is a {s} a shape or a color?", "shape") for s in SHAPES),
)
TEXT_ONLY_FRACTION = 0.05

# Multi-image and video samples (only when asked: `generate(num_multi_image=..., num_video=...)`).
ORDINALS = ("first", "second", "third")
MULTI_IMAGE_COUNTS = (2, 3)        # images of a multi-image sample
MULTI_IMAGE_DIR, VIDEO_DIR = "multi", "videos"   # below images/
VIDEO_FRAMES = 6
VIDEO_QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape moves in the video?", "Which shape is moving?"),
    "color": ("What color is the moving shape?", "What is the color of the moving object?"),
}


def ordinal_shape_question(ordinal: str) -> str:
    return f"What shape is in the {ordinal} image?"


def color_count_question(color: str) -> str:
    return f"How many images show a {color} shape?"


# Conversation-template text the tokenizer must cover (plain, vicuna_v1 and llava_v1 of llava/conversation.py).
TEMPLATE_TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: ",
)

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4, in this order
MODEL_MAX_LENGTH = 2048

# Templates whose text TEMPLATE_TEXTS covers (the LLaVA-1.5 and LLaVA-NeXT demos'): they get the default tokenizer.
COVERED_TEMPLATES = ("plain", "vicuna_v1", "llava_v1")
# A template's marker tokens such as chatml's <|im_start|> and <|im_end|>: special tokens of its tokenizer.
_MARKER = re.compile(r"<\|[^|\s]+\|>")


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where `generate` wrote each part of the demo dataset."""

    root: Path
    images: Path  # the image root that every "image" field is relative to
    stage1: Path
    stage2: Path
    eval_questions: Path
    eval_answers: Path
    info: Path
    tokenizer: Path


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: `count` copies of a `color` `shape`, one in each of `quadrants`."""

    shape: str
    color: str
    quadrants: tuple[int, ...]  # indices into POSITIONS

    @property
    def count(self) -> int:
        return len(self.quadrants)

    def answer(self, category: str) -> str:
        """The one-word answer to a question of `category` about this scene."""
        if category == "shape":
            return self.shape
        if category == "color":
            return self.color
        if category == "count":
            return COUNT_WORDS[self.count - 1]
        if category == "position":
            if self.count != 1:
                raise ValueError(f"position is only asked of single-shape scenes, this one has {self.count}")
            return POSITIONS[self.quadrants[0]]
        raise ValueError(f"unknown question category {category!r}; expected one of {CATEGORIES}")

    def caption(self) -> str:
        """'a red circle in the top-left corner' or 'three blue squares'."""
        if self.count == 1:
            return f"a {self.color} {self.shape} in the {POSITIONS[self.quadrants[0]]} corner"
        return f"{COUNT_WORDS[self.count - 1]} {self.color} {self.shape}s"


# ---------------------------------------------------------------------------------------------------------
# Balanced random choices


class Deck:
    """Draws options in shuffled rounds (each option once per round), so counts never differ by more than 1."""

    def __init__(self, options: Iterable, rng: np.random.Generator):
        self.options = tuple(options)
        self.rng = rng
        self._pending: list = []

    def draw(self):
        if not self._pending:
            self._pending = [self.options[i] for i in self.rng.permutation(len(self.options))]
        return self._pending.pop()


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


def _scene(rng: np.random.Generator, *, shape: str | None = None, color: str | None = None,
           count: int | None = None, position: str | None = None) -> Scene:
    """A scene with the given attributes; those left None are drawn uniformly from `rng`."""
    shape = shape or _pick(rng, SHAPES)
    color = color or _pick(rng, tuple(COLORS))
    if position is not None:
        quadrants = (POSITIONS.index(position),)
    else:
        count = count or int(rng.integers(1, 5))
        quadrants = tuple(sorted(int(q) for q in rng.choice(len(POSITIONS), size=count, replace=False)))
    return Scene(shape, color, quadrants)


# ---------------------------------------------------------------------------------------------------------
# Drawing

_SUPERSAMPLE = 4  # drawn at 4x and downsampled: smooth edges at 32-64 px


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image [image_size, image_size]: each shape spans 68-84% of its quadrant, jittered."""
    canvas = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = canvas / 2
    for quadrant in scene.quadrants:
        row, col = divmod(quadrant, 2)
        radius = cell * rng.uniform(0.34, 0.42)
        slack = (cell / 2 - radius) / 2  # keeps a margin to the quadrant's border
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, scene.shape, COLORS[scene.color], cx, cy, radius)
    return image.reduce(_SUPERSAMPLE)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple, cx: float, cy: float, radius: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)


def draw_video(shape: str, color: str, image_size: int, num_frames: int,
               rng: np.random.Generator) -> list[Image.Image]:
    """`num_frames` RGB frames [image_size, image_size] of one `color` `shape` (a third of the side across)
    moving in a straight line through the centre, from one border to the opposite one (a random direction)."""
    canvas = image_size * _SUPERSAMPLE
    radius = canvas / 6
    angle = rng.uniform(0, 2 * np.pi)
    offset = (canvas / 2 - radius) * np.array([np.cos(angle), np.sin(angle)]) / max(abs(np.cos(angle)),
                                                                                  abs(np.sin(angle)))
    start, end = canvas / 2 - offset, canvas / 2 + offset
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        image = Image.new("RGB", (canvas, canvas), BACKGROUND)
        cx, cy = start + t * (end - start)
        _draw_shape(ImageDraw.Draw(image), shape, COLORS[color], float(cx), float(cy), radius)
        frames.append(image.reduce(_SUPERSAMPLE))
    return frames


def blank_image(image_size: int) -> Image.Image:
    """The background alone: what the demo shows the model to check it does not answer blind."""
    return Image.new("RGB", (image_size, image_size), BACKGROUND)


def _save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # no metadata: the bytes depend on the pixels only
    path.write_bytes(buffer.getvalue())  # a torn image is redone: info.json is written after it


# ---------------------------------------------------------------------------------------------------------
# Samples


def _question(rng: np.random.Generator, category: str, *, short_answer_suffix: bool) -> str:
    question = _pick(rng, QUESTIONS[category])
    return question + SHORT_ANSWER_SUFFIX if short_answer_suffix else question


def _conversation(turns: list[tuple[str, str]], *, with_image: bool) -> list[dict[str, str]]:
    """[(question, answer), ...] -> LLaVA conversations, "<image>\\n" opening the first human turn."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if with_image and i == 0 else ""
        messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return messages


def _stage1_samples(num: int, image_size: int, images: Path, rng: np.random.Generator) -> list[dict]:
    counts = Deck(range(1, 5), rng)
    shapes, colors, positions = Deck(SHAPES, rng), Deck(COLORS, rng), Deck(POSITIONS, rng)
    samples = []
    for i in range(num):
        count = counts.draw()
        scene = _scene(rng, shape=shapes.draw(), color=colors.draw(), count=count,
                       position=positions.draw() if count == 1 else None)
        name = f"stage1_{i:06d}.png"
        _save_png(draw_scene(scene, image_size, rng), images / name)
        instruction = _pick(rng, CAPTION_INSTRUCTIONS)
        samples.append({"id": f"stage1-{i:06d}", "image": name,
                        "conversations": _conversation([(instruction, scene.caption())], with_image=True)})
    return samples


def _stage2_categories(rng: np.random.Generator, count: int) -> list[str]:
    """The 2-3 categories asked of one image, in random order.

    Count is always asked and position always when there is a single shape, so both stay balanced; one or
    two of shape / color complete the set.
    """
    asked = ["count"] + (["position"] if count == 1 else [])
    extra = ["shape", "color"]
    num_extra = 1 if count == 1 else int(rng.integers(1, 3))
    asked += [extra[i] for i in sorted(rng.choice(2, size=num_extra, replace=False))]
    return [asked[i] for i in rng.permutation(len(asked))]


def _stage2_samples(num: int, image_size: int, images: Path, rng: np.random.Generator) -> list[dict]:
    num_text = int(num * TEXT_ONLY_FRACTION)
    text_slots = set(int(i) for i in rng.choice(num, size=num_text, replace=False)) if num_text else set()
    decks = {category: Deck(options, rng) for category, options in OPTIONS.items()}
    samples = []
    for i in range(num):
        sample_id = f"stage2-{i:06d}"
        if i in text_slots:
            picks = rng.choice(len(TEXT_ONLY_QA), size=int(rng.integers(1, 3)), replace=False)
            turns = [TEXT_ONLY_QA[int(k)] for k in picks]
            samples.append({"id": sample_id, "conversations": _conversation(turns, with_image=False)})
            continue
        count = COUNT_WORDS.index(decks["count"].draw()) + 1
        categories = _stage2_categories(rng, count)
        scene = _scene(
            rng, count=count,
            shape=decks["shape"].draw() if "shape" in categories else None,
            color=decks["color"].draw() if "color" in categories else None,
            position=decks["position"].draw() if "position" in categories else None)
        name = f"stage2_{i:06d}.png"
        _save_png(draw_scene(scene, image_size, rng), images / name)
        suffix = bool(rng.integers(2))
        turns = [(_question(rng, c, short_answer_suffix=suffix), scene.answer(c)) for c in categories]
        samples.append({"id": sample_id, "image": name, "conversations": _conversation(turns, with_image=True)})
    return samples


def _media_conversation(turns: list[tuple[str, str]], num_images: int) -> list[dict[str, str]]:
    """As `_conversation`, the first human turn opened by one "<image>\\n" per image."""
    messages = _conversation(turns, with_image=False)
    messages[0]["value"] = "<image>\n" * num_images + messages[0]["value"]
    return messages


def _multi_image_samples(num: int, image_size: int, images: Path, rng: np.random.Generator) -> list[dict]:
    """2-3 scenes a sample, two questions on them: the shape of the n-th image, how many show a colour (1..n)."""
    shapes, colors = Deck(SHAPES, rng), Deck(COLORS, rng)
    samples = []
    if num:
        (images / MULTI_IMAGE_DIR).mkdir(exist_ok=True)
    for i in range(num):
        n = int(_pick(rng, MULTI_IMAGE_COUNTS))
        color, shape, which = colors.draw(), shapes.draw(), int(rng.integers(n))
        showing = int(rng.integers(1, n + 1))  # images of `color`
        others = tuple(c for c in COLORS if c != color)
        scene_colors = [color] * showing + [_pick(rng, others) for _ in range(n - showing)]
        scene_colors = [scene_colors[k] for k in rng.permutation(n)]
        names = []
        for k, scene_color in enumerate(scene_colors):
            scene = _scene(rng, color=scene_color, shape=shape if k == which else None)
            names.append(f"{MULTI_IMAGE_DIR}/multi_{i:06d}_{k}.png")
            _save_png(draw_scene(scene, image_size, rng), images / names[-1])
        suffix = SHORT_ANSWER_SUFFIX if rng.integers(2) else ""
        turns = [(ordinal_shape_question(ORDINALS[which]) + suffix, shape),
                 (color_count_question(color) + suffix, COUNT_WORDS[showing - 1])]
        turns = [turns[k] for k in rng.permutation(2)]
        samples.append({"id": f"multi-{i:06d}", "image": names, "conversations": _media_conversation(turns, n)})
    return samples


def _video_samples(num: int, image_size: int, images: Path, rng: np.random.Generator) -> list[dict]:
    """A folder of VIDEO_FRAMES frames a sample (one moving shape), asked its shape and / or colour."""
    shapes, colors = Deck(SHAPES, rng), Deck(COLORS, rng)
    samples = []
    for i in range(num):
        shape, color = shapes.draw(), colors.draw()
        folder = f"{VIDEO_DIR}/video_{i:06d}"
        (images / folder).mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(draw_video(shape, color, image_size, VIDEO_FRAMES, rng)):
            _save_png(frame, images / folder / f"frame_{k:02d}.png")
        categories = [("shape", "color")[k] for k in rng.permutation(2)][:int(rng.integers(1, 3))]
        suffix = SHORT_ANSWER_SUFFIX if rng.integers(2) else ""
        answers = {"shape": shape, "color": color}
        turns = [(_pick(rng, VIDEO_QUESTIONS[c]) + suffix, answers[c]) for c in categories]
        samples.append({"id": f"video-{i:06d}", "video": folder, "conversations": _media_conversation(turns, 1)})
    return samples


def _eval_samples(num: int, image_size: int, images: Path,
                  rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """One question per held-out image; categories and each category's answers drawn from decks."""
    category_deck = Deck(CATEGORIES, rng)
    answer_decks = {category: Deck(options, rng) for category, options in OPTIONS.items()}
    questions, answers = [], []
    for i in range(num):
        category = category_deck.draw()
        answer = answer_decks[category].draw()
        if category == "count":
            scene = _scene(rng, count=COUNT_WORDS.index(answer) + 1)
        else:
            scene = _scene(rng, **{category: answer})
        name = f"eval_{i:06d}.png"
        _save_png(draw_scene(scene, image_size, rng), images / name)
        text = _question(rng, category, short_answer_suffix=True)
        questions.append({"question_id": i, "image": name, "text": text, "category": category})
        answers.append({"question_id": i, "answer": scene.answer(category), "category": category})
    return questions, answers


def chance_levels(answers: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per category: `uniform` (1 / number of options) and `majority` (share of the most frequent answer)."""
    by_category: dict[str, list[str]] = {}
    for row in answers:
        by_category.setdefault(row["category"], []).append(row["answer"])
    levels = {}
    for category, values in sorted(by_category.items()):
        majority = max(values.count(v) for v in set(values)) / len(values)
        levels[category] = {"uniform": 1 / len(OPTIONS[category]), "majority": majority, "num": len(values)}
    return levels


def _write_json(path: Path, obj) -> None:
    atomic_files.write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_files.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def paths_of(out_dir: str | Path) -> SyntheticPaths:
    """Where `generate` writes each part under `out_dir`."""
    root = Path(out_dir)
    return SyntheticPaths(root=root, images=root / "images", stage1=root / "stage1.json",
                          stage2=root / "stage2.json", eval_questions=root / "eval_questions.jsonl",
                          eval_answers=root / "eval_answers.jsonl", info=root / "info.json",
                          tokenizer=root / "tokenizer")


def is_complete(out_dir: str | Path) -> bool:
    """Whether a `generate` into `out_dir` finished (its last write, `info.json`, and every part exist)."""
    paths = paths_of(out_dir)
    return all(p.is_file() for p in (paths.info, paths.stage1, paths.stage2, paths.eval_questions,
                                     paths.eval_answers, paths.tokenizer / "tokenizer_config.json"))


VARIED_SIDES = (1, 2)  # varied_sizes: each side image_size times one of these (AnyRes grids differ)


def vary_sizes(images: Path, image_size: int, rng: np.random.Generator) -> None:
    """Stretches every image under `images` (in name order) to height, width = image_size * a pick of
    VARIED_SIDES each, so an AnyRes model's demo sees different grids (the quadrant answers still hold)."""
    for path in sorted(images.glob("*.png")):
        height, width = (image_size * int(rng.choice(VARIED_SIDES)) for _ in range(2))
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
        _save_png(resized, path)


def generate(out_dir: str | Path, *, num_stage1: int = 2000, num_stage2: int = 2000, num_eval: int = 400,
             image_size: int = 64, seed: int = 0, varied_sizes: bool = False, num_multi_image: int = 0,
             num_video: int = 0, template: str | None = None) -> SyntheticPaths:
    """Writes the demo dataset and its tokenizer under `out_dir` (layout in the module docstring).

    Each split has its own random stream (seeded by (seed, split)), so changing one split's size leaves the
    others unchanged. `num_stage2` counts the single-image and text-only stage-2 samples (5% text-only);
    `num_multi_image` and `num_video` samples follow them in stage2.json. `varied_sizes` (the AnyRes demos)
    then stretches the images to varied sizes (`vary_sizes`, streams of their own; video frames keep theirs).
    `template`: the conversation template the demo trains with, which the tokenizer then covers too.
    """
    counts = (("num_stage1", num_stage1), ("num_stage2", num_stage2), ("num_eval", num_eval),
              ("num_multi_image", num_multi_image), ("num_video", num_video))
    for name, value in counts:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    paths = paths_of(out_dir)
    paths.info.unlink(missing_ok=True)  # incomplete until written again, last
    paths.images.mkdir(parents=True, exist_ok=True)

    def split_rng(split: int) -> np.random.Generator:
        return np.random.default_rng([seed, split])

    _write_json(paths.stage1, _stage1_samples(num_stage1, image_size, paths.images, split_rng(1)))
    stage2 = _stage2_samples(num_stage2, image_size, paths.images, split_rng(2))
    stage2 += _multi_image_samples(num_multi_image, image_size, paths.images, split_rng(5))
    stage2 += _video_samples(num_video, image_size, paths.images, split_rng(6))
    _write_json(paths.stage2, stage2)
    questions, answers = _eval_samples(num_eval, image_size, paths.images, split_rng(3))
    _write_jsonl(paths.eval_questions, questions)
    _write_jsonl(paths.eval_answers, answers)
    if varied_sizes:
        vary_sizes(paths.images, image_size, split_rng(4))
        if num_multi_image:
            vary_sizes(paths.images / MULTI_IMAGE_DIR, image_size, split_rng(7))
    build_tokenizer(paths.tokenizer, media=bool(num_multi_image or num_video), template=template)
    _write_json(paths.info, {  # last: marks the dataset complete
        "seed": seed, "image_size": image_size, "image_root": "images", "varied_sizes": varied_sizes,
        "num_stage1": num_stage1, "num_stage2": num_stage2, "num_eval": num_eval,
        "num_multi_image": num_multi_image, "num_video": num_video,
        "options": OPTIONS, "chance": chance_levels(answers),
    })
    return paths


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def corpus(media: bool = False, template: str | None = None) -> Iterator[str]:
    """Every text the demo can produce (all captions, questions, answers) and the templates' text; `media`:
    the multi-image and video questions too; `template`: that template's text too (`template_texts`)."""
    for shape in SHAPES:
        for color in COLORS:
            for count in range(1, 5):
                quadrant_sets = [(q,) for q in range(4)] if count == 1 else [tuple(range(count))]
                for quadrants in quadrant_sets:
                    yield Scene(shape, color, quadrants).caption()
    yield from CAPTION_INSTRUCTIONS
    for category, questions in QUESTIONS.items():
        for question in questions:
            yield question + SHORT_ANSWER_SUFFIX
        yield from OPTIONS[category]
    for question, answer in TEXT_ONLY_QA:
        yield question
        yield answer
    yield from TEMPLATE_TEXTS
    if media:
        yield from (ordinal_shape_question(o) + SHORT_ANSWER_SUFFIX for o in ORDINALS)
        yield from (color_count_question(c) + SHORT_ANSWER_SUFFIX for c in COLORS)
        yield from (q + SHORT_ANSWER_SUFFIX for questions in VIDEO_QUESTIONS.values() for q in questions)
    yield from template_texts(template)


def _template(name: str | None):
    """The conversation template called `name` when TEMPLATE_TEXTS does not cover it, else None."""
    template = get_template(name) if name else None
    return None if template is None or template.name in COVERED_TEMPLATES else template


def template_texts(name: str | None) -> tuple[str, ...]:
    """Prompts rendered with template `name` (system prompt, role lines, end-of-turn markers, the generation
    prompt) around demo texts; () for the templates TEMPLATE_TEXTS covers (and None)."""
    template = _template(name)
    if template is None:
        return ()
    question, answer = "<image>\n" + CAPTION_INSTRUCTIONS[0], Scene(SHAPES[0], next(iter(COLORS)), (0,)).caption()
    return render(template, [question, answer, question, answer]), render(template, [question, None])


def template_special_tokens(name: str | None) -> tuple[str, ...]:
    """The marker tokens of template `name` (chatml: <|im_start|>, <|im_end|>) in order of appearance; the
    tokenizer adds them as special tokens after SPECIAL_TOKENS. () for the covered templates."""
    return tuple(dict.fromkeys(_MARKER.findall("".join(template_texts(name)))))


def _pre_tokenizer():
    """LLaMA-like pieces: "\\n" alone, spaces as a "▁" prefix (also on the first word), punctuation alone."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def _vocabulary(texts: Iterable[str], specials: tuple[str, ...] = SPECIAL_TOKENS) -> dict[str, int]:
    """`specials`, then every piece of `texts` in both word forms ("▁word" and "word"), sorted.

    Both forms are kept because the form depends on context (after a space vs at the start, after "\\n" or
    after a special token such as "</s>USER"). The vocabulary is built directly rather than with
    WordLevelTrainer, whose ids collide with pre-registered special tokens in tokenizers 0.23.
    """
    pre_tokenizer = _pre_tokenizer()
    split_specials = re.compile("|".join(re.escape(token) for token in specials))
    pieces = set()
    for text in texts:
        for section in split_specials.split(text):
            for variant in (section, "\n" + section):
                pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(variant))
    pieces.update(piece.removeprefix("▁") for piece in list(pieces))
    pieces.discard("")
    pieces.difference_update(specials)
    return {token: i for i, token in enumerate([*specials, *sorted(pieces)])}


def build_tokenizer(out_dir: str | Path, media: bool = False, template: str | None = None) -> Path:
    """Saves the demo's word-level tokenizer to `out_dir`; `AutoTokenizer.from_pretrained(out_dir)` loads it.

    LLaMA-like: <unk> 0, <s> 1 (added in front of every encoding), </s> 2, <pad> 3, and <image> 4 as an added
    special token. Encodes every text of `corpus()` without <unk>, decodes back to the exact text, and
    gives character offsets (return_offsets_mapping). `media`: covers the multi-image and video questions too.
    `template` (a conversation template name): covers its prompts too, its markers (chatml: <|im_start|> 5,
    <|im_end|> 6) added special tokens; the templates of COVERED_TEMPLATES (and None) change nothing.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    markers = template_special_tokens(template)
    specials = (*SPECIAL_TOKENS, *markers)
    tokenizer = Tokenizer(models.WordLevel(vocab=_vocabulary(corpus(media, template), specials), unk_token=UNK))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.add_special_tokens(list(specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE, *markers], model_max_length=MODEL_MAX_LENGTH, padding_side="right",
        clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    wrapped.save_pretrained(out_dir)
    return out_dir


@cli.command(OSError, ValueError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-stage1", type=int, default=2000, help="stage-1 caption samples")
    parser.add_argument("--num-stage2", type=int, default=2000, help="stage-2 conversations (5%% text-only)")
    parser.add_argument("--num-eval", type=int, default=400, help="held-out questions")
    parser.add_argument("--num-multi-image", type=int, default=0, help="stage-2 samples of 2-3 images")
    parser.add_argument("--num-video", type=int, default=0, help="stage-2 video samples (frame folders)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                        help="a conversation template the tokenizer covers too (e.g. qwen_1_5)")
    args = parser.parse_args(argv)
    paths = generate(args.out, num_stage1=args.num_stage1, num_stage2=args.num_stage2, num_eval=args.num_eval,
                     image_size=args.image_size, seed=args.seed, num_multi_image=args.num_multi_image,
                     num_video=args.num_video, template=args.template)
    chance = json.loads(paths.info.read_text())["chance"]
    print(f"wrote {paths.root}: {args.num_stage1} stage-1, {args.num_stage2} stage-2, {args.num_eval} eval samples")
    for category, level in chance.items():
        print(f"  eval {category:9s} {level['num']:5d} questions, chance {level['uniform']:.0%} "
              f"(majority answer {level['majority']:.1%})")


if __name__ == "__main__":
    main()
