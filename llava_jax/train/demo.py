"""The demo's held-out evaluation: generation on the synthetic eval split, with real and with blank images.

Both runs go through the evaluation runner (`llava_jax.infer.evaluate`) and the exact-match scorer
(`llava_jax.infer.scorers`, GQA style), for LLaVA-1.5 and AnyRes (LLaVA-NeXT, OneVision) demo models alike: the
runner's Generator tiles each image as the model's family does, with the training's image config. The
blank-image run shows whether answers come through the vision path: its accuracy should sit near the chance
level of each category.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jax
import ml_collections as mlc

from llava_jax import atomic_files
from llava_jax.data import synthetic
from llava_jax.infer import scorers
from llava_jax.infer.evaluate import evaluate as run_eval
from llava_jax.train.inputs import image_config


def per_category(answers_path: Path, gold_path: Path) -> dict[str, float]:
    """Exact-match accuracy per question category."""
    gold = scorers.load_gqa_questions(gold_path)
    predictions = scorers.predictions_by_id(scorers.load_answers(answers_path), answers_path)
    hits = defaultdict(list)
    for qid, question in gold.items():
        hits[question["category"]].append(
            scorers.normalize_gqa_prediction(predictions.get(qid, "")) == question["answer"])
    return {category: sum(h) / len(h) for category, h in sorted(hits.items())}


def evaluate(model, tokenizer, paths: synthetic.SyntheticPaths, c: mlc.ConfigDict, workdir: Path) -> dict:
    """Runs both evaluations, prints a table and returns {"images": {...}, "blank": {...}, "chance": {...}}."""
    blank = synthetic.blank_image(c.demo.image_size)
    results = {"chance": json.loads(Path(paths.info).read_text())["chance"]}
    for name, transform in (("images", None), ("blank", lambda _: blank)):
        answers = Path(workdir) / f"eval_answers_{name}.jsonl"
        answers.unlink(missing_ok=True)
        run_eval(model, tokenizer, paths.eval_questions, paths.images, answers, template=c.data.template,
                 image_config=image_config(c, model.config), batch_size=c.demo.eval_batch_size,
                 max_new_tokens=8, model_id=f"demo-{name}", image_transform=transform, progress=False)
        if jax.process_index() == 0:
            overall = scorers.score_gqa_files(answers, paths.eval_answers)["accuracy"]
            results[name] = {"accuracy": overall, **per_category(answers, paths.eval_answers)}
    if jax.process_index() == 0:
        print(format_table(results), flush=True)
        atomic_files.write_text(Path(workdir) / "demo_eval.json", json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    categories = [k for k in results["images"] if k != "accuracy"]
    lines = [f"{'held-out accuracy':<20}{'images':>10}{'blank':>10}{'chance':>10}"]
    for category in categories:
        chance = results["chance"].get(category, {})
        chance = chance.get("majority", float("nan")) if isinstance(chance, dict) else chance
        lines.append(f"{category:<20}{results['images'][category]:>10.1%}{results['blank'][category]:>10.1%}"
                     f"{chance:>10.1%}")
    lines.append(f"{'all':<20}{results['images']['accuracy']:>10.1%}{results['blank']['accuracy']:>10.1%}")
    return "\n".join(lines)
