import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download anything

import pytest  # noqa: E402

import tvlab  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A 4-layer random Llama with a word-level tokenizer: fast, for machinery tests."""
    return tvlab.tiny_model("llama")


@pytest.fixture(scope="session")
def gemma():
    """The real bundled default model (converted once into the cache)."""
    return tvlab.load_model()
