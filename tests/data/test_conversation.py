"""Templates render exactly as the official LLaVA `conv.get_prompt()`."""

import dataclasses

import pytest
from PIL import Image

from llava_jax.data import conversation as conv
from tests.data.official_llava import conversation_module, official_prompt

OFFICIAL_NAMES = ["plain", "v1", "vicuna_v1", "llava_v1", "llama_2", "mistral_instruct", "chatml_direct"]

FINISHED = {
    "one_round_image": ["<image>\nWhat is shown in the picture?", "A tabby cat sleeping on a mat."],
    "multi_turn": ["<image>\nWhat is shown?", "A cat.", "What color is it? Answer with one word.", "Orange",
                   "How many legs are visible?", "4"],
    "text_only_unicode": ["Übersetze bitte: 東京は大きい。", "Tokyo ist groß — 東京 😀!", "Und 3 + 4?", "7"],
    "multi_line": ["List two fruits.", "1. Apple\n2. Pear", "Why?\nExplain briefly.", "They are sweet..."],
}
ONGOING = {
    "first_question": ["<image>\nDescribe the image in detail.", None],
    "second_question": ["<image>\nWhat is shown?", "A cat.", "Is it asleep?", None],
    "text_only": ["Name a prime number above 30.", None],
}


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
@pytest.mark.parametrize("messages", list(FINISHED.values()), ids=list(FINISHED))
def test_render_matches_official_finished(name, messages):
    if name == "plain":
        # The official plain template cannot render a finished conversation (sep2 is None).
        with pytest.raises(TypeError):
            official_prompt(name, messages)
        return
    assert conv.render(conv.get_template(name), messages) == official_prompt(name, messages)


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
@pytest.mark.parametrize("messages", list(ONGOING.values()), ids=list(ONGOING))
def test_generation_prompt_matches_official_cli(name, messages):
    template = conv.get_template(name)
    if name == "plain" and len(messages) > 2:
        with pytest.raises(TypeError):  # the official plain template fails once an answer is in the history
            official_prompt(name, messages)
        return
    expected = official_prompt(name, messages)
    assert conv.generation_prompt(template, messages[:-1]) == expected
    assert conv.render(template, messages) == expected


@pytest.mark.parametrize("name", ["v1", "llava_v1", "llama_2", "chatml_direct"])
def test_image_placement_matches_official_get_prompt(name):
    """The official get_prompt moves an image message's `<image>` first; `move_image_to_front` does the same."""
    raw = "What is unusual about this image?\n<image>"
    image = Image.new("RGB", (7, 5))
    official = conversation_module().conv_templates[name].copy()
    official.messages = []
    official.append_message(official.roles[0], (raw, image, "Default"))
    official.append_message(official.roles[1], None)
    ours = conv.generation_prompt(conv.get_template(name), [conv.move_image_to_front(raw)])
    assert ours == official.get_prompt()
    assert ours.count(conv.IMAGE_TOKEN) == 1


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_template_data_matches_official(name):
    official = conversation_module().conv_templates[name]
    ours = conv.get_template(name)
    assert (ours.system, tuple(ours.roles), ours.sep, ours.sep2) == (
        official.system, tuple(official.roles), official.sep, official.sep2)


@pytest.mark.parametrize("name", ["v1", "llava_v1", "chatml_direct", "plain"])
def test_stop_strings_match_official_cli(name):
    """The official CLI stops on `sep2` for the TWO style and on `sep` otherwise."""
    official = conversation_module().conv_templates[name]
    two = official.sep_style == conversation_module().SeparatorStyle.TWO
    assert conv.stop_strings(conv.get_template(name)) == [official.sep2 if two else official.sep]


@pytest.mark.parametrize("name", sorted(conv.TEMPLATES))
def test_every_answer_ends_with_a_stop_string(name):
    """Generation stops exactly where training supervised the end of an answer."""
    template = conv.get_template(name)
    messages = FINISHED["multi_turn"]
    supervised = [s.text for s in conv.training_segments(template, messages) if s.supervised]
    assert len(supervised) == len(messages) // 2
    stops = tuple(conv.stop_strings(template))
    for text, answer in zip(supervised, messages[1::2]):
        assert text.endswith(stops), (text, stops)
        assert answer in text


@pytest.mark.parametrize("name", sorted(conv.TEMPLATES))
def test_supervised_segments_follow_the_generation_prompt(name):
    """Each supervised piece starts right where the generation prompt of its turn ends."""
    template = conv.get_template(name)
    messages = FINISHED["multi_turn"]
    segs = conv.segments(template, messages)
    for k, seg in enumerate(segs):
        if seg.supervised and name != "plain":
            turn = sum(s.supervised for s in segs[:k])
            prompt = conv.generation_prompt(template, messages[:2 * turn + 1])
            assert "".join(s.text for s in segs[:k]) == prompt


def test_segments_concatenate_to_render_and_mark_answers():
    template = conv.get_template("v1")
    messages = FINISHED["multi_turn"]
    segs = conv.segments(template, messages)
    assert "".join(s.text for s in segs) == conv.render(template, messages)
    assert [s.text for s in segs if s.supervised] == [f" {a}</s>" for a in messages[1::2]]


def test_plain_training_keeps_only_images_and_caption():
    segs = conv.training_segments(conv.get_template("plain"), ["<image>\nDescribe briefly.", "A red bus."])
    assert segs == [conv.Segment("<image>", False), conv.Segment("A red bus.\n", True)]


def test_llama_3_generation_prompt_ends_with_assistant_header():
    prompt = conv.generation_prompt(conv.get_template("llama_3"), ["  Hi there "])
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_aliases_and_errors():
    assert conv.get_template("v1") is conv.get_template("vicuna_v1")
    with pytest.raises(KeyError, match="llava_v1"):
        conv.get_template("vicuna_v2")
    with pytest.raises(ValueError, match="end with a user message"):
        conv.generation_prompt(conv.get_template("v1"), ["Q", "A"])
    with pytest.raises(ValueError, match="message 1 is empty"):
        conv.render(conv.get_template("v1"), ["Q", ""])
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.get_template("v1").system = "changed"
