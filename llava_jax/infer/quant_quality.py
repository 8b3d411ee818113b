"""How much weight-only quantization (`llava_jax.models.quant`) changes a model, measured, not assumed.

- `layer_errors`: the relative error ||h_q - h|| / ||h|| of the residual stream after each decoder layer, and of
  the logits, on the same input ids.
- `greedy_agreement`: tokens identical up to the first divergence, as a fraction of the reference answer's
  length, averaged over answers.
- `decode_memory`: what XLA's memory analysis says one compiled decode step holds (weights, KV cache,
  temporaries), from abstract shapes only (nothing is allocated).

    python -m llava_jax.infer.quant_quality --model HF_OR_OUR_DIR --questions Q.jsonl --images DIR \
        --gold GOLD.jsonl --workdir OUT [--template v1]

writes the quantized folders (`convert quantize`), answers the questions with each through the evaluation CLI
(`python -m llava_jax.eval`, bf16 compute, greedy), scores them with the GQA exact-match scorer (the demo's)
and prints a markdown table: decode-step weight bytes, greedy agreement with bf16 (on the answers' tokens),
the largest per-layer and the logits' relative error, held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import cli
from llava_jax.infer.decoding import language_model
from llava_jax.models.llama import rope_cos_sin


def layer_outputs(model, input_ids: jax.Array) -> list[jax.Array]:
    """The residual stream [B, T, D] after each decoder layer (float32), then the logits [B, T, V], of a causal
    LM (or a LLaVA's language model; layers stacked or not) on unpadded ids [B, T]."""
    llm = language_model(model)
    graphdef, state = nnx.split(llm)

    @jax.jit
    def run(state, ids):
        llm = nnx.merge(graphdef, state)
        decoder = llm.model
        b, t = ids.shape
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (b, t)), decoder.rope, decoder.dtype)
        x, outs = llm.embed(ids), []
        for layer in _each_layer(decoder.layers):
            x, _ = layer(x, cos, sin, None)
            outs.append(x.astype(jnp.float32))
        return outs + [llm.logits(decoder.norm(x))]

    return run(state, jnp.asarray(input_ids, jnp.int32))


def _each_layer(stack) -> list:
    """The decoder layers as modules, from a stack (`make_stack`) or a list (`unstack_layers`)."""
    if isinstance(stack, nnx.List):
        return list(stack)
    graphdef, state = nnx.split(stack)
    count = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(count)]


def relative_error(approx: jax.Array, exact: jax.Array) -> float:
    exact = np.asarray(exact, np.float64)
    return float(np.linalg.norm(np.asarray(approx, np.float64) - exact) / max(np.linalg.norm(exact), 1e-30))


def layer_errors(reference, quantized, input_ids) -> list[float]:
    """Relative error per decoder layer output, the last entry the logits'."""
    return [relative_error(q, r) for q, r in zip(layer_outputs(quantized, input_ids),
                                                 layer_outputs(reference, input_ids))]


def agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Length of the common prefix over the reference length (1.0 for two empty answers)."""
    reference, other = list(reference), list(other)
    if not reference:
        return float(not other)
    same = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    return same / len(reference)


def greedy_agreement(reference: Sequence[Sequence[int]], others: Sequence[Sequence[int]]) -> float:
    """Mean `agreement` over answers (token id lists, same order)."""
    if len(reference) != len(others) or not reference:
        raise ValueError(f"greedy_agreement: {len(reference)} reference answers, {len(others)} others")
    return float(np.mean([agreement(r, o) for r, o in zip(reference, others)]))


def decode_memory(model, batch: int = 1, cache_length: int = 256) -> dict[str, int]:
    """XLA's memory analysis of one compiled one-token decode step of `model`'s language model, from abstract
    shapes: {"weights", "cache", "arguments", "temporaries"} in bytes (weights = arguments - cache - ids)."""
    llm = language_model(model)
    graphdef, state = nnx.split(llm)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    cache = jax.eval_shape(lambda: llm.init_cache(batch, cache_length))
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def step(state, cache, ids):
        return nnx.merge(graphdef, state).decode(cache, ids)

    memory = jax.jit(step, donate_argnums=(1,)).lower(abstract, cache, ids).compile().memory_analysis()
    cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))
    arguments = int(memory.argument_size_in_bytes)
    return {"weights": arguments - cache_bytes - batch * 4, "cache": cache_bytes, "arguments": arguments,
            "temporaries": int(memory.temp_size_in_bytes)}


VARIANTS = (("bf16", None, None), ("int8", 8, 128), ("int4 g128", 4, 128), ("int4 g32", 4, 32))


def _variant_folder(model: Path, workdir: Path, name: str, bits, group) -> Path:
    from llava_jax.convert.quantize import quantize_folder
    from llava_jax.models.quant import QuantConfig

    if bits is None:
        return model
    out = workdir / name.replace(" ", "_")
    if (out / "model.json").is_file():
        return out
    return quantize_folder(model, out, QuantConfig(bits, group), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def _answer(folder: Path, args, answers: Path) -> None:
    from llava_jax.infer import evaluate

    if answers.is_file():
        return
    code = evaluate.main(["--model", str(folder), "--questions", str(args.questions), "--images", str(args.images),
                          "--answers", str(answers), "--template", args.template, "--dtype", "bfloat16",
                          "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                          "--no-progress"])
    if code:
        raise SystemExit(f"evaluation of {folder} failed (exit {code})")


def _probe_ids(tokenizer, questions_path: Path, rows: int = 8) -> np.ndarray:
    """[rows, T] text-only ids: the first questions, cut to the shortest."""
    from llava_jax.infer import questions as questions_lib

    encoded = [tokenizer(q["text"])["input_ids"] for q in questions_lib.load_question_file(questions_path)[:rows]]
    length = min(len(e) for e in encoded)
    return np.array([e[:length] for e in encoded], np.int32)


def measure(args) -> list[dict]:
    """One row per variant: name, weight bytes, agreement, max layer error, logits error, accuracy."""
    from llava_jax.infer import scorers
    from llava_jax.infer.generate import load_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    reference, tokenizer, *_ = load_model(args.model, dtype=jnp.bfloat16)
    ids = _probe_ids(tokenizer, args.questions)
    texts, rows = {}, []
    for name, bits, group in VARIANTS:
        folder = _variant_folder(args.model, args.workdir, name, bits, group)
        answers = args.workdir / f"answers_{name.replace(' ', '_')}.jsonl"
        _answer(folder, args, answers)
        texts[name] = {a["question_id"]: a["text"] for a in scorers.load_answers(answers)}
        model = load_model(folder, dtype=jnp.bfloat16)[0]
        errors = layer_errors(reference, model, ids)
        questions = sorted(texts["bf16"])
        ref_ids = [tokenizer(texts["bf16"][q], add_special_tokens=False)["input_ids"] for q in questions]
        ids_q = [tokenizer(texts[name].get(q, ""), add_special_tokens=False)["input_ids"] for q in questions]
        rows.append({"variant": name, "weights": decode_memory(model)["weights"],
                     "agreement": greedy_agreement(ref_ids, ids_q), "layer_error": max(errors[:-1]),
                     "logits_error": errors[-1], "accuracy": scorers.score_gqa_files(answers, args.gold)["accuracy"]})
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]["weights"]
    lines = ["| weights | decode-step weight bytes (XLA) | greedy agreement with bf16 | max layer error | "
             "logits error | held-out accuracy |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['weights'] / 2**10:.0f} KiB ({r['weights'] / base:.2f}x) | "
                     f"{r['agreement']:.1%} | {r['layer_error']:.2%} | {r['logits_error']:.2%} | {r['accuracy']:.1%} |")
    return "\n".join(lines)


@cli.command(OSError, ValueError)  # ModelLoadError is a ValueError
def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m llava_jax.infer.quant_quality", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--gold", type=Path, required=True, help="the gold answers (GQA-style JSONL)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--template", default="v1")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    rows = measure(args)
    (args.workdir / "quant_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(format_table(rows))
    return 0


__all__ = ["layer_outputs", "layer_errors", "relative_error", "agreement", "greedy_agreement", "decode_memory"]


if __name__ == "__main__":
    raise SystemExit(main())
