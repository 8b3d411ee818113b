"""Fixtures shared by the chat, serve and web tests."""

import pytest

from tests.infer.test_generate import save_tiny_llava


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Hugging Face LLaVA folder, named like a v1.5 model (so the llava_v1 template applies);
    built once and only read by the tests."""
    path = tmp_path_factory.mktemp("tiny_llava") / "llava-v1.5-tiny"
    save_tiny_llava(path, seed=3)
    return path
