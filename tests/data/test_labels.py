"""Answer-only labels: token for token equal to the official LLaVA preprocessing, and right where it is not.

Tokenizers: the real LLaMA-2 SentencePiece tokenizer (skipped where absent), a small LLaMA tokenizer
trained here with the `tokenizers` library (same transformers class, so the same legacy / non-legacy code
paths), and a small byte-level BPE tokenizer with the LLaMA-3 special tokens.
"""

import functools
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from llava_jax.data import conversation as conv
from llava_jax.data.errors import BadSample
from llava_jax.data.tokenize import IGNORE_INDEX, add_image_token, tokenize_conversation, validate_conversations
from tests.data.official_llava import IMAGE_TOKEN_INDEX, official_preprocess

IMAGE_SEQ = 7


def turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


CHAT_SAMPLES = {
    "image_multi_turn": turns("What is shown?\n<image>", "A cat sleeping on a mat.",
                              "What color is it? Answer with one word.", "Orange", "How many legs?", "4"),
    "image_single": turns("<image>\nDescribe the image in detail.",
                          "The image shows a red double-decker bus on a rainy street in 1999."),
    "text_only_unicode": turns("Übersetze bitte: 東京は大きい。", "Tokyo ist groß — 東京 😀!", "Und 3 + 4?", "7"),
    "multi_line": turns("<image>\nList two fruits you see.", "1. Apple\n2. Pear", "\nWhy those?",
                        "They are in the bowl, aren't they?"),
    "answer_ends_in_number": turns("Name a prime above 30.", "31", "And the next one?", "37."),
}
PLAIN_SAMPLES = {
    "caption": turns("<image>\nRender a clear and concise summary of the photo.", "a dog running on grass"),
    "caption_number": turns("Give a brief description.\n<image>", "Stadium opening day, 1999."),
    "caption_unicode": turns("<image>", "Café in Zürich — 東京 style!"),
}
# Conversations on which the official code prints "tokenization mismatch" and masks the whole sample.
OFFICIAL_MISMATCH = {
    ("v1", "ends_with_question"): turns("<image>\nWhat is it?", "A cat.", "And what else?"),
    ("v1", "quotes_the_template"): turns("Repeat: USER: hi ASSISTANT: yo", "USER: hi ASSISTANT: yo"),
    ("llama_2", "answer_mentions_inst"): turns("What closes a turn?", "The tag [/INST] does.", "Thanks",
                                               "You're welcome!"),
}
END_OF_TURN = {"plain": "\n", "v1": "</s>", "llava_v1": "</s>", "llama_2": " </s>", "mistral_instruct": " </s>",
               "chatml_direct": "<|im_end|>", "llama_3": "<|eot_id|>", "qwen_2": "<|im_end|>"}

# Like LLaMA-2's, the vocabulary has no piece for "USER" or "[INST": the official offsets rely on that.
_TRAINING_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. What is shown in the image? A cat sleeping on "
    "a mat. There are 3 dogs and 2 cats, see [1] and [2] or [3]. Describe the photo in detail: a red bus on a "
    "rainy street.")


def _train_bpe(model, pre_tokenizer, special, alphabet, size, text=_TRAINING_TEXT):
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=len(special) + len(alphabet) + size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text] * 3, trainer)
    return tok


@functools.cache
def _small_llama_model(extra_text: str = ""):
    """vocab and merges of a small SentencePiece-style BPE with byte fallback (LLaMA's layout)."""
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = _train_bpe(models.BPE(unk_token="<unk>", byte_fallback=True),
                     pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), special, [], 173,
                     _TRAINING_TEXT + extra_text)
    return tok.get_vocab(), tuple(tuple(m) for m in json.loads(tok.to_str())["model"]["merges"])


def llama_tokenizer(request, kind: str, legacy: bool):
    """The real LLaMA-2 tokenizer (`kind="llama2"`, skipped where absent) or the small one."""
    folder = request.getfixturevalue("llama2_tokenizer_dir") if kind == "llama2" else None
    return _llama_tokenizer(folder, legacy)


@functools.cache
def _llama_tokenizer(folder, legacy: bool):
    """A LLaMA tokenizer with `<image>` added and pad = unk (the official v1 setup)."""
    if folder is not None:
        tok = AutoTokenizer.from_pretrained(folder, legacy=legacy)
    else:
        vocab, merges = _small_llama_model()
        tok = LlamaTokenizer(vocab=vocab, merges=list(merges), legacy=legacy, add_bos_token=True,
                             model_max_length=2048)
    tok.pad_token = tok.unk_token
    add_image_token(tok)
    return tok


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@functools.cache
def llama3_tokenizer():
    """A byte-level BPE with the LLaMA-3 special tokens; BOS `<|begin_of_text|>` added by the post-processor."""
    tok = _train_bpe(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), LLAMA3_SPECIAL,
                     pre_tokenizers.ByteLevel.alphabet(), 211)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE,
                                   model_max_length=2048)
    add_image_token(fast)
    return fast


QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-7B-Instruct's chat template (the default system prompt when the messages have none).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\n' }}{% endif %}")


@functools.cache
def qwen2_tokenizer():
    """A byte-level BPE with Qwen2's special tokens and chat template; no BOS, as Qwen2's tokenizer."""
    tok = _train_bpe(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), QWEN2_SPECIAL,
                     pre_tokenizers.ByteLevel.alphabet(), 211)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN2_CHAT_TEMPLATE, model_max_length=2048)
    add_image_token(fast)
    return fast


def ours(conversations, tok, name, max_length=4096, **kw):
    return tokenize_conversation(conversations, tok, conv.get_template(name), image_token_id=add_image_token(tok),
                                 image_seq_length=IMAGE_SEQ, max_length=max_length, **kw)


def collapse_images(sample, image_token_id):
    """Our (input_ids, labels) with each run of IMAGE_SEQ image tokens as one official -200 placeholder."""
    ids, labels, out_ids, out_labels, i = sample.input_ids.tolist(), sample.labels.tolist(), [], [], 0
    while i < len(ids):
        if ids[i] == image_token_id:
            assert ids[i:i + IMAGE_SEQ] == [image_token_id] * IMAGE_SEQ
            assert labels[i:i + IMAGE_SEQ] == [IGNORE_INDEX] * IMAGE_SEQ
            out_ids.append(IMAGE_TOKEN_INDEX), out_labels.append(IGNORE_INDEX)
            i += IMAGE_SEQ
        else:
            out_ids.append(ids[i]), out_labels.append(labels[i])
            i += 1
    return out_ids, out_labels


def supervised_spans(labels):
    """Runs of consecutive supervised label ids."""
    spans, current = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans


def assert_supervises_exactly_answers(sample, tok, name, conversations):
    """Decoded supervised spans are the answers, each with its end-of-turn, and nothing else."""
    answers = [t["value"] for t in conversations if t["from"] == "gpt"]
    if name == "llama_3":
        answers = [a.strip() for a in answers]
    decoded = [tok.decode(span, skip_special_tokens=False) for span in supervised_spans(sample.labels)]
    assert [d.strip() for d in decoded] == [(a + END_OF_TURN[name]).strip() for a in answers]


LLAMA_KINDS = [("small", True), ("small", False), ("llama2", True), ("llama2", False)]
KIND_IDS = [f"{k}-{'legacy' if legacy else 'nonlegacy'}" for k, legacy in LLAMA_KINDS]


@pytest.mark.parametrize("kind,legacy", LLAMA_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("name", ["v1", "llava_v1", "llama_2", "mistral_instruct"])
def test_chat_labels_match_official(request, kind, legacy, name):
    tok = llama_tokenizer(request, kind, legacy)
    for sample_name, conversations in CHAT_SAMPLES.items():
        official_ids, official_labels, mismatch = official_preprocess(name, conversations, tok)
        assert not mismatch, sample_name
        sample = ours(conversations, tok, name)
        ids, labels = collapse_images(sample, add_image_token(tok))
        assert ids == official_ids, sample_name
        assert labels == official_labels, sample_name
        assert_supervises_exactly_answers(sample, tok, name, conversations)


@pytest.mark.parametrize("kind,legacy", LLAMA_KINDS, ids=KIND_IDS)
def test_plain_labels_match_official(request, kind, legacy):
    tok = llama_tokenizer(request, kind, legacy)
    for sample_name, conversations in PLAIN_SAMPLES.items():
        official_ids, official_labels, _ = official_preprocess("plain", conversations, tok)
        sample = ours(conversations, tok, "plain")
        assert collapse_images(sample, add_image_token(tok)) == (official_ids, official_labels), sample_name
        assert sample.num_images == 1
        assert_supervises_exactly_answers(sample, tok, "plain", conversations)


@pytest.mark.parametrize("kind,legacy", LLAMA_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("name,sample_name", list(OFFICIAL_MISMATCH), ids=[n for _, n in OFFICIAL_MISMATCH])
def test_correct_where_official_masks_everything(request, kind, legacy, name, sample_name):
    tok = llama_tokenizer(request, kind, legacy)
    conversations = OFFICIAL_MISMATCH[name, sample_name]
    official_ids, official_labels, mismatch = official_preprocess(name, conversations, tok)
    assert mismatch and set(official_labels) == {IGNORE_INDEX}
    sample = ours(conversations, tok, name)
    assert collapse_images(sample, add_image_token(tok))[0] == official_ids  # same tokens, different mask
    assert_supervises_exactly_answers(sample, tok, name, conversations)


def test_chatml_direct_supervises_answers():
    vocab, merges = _small_llama_model()
    tok = LlamaTokenizer(vocab=vocab, merges=list(merges), add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    conversations = CHAT_SAMPLES["image_multi_turn"]
    assert_supervises_exactly_answers(ours(conversations, tok, "chatml_direct"), tok, "chatml_direct",
                                      conversations)


def test_llama_3_render_matches_its_chat_template():
    tok = llama3_tokenizer()
    template = conv.get_template("llama_3")
    values = [t["value"] for t in CHAT_SAMPLES["multi_line"]]
    chat = [{"role": "system", "content": template.system}] + [
        {"role": ("user", "assistant")[i % 2], "content": v} for i, v in enumerate(values)]
    bos = "<|begin_of_text|>"
    assert bos + conv.render(template, values) == tok.apply_chat_template(chat, tokenize=False)
    assert bos + conv.generation_prompt(template, values[:3]) == tok.apply_chat_template(
        chat[:4], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("sample_name", list(CHAT_SAMPLES))
def test_llama_3_labels(sample_name):
    tok = llama3_tokenizer()
    conversations = CHAT_SAMPLES[sample_name]
    sample = ours(conversations, tok, "llama_3")
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert_supervises_exactly_answers(sample, tok, "llama_3", conversations)


def test_qwen_render_matches_qwen2s_chat_template():
    """LLaVA-NeXT's qwen_1_5 / qwen_2 (CHATML) renders as Qwen2's own chat template with its default system."""
    tok = qwen2_tokenizer()
    template = conv.get_template("qwen_2")
    assert template is conv.get_template("qwen_1_5")
    values = [t["value"] for t in CHAT_SAMPLES["image_multi_turn"]]
    chat = [{"role": ("user", "assistant")[i % 2], "content": v} for i, v in enumerate(values)]
    assert conv.render(template, values) == tok.apply_chat_template(chat, tokenize=False)
    assert conv.generation_prompt(template, values[:3]) == tok.apply_chat_template(
        chat[:3], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("sample_name", list(CHAT_SAMPLES))
def test_qwen_labels_supervise_only_answers_and_their_end_of_turn(sample_name):
    tok = qwen2_tokenizer()
    conversations = CHAT_SAMPLES[sample_name]
    sample = ours(conversations, tok, "qwen_2")
    assert_supervises_exactly_answers(sample, tok, "qwen_2", conversations)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    supervised_ends = [i for i, label in enumerate(sample.labels.tolist()) if label == im_end]
    assert len(supervised_ends) == len(conversations) // 2  # the users' and the system's <|im_end|> are masked


def test_v1_on_a_byte_level_tokenizer_where_official_fails():
    """A newer backbone's tokenizer under the v1 template: the official offsets assume LLaMA-2."""
    tok = llama3_tokenizer()
    tok.legacy = False  # the attribute the official code reads
    conversations = CHAT_SAMPLES["image_multi_turn"]
    official_ids, official_labels, mismatch = official_preprocess("v1", conversations, tok)
    assert mismatch and set(official_labels) == {IGNORE_INDEX}
    sample = ours(conversations, tok, "v1")
    assert collapse_images(sample, add_image_token(tok))[0] == official_ids
    assert_supervises_exactly_answers(sample, tok, "v1", conversations)


def test_official_offsets_depend_on_the_vocabulary():
    """With a "▁USER" piece in the vocabulary the official non-legacy `round_len -= 1` is off by one."""
    vocab, merges = _small_llama_model(" USER: hi ASSISTANT: yo" * 9)
    tok = LlamaTokenizer(vocab=vocab, merges=list(merges), legacy=False, add_bos_token=True, model_max_length=2048)
    tok.pad_token = tok.unk_token
    assert len(tok("USER", add_special_tokens=False).input_ids) == 1
    conversations = CHAT_SAMPLES["image_multi_turn"]
    official_ids, official_labels, mismatch = official_preprocess("v1", conversations, tok)
    assert mismatch and set(official_labels) == {IGNORE_INDEX}
    sample = ours(conversations, tok, "v1")
    assert collapse_images(sample, add_image_token(tok))[0] == official_ids
    assert_supervises_exactly_answers(sample, tok, "v1", conversations)


def test_images_in_several_turns_match_official():
    tok = _llama_tokenizer(None, False)
    conversations = turns("<image>\nWhat is this?", "A cup.", "And this one? <image>", "A plate, 2 of them.")
    official_ids, official_labels, mismatch = official_preprocess("v1", conversations, tok)
    assert not mismatch and official_ids.count(IMAGE_TOKEN_INDEX) == 2
    sample = ours(conversations, tok, "v1")
    assert sample.num_images == 2
    assert collapse_images(sample, add_image_token(tok)) == (official_ids, official_labels)


def test_several_images_in_one_turn_stay_in_order():
    tok = _llama_tokenizer(None, False)
    image_id = add_image_token(tok)
    sample = ours(turns("Compare <image> with <image>: which is larger?", "The first."), tok, "v1")
    assert sample.num_images == 2
    is_image = sample.input_ids == image_id
    starts = np.flatnonzero(is_image & ~np.roll(is_image, 1))
    assert is_image.sum() == 2 * IMAGE_SEQ and len(starts) == 2
    between = sample.input_ids[starts[0] + IMAGE_SEQ:starts[1]]
    assert tok.decode(between).strip() == "with"
    assert tok.decode(sample.input_ids[:starts[0]], skip_special_tokens=True).rstrip().endswith("USER: Compare")
    assert (sample.labels[is_image] == IGNORE_INDEX).all()


def test_truncation_counts_image_tokens():
    tok = _llama_tokenizer(None, True)
    conversations = CHAT_SAMPLES["image_multi_turn"]
    full = ours(conversations, tok, "v1")
    image_end = int(np.flatnonzero(full.input_ids == add_image_token(tok))[-1]) + 1
    first_answer = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])

    cut = ours(conversations, tok, "v1", max_length=first_answer + 3)
    assert cut.input_ids.dtype == np.int32 and cut.labels.dtype == np.int32
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:first_answer + 3])
    np.testing.assert_array_equal(cut.labels, full.labels[:first_answer + 3])

    with pytest.raises(BadSample) as e:
        ours(conversations, tok, "v1", max_length=image_end - 1, sample_id="s7")
    assert e.value.reason == "image_tokens_truncated" and "s7" in str(e.value)
    with pytest.raises(BadSample) as e:
        ours(conversations, tok, "v1", max_length=first_answer)
    assert e.value.reason == "no_supervised_tokens"


def test_too_many_images():
    tok = _llama_tokenizer(None, True)
    with pytest.raises(BadSample) as e:
        ours(turns("<image> or <image>?", "Left."), tok, "v1", max_images=1, sample_id=3)
    assert e.value.reason == "too_many_images" and e.value.sample_id == 3


@pytest.mark.parametrize("conversations,reason", [
    ([], "empty_text"),
    (turns("Q", "   "), "empty_text"),
    ([{"from": "human", "value": None}, {"from": "gpt", "value": "A"}], "empty_text"),
    ([{"from": "human"}], "empty_text"),
    (turns("Q"), "no_assistant_turn"),
    ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}], "roles_out_of_order"),
    (turns("Q", "A") + [{"from": "gpt", "value": "B"}], "roles_out_of_order"),
    ([{"from": "user", "value": "Q"}, {"from": "gpt", "value": "A"}], "roles_out_of_order"),
    (turns("Q", "Look: <image>"), "image_in_answer"),
], ids=["no_turns", "blank_answer", "none_value", "no_value", "no_answer", "gpt_first", "two_gpt", "bad_role",
        "image_in_answer"])
def test_bad_structure(conversations, reason):
    with pytest.raises(BadSample) as e:
        validate_conversations(conversations, sample_id="abc")
    assert e.value.reason == reason and "'abc'" in str(e.value)


def test_add_image_token_and_id_check():
    vocab, merges = _small_llama_model()
    tok = LlamaTokenizer(vocab=vocab, merges=list(merges), add_bos_token=True)
    size = len(tok)
    image_id = add_image_token(tok)
    assert image_id == size and add_image_token(tok) == image_id and len(tok) == size + 1
    assert tok("a <image> b", add_special_tokens=False).input_ids.count(image_id) == 1
    with pytest.raises(ValueError, match="image_token_id=5"):
        tokenize_conversation(turns("<image>\nQ", "A"), tok, conv.get_template("v1"), image_token_id=5,
                              image_seq_length=IMAGE_SEQ, max_length=64)
