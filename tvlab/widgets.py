"""Interactive explorers for the notebooks (ipywidgets).

>>> tvlab.widgets.icl_explorer(lm)            # pick a task, demonstrations, your own query
>>> tvlab.widgets.patching_explorer(lm)       # ICL vs task vector vs baseline at a layer
>>> tvlab.widgets.layer_explorer(by_layer)    # accuracy-by-layer curves for chosen tasks

Each explorer is controls + an Output area. Its callback calls plain tvlab functions
(``tvlab.explore``, ``tvlab.plots``), keeps what they returned in ``.result``, and draws it.
Tests drive the controls without a browser (setting ``.value`` fires the observers).
Sliders that trigger forward passes update on release, not while dragging.
"""

from __future__ import annotations

from typing import Callable

import ipywidgets as W
import matplotlib.pyplot as plt
import pandas as pd

from . import explore, plots
from .models import LanguageModel
from .tasks import get_task, list_tasks


class Explorer:
    """Controls, an output area, and ``compute(**values) -> result`` / ``draw(result, out)``."""

    def __init__(self, controls: dict[str, W.Widget], compute: Callable, draw: Callable, title: str = ""):
        self.controls = controls
        self.compute, self.draw = compute, draw
        self.out = W.Output()
        self.result = None
        self.error: str | None = None
        header = [W.HTML(f"<b>{title}</b>")] if title else []
        self.widget = W.VBox(header + [W.HBox(list(controls.values())), self.out])
        for control in controls.values():
            control.observe(self._on_change, names="value")

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def refresh(self) -> None:
        """Recompute and redraw from the controls' current values."""
        self.out.outputs = ()
        try:
            self.result, self.error = self.compute(**self.values()), None
        except (ValueError, KeyError) as e:  # bad input from the controls: say so in the output area
            self.result, self.error = None, str(e)
            self.out.append_stderr(f"{e}\n")
            return
        self.draw(self.result, self.out)

    def _on_change(self, change) -> None:
        self.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
        self.refresh()


def _show_figure(out: W.Output, fig) -> None:
    out.append_display_data(fig)
    plt.close(fig)


def _task_dropdown(tasks: list[str] | None, value: str) -> W.Dropdown:
    return W.Dropdown(options=tasks or list_tasks(), value=value, description="task")


def icl_explorer(lm: LanguageModel, task: str = "antonyms", n_demos: int = 5, query: str | None = None,
                 k: int = 8, tasks: list[str] | None = None) -> Explorer:
    """Pick a task, a number of demonstrations and a query: see the prompt and the top next tokens."""
    controls = {
        "task": _task_dropdown(tasks, task),
        "n_demos": W.IntSlider(value=n_demos, min=0, max=10, description="demos", continuous_update=False),
        "query": W.Text(value=query or get_task(task).pairs[0].input, description="query", continuous_update=False),
    }

    def compute(task, n_demos, query):
        if not query.strip():
            raise ValueError("type a query in the box")
        prompt = explore.icl_prompt(lm, task, n_demos, query.strip())
        return {"prompt": prompt, "probs": explore.next_token_probs(lm, prompt, k=k)}

    def draw(result, out):
        out.append_stdout("Prompt:\n" + result["prompt"] + "\n")
        _show_figure(out, plots.next_token_bars(result["probs"], title="Next-token probabilities"))

    explorer = Explorer(controls, compute, draw, "In-context learning, live")
    _new_task_new_query(controls)
    return explorer


def _new_task_new_query(controls: dict) -> None:
    """When the task changes, put one of its own inputs in the query box (which redraws)."""
    def on_task(change):
        controls["query"].value = get_task(change["new"]).pairs[0].input

    controls["task"].observe(on_task, names="value")


def patching_explorer(lm: LanguageModel, task: str = "antonyms", layer: int = 10, query: str | None = None,
                      tasks: list[str] | None = None) -> Explorer:
    """Pick a task, a layer and a query: ICL, task-vector and baseline predictions side by side."""
    controls = {
        "task": _task_dropdown(tasks, task),
        "layer": W.IntSlider(value=layer, min=0, max=lm.n_layers - 1, description="layer", continuous_update=False),
        "query": W.Text(value=query or get_task(task).pairs[0].input, description="query", continuous_update=False),
    }

    def compute(task, layer, query):
        if not query.strip():
            raise ValueError("type a query in the box")
        return explore.three_predictions(lm, task, query.strip(), layer)

    def draw(result, out):
        out.append_stdout(f"Few-shot prompt (ICL):\n{result.icl_prompt}\n\n"
                          f"Zero-shot prompt, patched at layer {result.layer}: {result.zero_shot_prompt!r}\n"
                          f"Expected: {result.expected}\n\n")
        out.append_stdout(result.table().to_string(index=False) + "\n")

    explorer = Explorer(controls, compute, draw, "Three ways to answer one query")
    _new_task_new_query(controls)
    return explorer


def layer_explorer(by_layer: pd.DataFrame, tasks: list[str] | None = None) -> Explorer:
    """Choose tasks (ctrl/shift-click) and see their task-vector accuracy by layer."""
    options = list(dict.fromkeys(by_layer["task"]))
    controls = {"tasks": W.SelectMultiple(options=options, value=tuple(tasks or options[:3]), rows=8, description="tasks")}

    def compute(tasks):
        if not tasks:
            raise ValueError("select at least one task")
        return by_layer[by_layer["task"].isin(tasks)]

    def draw(result, out):
        _show_figure(out, plots.layer_curves(result))

    return Explorer(controls, compute, draw, "Task-vector accuracy by layer")
