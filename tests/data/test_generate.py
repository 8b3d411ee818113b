"""GPT-assisted instruction data: context and prompt construction by hand-worked examples, parsing of good and
malformed answers, and runs against a real local OpenAI-compatible server (retries, cache, kill and resume)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_jax.data import coco_context, generate, instruct
from llava_jax.data.llm_client import ChatClient, request_key
from llava_jax.data.tokenize import validate_conversations
from tests.llm_stub import StubLLM

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- context


def test_normalized_box_hand_worked():
    # [x, y, w, h] = [10, 20, 30, 40] in 640 x 480: 10/640 = .015625, 20/480 = .0417, 40/640 = .0625 (half to
    # even: .062), 60/480 = .125
    assert coco_context.normalized_box([10, 20, 30, 40], 640, 480) == (0.016, 0.042, 0.062, 0.125)
    # a box reaching past the image border is clipped to 1
    assert coco_context.normalized_box([600, 400, 50, 100.5], 640, 480) == (0.938, 0.833, 1.0, 1.0)


def coco_files(tmp_path: Path, n: int = 3, marks: dict | None = None) -> tuple[Path, Path]:
    """Captions and instances of `n` images (ids 1..n, 640 x 480), plus one image without captions.

    `marks[i]` is appended to the first caption of image i (the stub server reacts to it).
    """
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 640, "height": 480}
              for i in range(1, n + 2)]
    captions = [{"id": 100 * i + k, "image_id": i, "caption": f" Image {i} caption {k}." +
                 ((marks or {}).get(i, "") if k == 0 else "") + "\n"} for i in range(1, n + 1) for k in range(2)]
    instances = [{"id": 1000 + i, "image_id": i, "category_id": 18, "bbox": [10 * i, 20, 30, 40]}
                 for i in range(1, n + 2)]
    instances.append({"id": 5000, "image_id": 1, "category_id": 3, "bbox": [0, 0, 640, 480]})
    categories = [{"id": 18, "name": "dog"}, {"id": 3, "name": "fire hydrant"}]
    cap_path, inst_path = tmp_path / "captions.json", tmp_path / "instances.json"
    cap_path.write_text(json.dumps({"images": images, "annotations": captions}))
    inst_path.write_text(json.dumps({"images": images, "annotations": instances, "categories": categories}))
    return cap_path, inst_path


def test_load_coco_and_context_text_hand_worked(tmp_path):
    images = coco_context.load_coco(*coco_files(tmp_path, n=2))
    assert [i.image_id for i in images] == [1, 2]  # image 3 has no caption
    assert images[0].text() == ("Image 1 caption 0.\nImage 1 caption 1.\n\n"
                                "dog: [0.016, 0.042, 0.062, 0.125]\nfire hydrant: [0.0, 0.0, 1.0, 1.0]")
    assert images[0].text(with_boxes=False) == "Image 1 caption 0.\nImage 1 caption 1."
    assert coco_context.file_stem(images[1].file_name) == "COCO_train2014_000000000002"


def test_load_coco_errors_name_the_file(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 1, "height": 1}],
                               "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"captions.json: caption annotation #1 needs a known image_id"):
        coco_context.load_coco(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"captions.json: malformed JSON"):
        coco_context.load_coco(bad)


# ---------------------------------------------------------------- prompts


def test_messages_from_a_prompts_folder_hand_worked(tmp_path):
    folder = tmp_path / "prompts" / "complex_reasoning"
    folder.mkdir(parents=True)
    (folder / "system_message.txt").write_text("You see one image.\n")
    (folder / "000_caps.txt").write_text("A cat.\n\ncat: [0.1, 0.2, 0.3, 0.4]")
    (folder / "000_conv.txt").write_text("Question:\nWhy?\n===\nAnswer:\nBecause.")
    (folder / "001_caps.txt").write_text("A dog.")
    (folder / "001_conv.txt").write_text("Question:\nWhere?\n===\nAnswer:\nHere.")
    family = instruct.load_family(tmp_path / "prompts", "complex_reasoning")
    assert family.messages("Two birds.\n\nbird: [0.0, 0.0, 0.5, 0.5]") == [
        {"role": "system", "content": "You see one image."},
        {"role": "user", "content": "A cat.\n\ncat: [0.1, 0.2, 0.3, 0.4]"},
        {"role": "assistant", "content": "Question:\nWhy?\n===\nAnswer:\nBecause."},
        {"role": "user", "content": "A dog."},
        {"role": "assistant", "content": "Question:\nWhere?\n===\nAnswer:\nHere."},
        {"role": "user", "content": "Two birds.\n\nbird: [0.0, 0.0, 0.5, 0.5]"},
    ]
    (folder / "001_conv.txt").unlink()
    with pytest.raises(ValueError, match=r"001_caps.txt: no matching 001_conv.txt"):
        instruct.load_family(tmp_path / "prompts", "complex_reasoning")
    with pytest.raises(ValueError, match=r"conversation: no system_message.txt"):
        instruct.load_family(tmp_path / "prompts", "conversation")


@pytest.mark.parametrize("name", instruct.FAMILIES)
def test_packaged_prompts_are_well_formed(name):
    """Our shipped few-shot answers parse as the answers we ask for, and contexts show boxes where the family does."""
    family = instruct.load_family(instruct.default_prompts_dir(), name)
    assert len(family.examples) >= 2 and family.system_message
    for caps, conv in family.examples:
        assert instruct.parse_response(family, conv)
        box_lines = [line for line in caps.splitlines() if ": [" in line]
        assert bool(box_lines) == instruct.USES_BOXES[name]
        for line in box_lines:
            values = json.loads(line.split(": ", 1)[1])
            assert len(values) == 4 and all(0 <= v <= 1 and round(v, 3) == v for v in values)
    assert bool(family.instructions) == (name == "detail_description")


# ---------------------------------------------------------------- parsing


def test_parse_turns_question_answer_and_user_gpt_formats():
    text = "Question:\nWhat color?\n===\nAnswer:\nRed.\n\nVery red.\n===\nQuestion:\nHow many?\n===\nAnswer:\nTwo.\n"
    assert instruct.parse_turns(text) == [("What color?", "Red.\n\nVery red."), ("How many?", "Two.")]
    assert instruct.parse_turns("User: What color?\nGPT: Red.\nUser: How many?\nGPT: Two.") == [
        ("What color?", "Red."), ("How many?", "Two.")]


@pytest.mark.parametrize("text, reason", [
    ("The image shows a dog.", "no 'Question:'"),
    ("Sure! Here it is.\nQuestion:\nA?\n===\nAnswer:\nB.", "text before the first turn"),
    ("Question:\nA?\n===\nQuestion:\nB?\n===\nAnswer:\nC.\n===\nAnswer:\nD.", "do not alternate"),
    ("Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?", "do not alternate"),
    ("Question:\nA?\n===\nAnswer:\n===\n", "empty 'Answer:' turn"),
])
def test_parse_turns_malformed(text, reason):
    with pytest.raises(instruct.MalformedResponse, match=reason):
        instruct.parse_turns(text)


def test_parse_response_per_family():
    prompts = instruct.default_prompts_dir()
    conv, detail, complex_ = (instruct.load_family(prompts, n) for n in instruct.FAMILIES)
    two = "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD."
    assert instruct.parse_response(conv, two) == [("A?", "B."), ("C?", "D.")]
    with pytest.raises(instruct.MalformedResponse, match="one question and answer, got 2"):
        instruct.parse_response(complex_, two)
    assert instruct.parse_response(detail, "  A dog on a sofa.\n") == [("", "A dog on a sofa.")]
    with pytest.raises(instruct.MalformedResponse, match="description with"):
        instruct.parse_response(detail, two)
    with pytest.raises(instruct.MalformedResponse, match="empty response"):
        instruct.parse_response(detail, " \n")
    with pytest.raises(instruct.MalformedResponse, match="cut at max_tokens"):
        instruct.parse_response(detail, "A dog on a", finish_reason="length")
    with pytest.raises(instruct.MalformedResponse, match="contains <image>"):
        instruct.parse_response(conv, "Question:\nWhat is in <image>?\n===\nAnswer:\nA dog.")


def test_build_sample_places_image_at_random_with_a_seed(tmp_path):
    prompts = instruct.default_prompts_dir()
    conv, detail = instruct.load_family(prompts, "conversation"), instruct.load_family(prompts, "detail_description")
    image = coco_context.ImageContext(9, "train2014/COCO_train2014_000000000009.jpg", ("c",))
    sample = instruct.build_sample(conv, image, [("A?", "B."), ("C?", "D.")], seed=0)
    assert sample["id"] == "COCO_train2014_000000000009" and sample["image"] == image.file_name
    first = sample["conversations"][0]["value"]
    assert first in ("<image>\nA?", "A?\n<image>")
    assert [t["value"] for t in sample["conversations"][1:]] == ["B.", "C?", "D."]
    assert [t["from"] for t in sample["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert instruct.build_sample(conv, image, [("A?", "B."), ("C?", "D.")], seed=0) == sample  # reproducible
    placements = {instruct.build_sample(conv, image, [("A?", "B.")], seed=s)["conversations"][0]["value"]
                  for s in range(20)}
    assert placements == {"<image>\nA?", "A?\n<image>"}
    described = instruct.build_sample(detail, image, [("", "A dog.")], seed=1)
    question = described["conversations"][0]["value"].replace("<image>", "").strip()
    assert question in detail.instructions and described["conversations"][1]["value"] == "A dog."


# ---------------------------------------------------------------- runs against a local server


def respond(request: dict) -> str:
    """A deterministic generator: answers in the format the family's system message asks for."""
    context = request["messages"][-1]["content"]
    first_caption = context.split("\n")[0]
    describe = "Describe the image in rich detail" in request["messages"][0]["content"]
    if "MALFORMED" in context:
        return "" if describe else "I'm sorry, I cannot see images."
    if describe:
        return f"A detailed description of: {first_caption}"
    return f"Question:\nWhat is shown?\n===\nAnswer:\n{first_caption}"


def fail_marked(request: dict, attempt: int) -> int | None:
    context = request["messages"][-1]["content"]
    if "RATE_LIMIT" in context and attempt == 1:
        return 429
    if "SERVER_ERROR" in context and attempt <= 2:
        return 500
    return 500 if "ALWAYS_DOWN" in context else None


def generate_args(cap, inst, out_dir, url, *extra) -> list[str]:
    return ["--captions", str(cap), "--instances", str(inst), "--out-dir", str(out_dir), "--base-url", url,
            "--model", "stub", "--no-progress", "--max-retries", "3", "--input-price", "1.0",
            "--output-price", "2.0", *extra]


def read_outputs(out_dir: Path) -> dict:
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name in instruct.FAMILIES}


def test_generate_retries_counts_malformed_and_reruns_from_the_cache(tmp_path):
    marks = {1: " RATE_LIMIT", 2: " SERVER_ERROR", 3: " MALFORMED"}
    cap, inst = coco_files(tmp_path, n=5, marks=marks)
    with StubLLM(respond, fail=fail_marked) as stub:
        assert generate.main(generate_args(cap, inst, tmp_path / "out", stub.url)) == 0
        outputs = read_outputs(tmp_path / "out")
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert stub.total_answered() == 15 and max(stub.answered.values()) == 1
        assert sorted(stub.attempts.values()) == [1] * 9 + [2] * 3 + [3] * 3  # 429 once, 500 twice

        # a rerun answers everything from the cache: no call
        assert generate.main(generate_args(cap, inst, tmp_path / "out", stub.url)) == 0
        assert stub.total_answered() == 15 and read_outputs(tmp_path / "out") == outputs
        rerun = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in instruct.FAMILIES:
        assert report[name]["samples"] == 4 and report[name]["malformed"] == 1
        assert list(report[name]["malformed_ids"]) == ["COCO_train2014_000000000003"]
        assert [s["id"] for s in outputs[name]] == [f"COCO_train2014_{i:012d}" for i in (1, 2, 4, 5)]
    for name in instruct.FAMILIES:  # samples the training pipeline accepts
        for sample in outputs[name]:
            validate_conversations(sample["conversations"], sample["id"])
    conv = outputs["conversation"][1]
    assert conv["conversations"][1] == {"from": "gpt", "value": "Image 2 caption 0. SERVER_ERROR"}
    assert outputs["detail_description"][0]["conversations"][1]["value"].startswith("A detailed description of")
    usage = report["usage"]
    assert usage["calls"] == 15 and usage["cached"] == 0 and usage["failed"] == 0
    tokens = sum(len(json.dumps(r["messages"])) // 4 for r in stub.requests.values())
    assert usage["prompt_tokens"] == tokens
    assert usage["cost"] == pytest.approx((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)
    assert rerun["usage"]["calls"] == 0 and rerun["usage"]["cached"] == 15 and rerun["usage"]["cost"] == 0


def test_failed_requests_exit_1_and_a_rerun_calls_only_those(tmp_path):
    cap, inst = coco_files(tmp_path, n=3, marks={2: " ALWAYS_DOWN"})
    args = generate_args(cap, inst, tmp_path / "out", "", "--families", "conversation", "--max-retries", "1")
    with StubLLM(respond, fail=fail_marked) as stub:
        args[args.index("--base-url") + 1] = stub.url
        assert generate.main(args) == 1
        assert [s["id"][-1] for s in read_json(tmp_path / "out" / "conversation.json")] == ["1", "3"]
        assert stub.total_answered() == 2
        stub.fail = None  # the endpoint recovers
        assert generate.main(args) == 0
        assert stub.total_answered() == 3 and max(stub.answered.values()) == 1
    assert [s["id"][-1] for s in read_json(tmp_path / "out" / "conversation.json")] == ["1", "2", "3"]


def read_json(path: Path):
    return json.loads(path.read_text())


def cached_replies(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def test_kill_and_resume_loses_nothing_and_repeats_no_call(tmp_path):
    """The server answers 30 requests and holds the rest; once the 30 answers are in the cache, the run is
    killed (SIGKILL). The rerun makes exactly the missing calls, and its outputs equal an uninterrupted run's."""
    n, concurrency, kill_after = 20, 3, 30
    cap, inst = coco_files(tmp_path, n=n)
    with StubLLM(respond) as reference_stub:
        assert generate.main(generate_args(cap, inst, tmp_path / "reference", reference_stub.url)) == 0
    expected = read_outputs(tmp_path / "reference")

    with StubLLM(respond, hold_after=kill_after) as stub:
        args = generate_args(cap, inst, tmp_path / "out", stub.url, "--concurrency", str(concurrency))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, "-m", "llava_jax.data.generate", *args], env=env, cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while cached_replies(tmp_path / "out" / "cache.sqlite") < kill_after and process.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before the kill: " + process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        stub.release()
        assert stub.total_answered() == kill_after
        for path in (tmp_path / "out").glob("*.json"):
            json.loads(path.read_text())  # any output already there is complete (written atomically)

        assert generate.main(args) == 0
        assert len(stub.answered) == 3 * n and max(stub.answered.values()) == 1  # nothing asked twice
        assert read_outputs(tmp_path / "out") == expected
        assert generate.main(args) == 0 and stub.total_answered() == 3 * n  # a finished run makes no call


def test_cli_bad_input_exits_2(tmp_path, capsys):
    cap = tmp_path / "captions.json"
    cap.write_text("[]")
    args = ["--captions", str(cap), "--out-dir", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1"]
    assert generate.main(args) == 2
    assert "captions.json: not a COCO captions file" in capsys.readouterr().err


def test_image_ids_select_the_images(tmp_path, capsys):
    cap, inst = coco_files(tmp_path, n=4)
    ids = tmp_path / "ids.txt"
    ids.write_text("3\n1\n")
    images = coco_context.load_coco(cap, inst)
    assert [i.image_id for i in generate.select_images(images, ids)] == [1, 3]
    ids.write_text("3\n\n9\n")
    with pytest.raises(ValueError, match=r"ids.txt:3: image id 9 has no captions"):
        generate.select_images(images, ids)
    ids.write_text("COCO_1\n")
    assert generate.main(generate_args(cap, inst, tmp_path / "out", "http://127.0.0.1:9/v1", "--image-ids",
                                       str(ids))) == 2
    assert "ids.txt:1: expected a COCO image id, got 'COCO_1'" in capsys.readouterr().err


def test_cache_key_and_client_concurrency_against_the_server(tmp_path):
    with StubLLM(lambda r: r["messages"][-1]["content"].upper(), delay=0.01) as stub:
        client = ChatClient("m", tmp_path / "c.sqlite", base_url=stub.url, concurrency=4)
        requests = [(i, client.request([{"role": "user", "content": f"q{i % 10}"}], temperature=0.0))
                    for i in range(25)]
        replies = dict(client.complete_all(requests, progress=False))
        client.close()
    assert {i: r.content for i, r in replies.items()} == {i: f"Q{i % 10}" for i in range(25)}
    assert len(stub.answered) == 10 and client.usage.calls + client.usage.cached == 25
    assert request_key({"b": 1, "a": [1, "é"]}) == request_key({"a": [1, "é"], "b": 1})
