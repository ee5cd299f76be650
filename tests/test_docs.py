"""Documents and notebooks keep their promises: docs/bad_inputs.md, notebook standards, Binder files."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_bad_inputs_table_is_current():
    spec = importlib.util.spec_from_file_location("bad_inputs", DOCS / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.collect()
    assert len(rows) >= 18
    assert (DOCS / "bad_inputs.md").read_text(encoding="utf-8") == module.render(rows), \
        "docs/bad_inputs.md is stale: run python docs/bad_inputs.py"


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cells(path):
    import json

    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_goals_badges_and_a_colab_setup(path):
    first = "".join(_cells(path)[0]["source"])
    assert "Learning goals" in first or "learning goals" in first.lower()
    assert f"colab.research.google.com/github/tvlab-dev/tvlab/blob/main/notebooks/{path.name}" in first
    assert f"mybinder.org/v2/gh/tvlab-dev/tvlab/HEAD?urlpath=lab/tree/notebooks/{path.name}" in first
    setup = "".join(next(c for c in _cells(path) if c["cell_type"] == "code")["source"])
    # Colab only: installs tvlab, never torch or transformers again (no forced runtime restart)
    assert 'IN_COLAB = "google.colab" in sys.modules' in setup and "if IN_COLAB:" in setup
    install = [line for line in setup.splitlines() if "pip install" in line]
    assert len(install) == 1 and "tvlab" in install[0] and not any(p in install[0] for p in ("torch", "transformers", "-U", "--upgrade"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed_with_an_explorer_and_exercises(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "run it top to bottom before committing (strict nbval)"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "outputs from one clean run"
    sources = ["".join(c["source"]) for c in code]
    assert any("tvlab.widgets." in s for s in sources), "each notebook has an explorer"
    # an exercise: an nbgrader solution cell (the release turns it into a `# YOUR CODE HERE` stub) and a check
    assert any("### BEGIN SOLUTION" in s or "YOUR CODE HERE" in s for s in sources)
    assert any("tvlab.exercises.check_" in s for s in sources)
    markdown = "".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "Exercise" in markdown


def test_binder_files():
    start = (ROOT / "binder" / "start").read_text()
    assert os.access(ROOT / "binder" / "start", os.X_OK) and start.rstrip().endswith('exec "$@"')
    # products in bfloat16 only where the CPU has it natively, weights stored in bfloat16 either way (memory)
    assert "TVLAB_DTYPE=auto" in start and "TVLAB_WEIGHTS_DTYPE=bfloat16" in start
    post = (ROOT / "binder" / "postBuild").read_text()
    assert os.access(ROOT / "binder" / "postBuild", os.X_OK) and "set -e" in post
    assert "download.pytorch.org/whl/cpu" in post and '-e ".[notebooks]"' in post and "load_model()" in post
    assert "TVLAB_DTYPE=bfloat16 python" in post  # the bfloat16 copies are made at build time
