"""Answering a benchmark's question file: `evaluate()` and `python -m llava_jax.eval`.

Questions are in the official `model_vqa` JSONL format and are asked as the official `model_vqa_loader`
asks them (the LLaVA-1.5 evaluation scripts): `<image>\\n` + question as the only user turn of the template
(vicuna_v1 by default), the image padded to a square with the mean colour and CLIP-preprocessed, greedy
decoding, the answer stripped. Batching, the progress bar, resuming after a crash and sharding over JAX
processes come from `questions.run_questions`; with several processes, process 0 merges the shards. A
question's "image" may be a list of paths (several `<image>` lines) and, for LLaVA-OneVision models, a "video"
(a file or a frame folder, `--video-frames` sampled) adds a `<video>` line.

    python -m llava_jax.eval --model PATH --questions Q.jsonl --images DIR --answers OUT.jsonl \\
        [--template vicuna_v1] [--batch-size 8] [--max-new-tokens 128] [--repeated-ids]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from llava_jax import cli
from llava_jax.data.errors import BadSample
from llava_jax.data.images import ImageConfig, load_image
from llava_jax.data.paths import resolve_inside
from llava_jax.models.dtypes import DTYPES
from llava_jax.infer import questions as questions_lib
from llava_jax.infer.generate import Generator
from llava_jax.infer.media import read_video

DEFAULT_TEMPLATE = "vicuna_v1"  # the official LLaVA-1.5 evaluation scripts' --conv-mode


def answer_batch_fn(generator: Generator, image_root: str | os.PathLike, *, max_new_tokens: int,
                    temperature: float = 0.0, batch_size: int = 1,
                    image_transform: Callable[[Image.Image], Image.Image] | None = None, video_frames: int = 32
                    ) -> Callable[[list[dict]], list[str]]:
    """The `answer_batch` of `run_questions`: question dicts -> stripped answers, in one generate call (rows
    padded to `batch_size`, so the last batch reuses the compiled programs). A question's "image" may be a list
    (in order, each an `<image>` line) and its "video" (LLaVA-OneVision) a file or a frame folder, of which
    `video_frames` frames are sampled uniformly.

    Raises BadSample naming the question id when an image is missing, unreadable or outside `image_root`
    (`resolve_inside`: absolute, `..` or a symlink leading out are refused as "unsafe_path").
    """
    def media_of(question: dict) -> list:
        sample_id = str(question["question_id"])
        images = [load_image(resolve_inside(image_root, path, sample_id), sample_id=sample_id)
                  for path in image_paths(question)]
        media = [image_transform(image) if image_transform else image for image in images]
        if "video" in question:
            media.append(read_video(resolve_inside(image_root, question["video"], sample_id), video_frames))
        return media

    def answer(batch: list[dict]) -> list[str]:
        images = [media_of(q) for q in batch]
        prompts = [generator.prompt(q["text"], num_images=len(image_paths(q)), num_videos=int("video" in q))
                   for q in batch]
        texts = generator.generate(prompts, images, max_new_tokens=max_new_tokens, temperature=temperature,
                                   min_rows=batch_size)
        return [t.strip() for t in texts]

    return answer


def evaluate(model, tokenizer, questions_path: str | os.PathLike, image_root: str | os.PathLike,
             answers_path: str | os.PathLike, *, template: str = DEFAULT_TEMPLATE,
             image_config: ImageConfig | None = None, batch_size: int = 8, max_new_tokens: int = 128,
             model_id: str = "llava_jax", image_transform: Callable[[Image.Image], Image.Image] | None = None,
             temperature: float = 0.0, process_index: int | None = None, process_count: int | None = None,
             progress: bool = True, repeated_ids: bool = False, video_frames: int = 32) -> Path:
    """Answers every question of a `model_vqa` file into an answer file; returns `answers_path`.

    Args:
      model, tokenizer: a LLaVA model and its Hugging Face tokenizer.
      questions_path: JSONL of {"question_id", "text", "image" (relative to image_root, optional; a path or a
        list of paths), "video" (optional, LLaVA-OneVision: a file or a folder of frames), "category"}.
      image_root: the folder the questions' image and video paths are relative to.
      answers_path: the answer JSONL; answers already in it (after a crash) are kept and not asked again.
      template: conversation template name.
      image_config: image preprocessing (default: the tower's size, aspect "pad").
      batch_size, max_new_tokens, temperature: generation.
      model_id: written into every answer.
      image_transform: PIL image -> PIL image applied to every image (e.g. a blank image for a no-image baseline).
      process_index, process_count: this process's shard (default: jax.process_index() / process_count());
        process 0 merges the shards once every process is done.
      progress: show a progress bar.
      repeated_ids: accept a question_id asked several times with different texts (MME, MMBench's rounds);
        otherwise a repeated id is refused, naming its lines.
      video_frames: frames sampled uniformly from each video.
    """
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    questions = questions_lib.load_question_file(questions_path, repeated_ids)
    check_image_paths(questions, image_root)
    generator = Generator(model, tokenizer, image_config=image_config, template=template)
    videos = [q["question_id"] for q in questions if "video" in q]
    if videos and generator.video_token_index is None:
        raise ValueError(f"{len(videos)} question(s) have a 'video' (e.g. {videos[0]!r}) but the model takes no "
                         "videos (LLaVA-OneVision models do)")
    answer = answer_batch_fn(generator, image_root, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, image_transform=image_transform, video_frames=video_frames)
    questions_lib.run_questions(questions, answer, answers_path, batch_size=batch_size, model_id=model_id,
                                process_index=process_index, process_count=process_count,
                                progress=progress and process_index == 0)
    if process_count > 1 and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llava_jax.eval: all shards answered")
    if process_count > 1 and process_index == 0 and jax.process_count() > 1:
        questions_lib.merge_answers(answers_path, questions)
    return Path(answers_path)


def image_paths(question: dict) -> list[str]:
    """A question's image paths: none, its "image", or each of its "image" list (strings, checked)."""
    paths = question.get("image", [])
    paths = paths if isinstance(paths, list) else [paths]
    if not all(isinstance(p, str) for p in paths):
        raise ValueError(f"question {question['question_id']!r}: field 'image' must be a path or a list of paths, "
                         f"got {question['image']!r}")
    return paths


def check_image_paths(questions: Sequence[dict], image_root: str | os.PathLike) -> None:
    """Refuses a question file whose image (or video) paths leave `image_root` (absolute, `..`, symlinks out),
    before any model work: ValueError naming the count and the first question ids, reason "unsafe_path"."""
    unsafe = []
    for question in questions:
        for path in image_paths(question) + ([question["video"]] if "video" in question else []):
            try:
                resolve_inside(image_root, path, str(question["question_id"]))
            except BadSample as e:
                unsafe.append((question["question_id"], e))
                break
    if unsafe:
        ids = ", ".join(repr(qid) for qid, _ in unsafe[:5])
        raise ValueError(f"{len(unsafe)} question(s) with image paths outside {image_root} [unsafe_path], "
                         f"e.g. {ids}; first: {unsafe[0][1]}")


def build_parser() -> argparse.ArgumentParser:
    from llava_jax.models.quant import add_quantize_argument

    parser = argparse.ArgumentParser(prog="python -m llava_jax.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face LLaVA folder, a llava_jax folder or a "
                        "finished training workdir")
    parser.add_argument("--questions", required=True, help="model_vqa question JSONL (or the official ScienceQA "
                        "llava_test_CQM-A.json)")
    parser.add_argument("--images", required=True, help="folder the questions' image paths are relative to")
    parser.add_argument("--answers", required=True, help="answer JSONL to write (resumed when it exists)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="conversation template (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model-id", help="written into every answer (default: the model folder's name)")
    parser.add_argument("--dtype", choices=tuple(DTYPES))
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--repeated-ids", action="store_true", help="accept a question_id asked several times "
                        "with different texts (MME, MMBench --all-rounds); otherwise refused, naming the lines")
    parser.add_argument("--video-frames", type=int, default=32,
                        help="frames sampled uniformly from a question's video (default 32, as LLaVA-OneVision)")
    parser.add_argument("--no-progress", action="store_true")
    add_quantize_argument(parser)
    return parser


@cli.command(OSError, KeyError, ValueError)  # ModelLoadError and BadSample are ValueErrors
def main(argv: Sequence[str] | None = None) -> int:
    from llava_jax.data.conversation import get_template
    from llava_jax.infer.loading import load_generator

    args = build_parser().parse_args(argv)
    get_template(args.template)
    if args.video_frames < 1:
        raise ValueError(f"--video-frames must be >= 1, got {args.video_frames}")
    if not Path(args.questions).is_file():
        raise FileNotFoundError(f"question file not found: {args.questions}")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")
    questions = questions_lib.load_question_file(args.questions, args.repeated_ids)
    check_image_paths(questions, args.images)  # before loading the model
    generator = load_generator(args.model, dtype=args.dtype, template=args.template, tokenizer=args.tokenizer,
                               quantize=args.quantize)
    evaluate(generator.model, generator.tokenizer, args.questions, args.images, args.answers,
             template=args.template, image_config=generator.image_config, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             model_id=args.model_id or Path(args.model).resolve().name, progress=not args.no_progress,
             repeated_ids=args.repeated_ids, video_frames=args.video_frames)
    print(f"answers written to {args.answers}", file=sys.stderr)
    return 0


__all__ = ["evaluate", "answer_batch_fn", "check_image_paths", "image_paths", "main", "DEFAULT_TEMPLATE"]
