"""Explorers show every error in their output area and keep working afterwards."""

import tvlab
from tvlab import explore, widgets


def test_an_unexpected_error_shows_its_traceback_and_the_explorer_recovers(tiny, monkeypatch):
    e = widgets.next_token_explorer(tiny, text="example:hot->cold\nexample:big->", k=3)
    e.refresh()

    def broken(*args, **kwargs):
        raise RuntimeError("the library broke")

    monkeypatch.setattr(explore, "next_token_probs", broken)
    e.controls["k"].value = 4  # the callback raises inside the observer: nothing escapes to the kernel log
    assert e.result is None and "RuntimeError: the library broke" in e.error
    assert len(e.out.outputs) == 1 and e.out.outputs[0]["name"] == "stderr"
    shown = e.out.outputs[0]["text"]
    assert shown.startswith("Traceback (most recent call last)") and "in broken" in shown
    assert shown.rstrip().endswith("RuntimeError: the library broke")
    monkeypatch.undo()
    e.controls["k"].value = 5  # still usable
    assert e.error is None and len(e.result) == 5
    assert e.out.outputs[0]["text"].startswith("Most likely next token:")


def test_an_error_while_drawing_is_shown_too(tiny, monkeypatch):
    e = widgets.icl_explorer(tiny)
    monkeypatch.setattr(tvlab.plots, "next_token_bars", lambda *a, **kw: 1 / 0)
    e.controls["n_demos"].value = 2
    assert e.result is not None and "ZeroDivisionError" in e.error
    assert e.out.outputs[0]["text"].startswith("Prompt:") and "ZeroDivisionError" in e.out.outputs[-1]["text"]


def test_bad_input_is_still_a_short_message(tiny):
    e = widgets.icl_explorer(tiny)
    e.controls["query"].value = " "
    assert e.error == "type a query in the box" and e.out.outputs[0]["text"] == "type a query in the box\n"


def test_a_misspelt_or_missing_task_is_named_before_any_widget_is_built(tiny, tmp_path):
    import pandas as pd
    import pytest

    with pytest.raises(tvlab.tasks.TaskError, match="unknown task 'antonym'. Did you mean antonyms"):
        widgets.icl_explorer(tiny, task="antonym")
    rows = ["hot,cold", "up,down", "big,small", "left,right", "fast,slow", "old,new", "wet,dry", "hard,soft"]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    e = widgets.icl_explorer(tiny, task=str(tmp_path / "mine.csv"), n_demos=2)  # a task file is offered too
    e.refresh()
    assert e.error is None and e.controls["task"].options[0] == str(tmp_path / "mine.csv")
    by_layer = pd.DataFrame({"task": ["antonyms"] * 2, "category": ["linguistic"] * 2, "layer": [0, 1], "accuracy": [0.1, 0.2]})
    with pytest.raises(ValueError, match="'fr_en' are not in this frame; it has antonyms"):
        widgets.layer_explorer(by_layer, tasks=["fr_en"])
