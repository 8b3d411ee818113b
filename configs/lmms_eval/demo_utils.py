"""Functions of the llava_jax_demo lmms-eval task (see llava_jax_demo.yaml)."""

import json
import os
from pathlib import Path

from PIL import Image

from llava_jax.infer.scorers import normalize_gqa_prediction

DATA = Path(os.environ.get("LLAVA_JAX_DEMO_DATA", "/tmp/llava_demo/data"))


def process_docs(dataset):
    """Adds each question's gold answer (eval_answers.jsonl)."""
    lines = (DATA / "eval_answers.jsonl").read_text().splitlines()
    answers = {row["question_id"]: row["answer"] for row in map(json.loads, filter(None, lines))}
    return dataset.map(lambda doc: {"answer": answers[doc["question_id"]]})


def doc_to_visual(doc):
    return [Image.open(DATA / "images" / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def process_results(doc, results):
    return {"accuracy": float(normalize_gqa_prediction(results[0].strip()) == doc["answer"])}
