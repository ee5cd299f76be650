"""Doctests: the ``>>>`` examples in tvlab's docstrings run under pytest (``--doctest-modules``).

``pytest tvlab`` runs only them. Each example runs in its own empty temporary folder (what it
saves lands there), offline, with these names at hand: ``tvlab``, ``torch``, and ``lm``, a tiny
random model (``tvlab.load_model("tiny-llama")``: 4 layers, d_model 64, a word-level tokenizer)
built once per session. Most examples build their own ``lm`` anyway, so a reader can copy them
as they are; the shared one is there for short function-level examples.

tests/conftest.py keeps the unit tests' own fixtures; nothing here touches tests or notebooks.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no example may download anything

import sys  # noqa: E402

import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402


#: Examples that need a package tvlab itself does not: skipped, saying so, where it is missing.
NEEDS = {"tvlab.course": "nbgrader", "tvlab.remote": "nnsight"}


@pytest.fixture(scope="session")
def doctest_lm():
    """The tiny random model the doctests share (no download, built in well under a second)."""
    import tvlab

    return tvlab.load_model("tiny-llama")


@pytest.fixture(autouse=True)
def _doctest_namespace(request):
    """For a doctest only: fill ``doctest_namespace`` and run the example in a temporary folder."""
    if not isinstance(request.node, DoctestItem):  # unit tests and notebooks: nothing to do
        yield
        return
    for module, package in NEEDS.items():
        if request.node.name == module or request.node.name.startswith(module + "."):
            pytest.importorskip(package, reason=f"{module}'s examples need {package}")
    import torch

    import tvlab

    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(tvlab=tvlab, torch=torch, lm=request.getfixturevalue("doctest_lm"))
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    # One thread: a tiny model's matrices are too small to share out, and on a busy machine two threads
    # waiting for each other make the examples some 40 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
