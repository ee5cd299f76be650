"""docs/bad_inputs.md shows the messages the code gives today."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_bad_inputs_table_is_current():
    spec = importlib.util.spec_from_file_location("bad_inputs", DOCS / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.collect()
    assert len(rows) >= 18
    assert (DOCS / "bad_inputs.md").read_text(encoding="utf-8") == module.render(rows), \
        "docs/bad_inputs.md is stale: run python docs/bad_inputs.py"
