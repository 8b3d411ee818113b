"""GPT-assisted instruction data from COCO annotations: `python -m llava_jax.data.generate`.

    python -m llava_jax.data.generate --captions annotations/captions_train2014.json \\
        --instances annotations/instances_train2014.json --out-dir data/instruct \\
        --model gpt-4o-mini [--base-url http://127.0.0.1:8000/v1] [--families conversation ...] \\
        [--prompts DIR] [--image-ids FILE] [--max-images N] [--concurrency 8] [--seed 0]

A text-only LLM sees each image through its captions and boxes (`coco_context`) and answers the few-shot
prompts of each family (`instruct`); the answers become `<out-dir>/<family>.json` in the LLaVA training
format, ready for stage 2 (`--config.data.json`, or several through `data.extra_sources`). Every reply is
stored in `<out-dir>/cache.sqlite` as it arrives: rerunning the same command after a kill or a failure
makes only the calls still missing, and a finished run reruns without a call. Output files are replaced
atomically. Malformed answers are counted and skipped, with their image ids, in `<out-dir>/report.json`
(with tokens and cost). Exit status 1 when some requests failed after their retries (rerun to retry
them), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llava_jax import cli
from llava_jax.data import instruct
from llava_jax.data.coco_context import ImageContext, file_stem, load_coco
from llava_jax.atomic_files import write_text
from llava_jax.data.llm_client import ChatClient, add_client_arguments, client_from_args, failure_line

EXAMPLES_PRINTED = 5


def generate_family(family: instruct.FamilyPrompt, images: Sequence[ImageContext], client: ChatClient,
                    out_path: str | Path, *, seed: int, temperature: float, max_tokens: int,
                    progress: bool = True) -> dict:
    """Asks for every image, writes the parsed samples (image order) to `out_path`; returns the counts."""
    with_boxes = instruct.USES_BOXES[family.name]
    tagged = ((index, client.request(family.messages(image.text(with_boxes)), temperature=temperature,
                                     max_tokens=max_tokens)) for index, image in enumerate(images))
    samples: list[dict | None] = [None] * len(images)
    malformed, failed = {}, {}
    for index, reply in client.complete_all(tagged, desc=family.name, total=len(images), progress=progress):
        image_id = file_stem(images[index].file_name)
        if reply.error is not None:
            failed[image_id] = reply.error
            continue
        try:
            pairs = instruct.parse_response(family, reply.content, reply.finish_reason)
        except instruct.MalformedResponse as e:
            malformed[image_id] = str(e)
            continue
        samples[index] = instruct.build_sample(family, images[index], pairs, seed)
    kept = [s for s in samples if s is not None]
    write_text(out_path, json.dumps(kept, indent=2, ensure_ascii=False) + "\n")
    return {"output": str(out_path), "images": len(images), "samples": len(kept),
            "malformed": len(malformed), "malformed_ids": dict(sorted(malformed.items())),
            "failed": len(failed), "failed_ids": dict(sorted(failed.items()))}


def select_images(images: Sequence[ImageContext], ids_path: str | Path) -> list[ImageContext]:
    """The images listed in `ids_path` (one COCO image id per line), in image-id order."""
    wanted = {}
    for line_no, line in enumerate(Path(ids_path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            if not line.strip().isdigit():
                raise ValueError(f"{ids_path}:{line_no}: expected a COCO image id, got {line.strip()!r}")
            wanted[int(line)] = line_no
    known = {image.image_id for image in images}
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ValueError(f"{ids_path}:{wanted[unknown[0]]}: image id {unknown[0]} has no captions "
                         f"({len(unknown)} such ids)")
    return [image for image in images if image.image_id in wanted]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.generate", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="COCO captions_*.json")
    parser.add_argument("--instances", help="COCO instances_*.json (the boxes; without it, captions only)")
    parser.add_argument("--out-dir", required=True, help="where <family>.json, report.json and the cache go")
    parser.add_argument("--families", nargs="+", default=list(instruct.FAMILIES), choices=instruct.FAMILIES)
    parser.add_argument("--prompts", help="prompts folder in the playground/data/prompts layout "
                        "(default: the packaged prompts)")
    parser.add_argument("--image-ids", help="text file of COCO image ids (one per line): only those images")
    parser.add_argument("--max-images", type=int, help="only the first N images (by image id)")
    parser.add_argument("--seed", type=int, default=0, help="<image> placement and description questions")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=1024)
    add_client_arguments(parser, default_model="gpt-4o-mini")
    return parser


def run(args) -> dict:
    prompts_dir = args.prompts or instruct.default_prompts_dir()
    families = [instruct.load_family(prompts_dir, name) for name in args.families]
    images = load_coco(args.captions, args.instances)
    if args.image_ids:
        images = select_images(images, args.image_ids)
    images = images[:args.max_images]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = client_from_args(args, out_dir / "cache.sqlite")
    try:
        report = {f.name: generate_family(f, images, client, out_dir / f"{f.name}.json", seed=args.seed,
                                          temperature=args.temperature, max_tokens=args.max_tokens,
                                          progress=not args.no_progress) for f in families}
    finally:
        client.close()
    report["usage"] = client.usage.report(args.input_price, args.output_price)
    write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


@cli.command(OSError, ValueError)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    for name in args.families:
        r = report[name]
        print(f"{name}: {r['samples']} samples of {r['images']} images -> {r['output']} "
              f"({r['malformed']} malformed, {r['failed']} failed)", file=sys.stderr)
        for image_id, reason in list(r["malformed_ids"].items())[:EXAMPLES_PRINTED]:
            print(f"  malformed answer for image {image_id}: {reason}", file=sys.stderr)
    u = report["usage"]
    print(f"calls {u['calls']}, cached {u['cached']}, failed {u['failed']}; tokens in {u['prompt_tokens']} "
          f"out {u['completion_tokens']}; cost {u['cost']}", file=sys.stderr)
    if u["failed"]:
        print(failure_line(u), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
