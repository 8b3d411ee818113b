"""Instruction-data generation and the LLaVA-Bench judge against our own `llava_jax.serve` on 127.0.0.1.

The server runs a tiny random LLaVA with the real LLaMA-2 tokenizer. Its output head is edited so that the
token it would emit third becomes end-of-sequence, so most replies stop after two tokens (the rest are cut at
`max_tokens`): replies that end are accepted or judged malformed by their content, cut ones are counted as
malformed. The requests' prompts are checked token for token against the official vicuna_v1 conversation
(`llava.conversation` of llava-torch), so the system message and every few-shot turn reach the model."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("openai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llava_jax.data import generate, instruct  # noqa: E402
from llava_jax.infer import judge  # noqa: E402
from llava_jax.infer.serve import cli  # noqa: E402
from tests.conftest import LLAMA2_TOKENIZER  # noqa: E402
from tests.data.official_llava import conversation_module  # noqa: E402
from tests.data.test_generate import coco_files  # noqa: E402
from tests.infer.test_judge import bench_files  # noqa: E402

IMAGES = 3
MAX_TOKENS = 12


def save_llama2_llava(path: Path, tokenizer_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """A tiny random LLaVA over the LLaMA-2 tokenizer (+ <image>, <pad>) whose greedy replies mostly stop early."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vision = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=97, num_hidden_layers=2,
                  num_attention_heads=3, image_size=30, patch_size=6)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=25,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = transformers.LlavaForConditionalGeneration(config).eval()
    # The third greedy token of a text prompt becomes end-of-sequence: wherever that token would win with a
    # positive logit, end-of-sequence (its row doubled) wins instead.
    ids = tokenizer("USER: Hello ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        third = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)[0, -1]
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = 2.0 * head[third]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
                                    ).save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL with /v1, tokenizer) of our server on a tiny LLaVA named like a v1.5 model (vicuna_v1)."""
    if not (LLAMA2_TOKENIZER / "tokenizer.model").exists():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2_TOKENIZER}")
    model_dir = tmp_path_factory.mktemp("self_served") / "llava-v1.5-tiny"
    tokenizer = save_llama2_llava(model_dir, LLAMA2_TOKENIZER)
    args = cli.build_parser().parse_args(["--model", str(model_dir), "--max-batch", "8", "--batch-window-ms", "20",
                                          "--max-tokens", str(MAX_TOKENS), "--warm-up", "none"])
    engine = cli.build_engine(args)
    try:
        with cli.serve_in_background(cli.build_app(args, engine)) as url:
            yield url + "/v1", tokenizer
    finally:
        engine.close()


def cached(cache_path: Path) -> list[tuple[dict, dict]]:
    """(request, reply) pairs of a run's request cache."""
    with sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True) as db:
        return [(json.loads(request), json.loads(reply))
                for request, reply in db.execute("SELECT request, reply FROM replies")]


def official_prompt_tokens(messages: list[dict], tokenizer) -> int:
    """Prompt length of `messages` rendered by the official vicuna_v1 conversation (system replaced)."""
    conversation = conversation_module().conv_templates["vicuna_v1"].copy()
    if messages[0]["role"] == "system":
        conversation.system = messages[0]["content"]
        messages = messages[1:]
    for message in messages:
        conversation.append_message(conversation.roles[message["role"] == "assistant"], message["content"].strip())
    conversation.append_message(conversation.roles[1], None)
    return len(tokenizer(conversation.get_prompt()).input_ids)


def test_instruction_data_generation_against_our_server(tmp_path, served):
    url, tokenizer = served
    cap, inst = coco_files(tmp_path, n=IMAGES)
    args = ["--captions", str(cap), "--instances", str(inst), "--out-dir", str(tmp_path / "out"), "--base-url", url,
            "--model", "llava-v1.5-tiny", "--no-progress", "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
            "--concurrency", "3"]
    assert generate.main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    pairs = cached(tmp_path / "out" / "cache.sqlite")
    assert len(pairs) == 3 * IMAGES and report["usage"]["calls"] == 3 * IMAGES and report["usage"]["failed"] == 0
    # the system message and every few-shot turn reached the model in the official vicuna_v1 rendering
    for request, reply in pairs:
        assert reply["prompt_tokens"] == official_prompt_tokens(request["messages"], tokenizer)
        assert reply["error"] is None and 1 <= reply["completion_tokens"] <= MAX_TOKENS
    assert report["usage"]["prompt_tokens"] == sum(reply["prompt_tokens"] for _, reply in pairs)
    stopped = {reply["content"] for _, reply in pairs if reply["finish_reason"] == "stop"}
    assert stopped and all(text.strip() for text in stopped)

    outputs = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text()) for name in instruct.FAMILIES}
    for name in instruct.FAMILIES:
        assert report[name]["samples"] + report[name]["malformed"] == IMAGES and report[name]["failed"] == 0
        assert len(outputs[name]) == report[name]["samples"]
        for sample in outputs[name]:  # an accepted sample answers with what the server said
            assert sample["conversations"][1]["value"] in {text.strip() for text in stopped}
    # a detail description is any text that ends: every stopped reply became a sample
    detail_system = instruct.load_family(instruct.default_prompts_dir(), "detail_description").system_message
    detail = [reply for request, reply in pairs if request["messages"][0]["content"] == detail_system]
    assert report["detail_description"]["samples"] == sum(r["finish_reason"] == "stop" for r in detail)
    # a rerun asks the server nothing and writes the same data
    assert generate.main(args) == 0
    rerun = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rerun["usage"]["calls"] == 0 and rerun["usage"]["cached"] == 3 * IMAGES
    assert {name: json.loads((tmp_path / "out" / f"{name}.json").read_text()) for name in instruct.FAMILIES} == outputs


def test_llava_bench_judged_by_our_server(tmp_path, served, capsys):
    url, tokenizer = served
    paths = bench_files(tmp_path, coco=False)
    reviews = tmp_path / "reviews.jsonl"
    args = ["llava-bench", "--questions", str(paths["questions"]), "--context", str(paths["context"]),
            "--reference", str(paths["reference"]), "--answers", str(paths["answers"]), "--reviews", str(reviews),
            "--base-url", url, "--model", "llava-v1.5-tiny", "--no-progress", "--concurrency", "4"]
    # the official judge asks for 1024 tokens, over this server's limit: one line says what the server said
    assert judge.main(args + ["--max-retries", "0"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "7 requests failed" in error[0]
    assert f"max_tokens: 1024 is over this server's limit of {MAX_TOKENS}" in error[0]
    args += ["--max-tokens", str(MAX_TOKENS)]
    assert judge.main(args) == 0
    lines = [json.loads(line) for line in reviews.read_text().splitlines()]
    pairs = cached(tmp_path / "reviews.jsonl.cache.sqlite")
    assert len(lines) == 7 and len(pairs) == 7
    replies = {request["messages"][-1]["content"]: reply for request, reply in pairs}
    for request, reply in pairs:
        assert reply["prompt_tokens"] == official_prompt_tokens(request["messages"], tokenizer)
    for line in lines:  # each review holds the server's reply and the official parse of it
        assert line["content"] in {reply["content"] for reply in replies.values()}
        assert line["tuple"] == judge.parse_score(line["content"])
    summary = judge.summarize_review_file(reviews)
    assert summary["all"]["count"] == 7
    assert summary["all"]["unparsed"] == sum(line["tuple"] == [-1, -1] for line in lines)
    assert judge.main(args) == 0  # a rerun is answered from the cache
    assert [json.loads(line) for line in reviews.read_text().splitlines()] == lines
