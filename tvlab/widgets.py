"""Interactive explorers for the notebooks (ipywidgets).

>>> lm = tvlab.load_model("tiny-llama")        # tvlab.load_model() loads the real Gemma 3 270M
>>> explorer = tvlab.widgets.icl_explorer(lm)  # pick a task, demonstrations, your own query
>>> explorer.refresh()                         # what showing it in a notebook does first
>>> explorer.controls["n_demos"].value = 1     # moving a control recomputes
>>> print(explorer.result["prompt"])
example:then->now
example:hot->
>>> by_layer = tvlab.run_task(lm, "antonyms", tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2)).by_layer
>>> bank = tvlab.geometry.collect_task_vectors(lm, ["antonyms", "to_upper"], n_per_task=4)
>>> explorers = [
...     tvlab.widgets.patching_explorer(lm, layer=2),           # ICL vs task vector vs baseline at a layer
...     tvlab.widgets.layer_explorer(by_layer),                 # accuracy-by-layer curves for chosen tasks
...     tvlab.widgets.next_token_explorer(lm),                  # type any prompt, see the top next tokens
...     tvlab.widgets.geometry_explorer(bank, layer=2),         # a bank of task vectors, layer by layer
...     tvlab.widgets.conflict_explorer(lm),                    # A's demonstrations, B's vector: who wins?
...     tvlab.widgets.top_tokens_explorer(lm, bank, layer=2),   # the logit lens of a task's mean vector
...     tvlab.widgets.model_explorer({"llama": lm, "gpt2": tvlab.load_model("tiny-gpt2")}),  # one task, several models
... ]
>>> for e in explorers:
...     e.refresh()
>>> [e.error for e in explorers]               # each one ran; an error would be shown in its output area
[None, None, None, None, None, None, None]

Each explorer is controls + an Output area. Its callback calls plain tvlab functions
(``tvlab.explore``, ``tvlab.plots``), keeps what they returned in ``.result``, and draws it.
Any error a callback raises is shown in the output area (``.error`` keeps its text) and the
explorer keeps working. Tests drive the controls without a browser (setting ``.value`` fires
the observers). Sliders that trigger forward passes update on release, not while dragging.

``explorer.static()`` is the same output at the current settings as ordinary cell output, for
readers without a running kernel (a saved notebook, a rendered page)::

    explorer = tvlab.widgets.icl_explorer(lm)
    explorer            # the live widget
    explorer.static()   # in the next cell: the prompt and the figure, saved with the notebook
"""

from __future__ import annotations

import base64
import io
import sys
import traceback
from typing import Callable

import ipywidgets as W
import matplotlib.pyplot as plt
import pandas as pd

from . import explore, plots
from ._checks import whole_number
from .models import LanguageModel
from .tasks import TaskError, get_task, list_tasks


class StaticOutput:
    """What an explorer draws, as plain notebook outputs: shown as ordinary cell output, no widget.

    ``.outputs`` has the Output widget's format (stream and display_data dicts). Displaying it
    prints the text and publishes the figures, so they are saved with the notebook.
    """

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def append_stdout(self, text: str) -> None:
        self.outputs.append({"output_type": "stream", "name": "stdout", "text": text})

    def append_stderr(self, text: str) -> None:
        self.outputs.append({"output_type": "stream", "name": "stderr", "text": text})

    def append_display_data(self, display_object) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        data, metadata = InteractiveShell.instance().display_formatter.format(display_object)
        if "image/png" not in data and hasattr(display_object, "savefig"):  # no inline backend: a PNG all the same
            buffer = io.BytesIO()
            display_object.savefig(buffer, format="png", bbox_inches="tight")
            data = {**data, "image/png": base64.b64encode(buffer.getvalue()).decode("ascii")}
        self.outputs.append({"output_type": "display_data", "data": data, "metadata": metadata})

    def _ipython_display_(self) -> None:
        from IPython.display import publish_display_data

        for o in self.outputs:
            if o["output_type"] == "stream":
                stream = sys.stdout if o["name"] == "stdout" else sys.stderr
                stream.write(o["text"])
                stream.flush()
            else:
                publish_display_data(o["data"], o["metadata"])

    def __repr__(self) -> str:
        return "".join(o["text"] if o["output_type"] == "stream" else o["data"].get("text/plain", "") + "\n"
                       for o in self.outputs)


def _traceback_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


class Explorer:
    """Controls, an output area, and ``compute(**values) -> result`` / ``draw(result, out)``."""

    def __init__(self, controls: dict[str, W.Widget], compute: Callable, draw: Callable, title: str = ""):
        self.controls = controls
        self.compute, self.draw = compute, draw
        self.out = W.Output()
        self.result = None
        self.error: str | None = None          # the message, or the traceback of an unexpected error
        self.exception: BaseException | None = None
        self._result_values: dict | None = None  # the control values self.result was computed from
        self._follows: dict[str, Callable] = {}
        self._following = False
        header = [W.HTML(f"<b>{title}</b>")] if title else []
        self.widget = W.VBox(header + [W.HBox(list(controls.values())), self.out])
        for control in controls.values():
            control.observe(self._on_change, names="value")

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def follow(self, name: str, update: Callable[[object], dict]) -> None:
        """When control ``name`` changes, set the controls ``update(new_value)`` returns, then recompute once."""
        self._follows[name] = update

    def refresh(self) -> None:
        """Recompute and redraw from the controls' current values."""
        self.out.outputs = ()
        self.result, self.error, self.exception = None, None, None
        values = self.values()
        try:
            self.result, self._result_values = self.compute(**values), values
        except (ValueError, KeyError) as e:  # bad input from the controls: say so in the output area
            self.error, self.exception = str(e), e
            self.out.append_stderr(f"{e}\n")
            return
        except Exception as e:  # anything else: its traceback, where the reader is looking
            self._fail(e)
            return
        try:
            self.draw(self.result, self.out)
        except Exception as e:
            self._fail(e)

    def static(self) -> StaticOutput:
        """The output at the controls' current values as ordinary cell output (no kernel needed to see it).

        Reuses the result on show when it is current, else computes it; errors are raised.
        """
        values = self.values()
        current = self.result is not None and self._result_values == values
        result = self.result if current else self.compute(**values)
        shown = StaticOutput()
        self.draw(result, shown)
        return shown

    def _fail(self, e: Exception) -> None:
        self.error, self.exception = _traceback_text(e), e
        self.out.append_stderr(self.error)

    def _on_change(self, change) -> None:
        if self._following:
            return  # set by another control's change: that change recomputes once, with every new value
        name = next((n for n, c in self.controls.items() if c is change["owner"]), None)
        if name in self._follows:
            self._following = True
            try:
                for other, value in self._follows[name](change["new"]).items():
                    self.controls[other].value = value
            except Exception as e:
                self.out.outputs = ()
                self.result = None
                self._fail(e)
                return
            finally:
                self._following = False
        self.refresh()

    #: What a reader without a running kernel (GitHub, nbviewer) sees instead of the widget.
    PLACEHOLDER = ("[An interactive explorer: run the notebook in Jupyter to use it. "
                   "The next cell shows what it draws at these settings.]")

    def _mimebundle(self) -> dict | None:
        """The widget's display data with a readable text fallback (None where ipywidgets gives none: ipywidgets 7)."""
        bundle = getattr(self.widget, "_repr_mimebundle_", lambda: None)()
        return None if not bundle else {**bundle, "text/plain": self.PLACEHOLDER}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        bundle = self._mimebundle()
        if bundle is None:
            display(self.widget)
        else:
            display(bundle, raw=True)
        self.refresh()


def _show_figure(out: W.Output, fig) -> None:
    out.append_display_data(fig)
    plt.close(fig)


def _slider(value, low: int, high: int, description: str, name: str) -> W.IntSlider:
    """An integer slider from ``low`` to ``high`` starting at ``value``; a value outside that range is an error
    (ipywidgets would move it to the nearest end without a word)."""
    number = whole_number(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    return W.IntSlider(value=number, min=low, max=high, description=description, continuous_update=False)


def _layer(value, n_layers: int, default: int) -> int:
    """``value``, or when None the usual ``default`` (Gemma 3 270M's) or the model's last layer if it has fewer."""
    return min(default, n_layers - 1) if value is None else value


def _choice(options: list, value, description: str, name: str) -> W.Dropdown:
    if value not in options:
        raise ValueError(f"{name} {value!r} is not one of the choices: {', '.join(map(str, options))}.")
    return W.Dropdown(options=options, value=value, description=description)


def _first_input(task: str) -> str:
    """One input of ``task`` to start a query box with ("" for a task tvlab cannot look up by name)."""
    try:
        return get_task(task).pairs[0].input
    except TaskError:
        return ""


def _task_dropdown(tasks: list[str] | None, value: str) -> W.Dropdown:
    options = list(tasks or list_tasks())
    if value not in options:
        get_task(value)  # an unknown name: the TaskError with the closest names
        options.insert(0, value)  # a task file or an extra task: offered in the dropdown too
    return W.Dropdown(options=options, value=value, description="task")


def icl_explorer(lm: LanguageModel, task: str = "antonyms", n_demos: int = 5, query: str | None = None,
                 k: int = 8, tasks: list[str] | None = None) -> Explorer:
    """Pick a task, a number of demonstrations and a query: see the prompt and the top next tokens."""
    controls = {
        "task": _task_dropdown(tasks, task),
        "n_demos": _slider(n_demos, 0, 10, "demos", "n_demos"),
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
    _new_task_new_query(explorer)
    return explorer


def _new_task_new_query(explorer: Explorer) -> None:
    """When the task changes, put one of its own inputs in the query box: one recompute, with that query."""
    explorer.follow("task", lambda task: {"query": get_task(task).pairs[0].input})


def patching_explorer(lm: LanguageModel, task: str = "antonyms", layer: int | None = None, query: str | None = None,
                      tasks: list[str] | None = None) -> Explorer:
    """Pick a task, a layer and a query: ICL, task-vector and baseline predictions side by side.

    ``layer``: where the slider starts (None: 10, or the model's last layer if it has fewer)."""
    controls = {
        "task": _task_dropdown(tasks, task),
        "layer": _slider(_layer(layer, lm.n_layers, 10), 0, lm.n_layers - 1, "layer", "layer"),
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
    _new_task_new_query(explorer)
    return explorer


def layer_explorer(by_layer: pd.DataFrame, tasks: list[str] | None = None) -> Explorer:
    """Choose tasks (ctrl/shift-click) and see their task-vector accuracy by layer."""
    options = list(dict.fromkeys(by_layer["task"]))
    missing = [t for t in (tasks or []) if t not in options]
    if missing:
        raise ValueError(f"task(s) {', '.join(map(repr, missing))} are not in this frame; it has {', '.join(options)}.")
    controls = {"tasks": W.SelectMultiple(options=options, value=tuple(tasks or options[:3]), rows=8, description="tasks")}

    def compute(tasks):
        if not tasks:
            raise ValueError("select at least one task")
        return by_layer[by_layer["task"].isin(tasks)]

    def draw(result, out):
        _show_figure(out, plots.layer_curves(result))

    return Explorer(controls, compute, draw, "Task-vector accuracy by layer")


def next_token_explorer(lm: LanguageModel, text: str = "example:hot->cold\nexample:up->down\nexample:big->",
                        k: int = 8) -> Explorer:
    """Type any prompt: see the model's top next tokens and their probabilities."""
    controls = {"text": W.Textarea(value=text, description="prompt", rows=4, continuous_update=False,
                                   layout=W.Layout(width="420px")),
                "k": _slider(k, 1, 20, "top k", "k")}

    def compute(text, k):
        if not text.strip():
            raise ValueError("type a prompt in the box")
        return explore.next_token_probs(lm, text, k=k)

    def draw(probs, out):
        out.append_stdout(f"Most likely next token: {probs['token'].iloc[0]!r} "
                          f"(probability {probs['probability'].iloc[0]:.2f})\n")
        _show_figure(out, plots.next_token_bars(probs, title=f"The top {len(probs)} next tokens"))

    return Explorer(controls, compute, draw, "What comes next?")


def geometry_explorer(bank, layer: int | None = None, method: str = "pca") -> Explorer:
    """A layer slider over a bank of task vectors: distances, separability and a 2-D picture at that layer.

    ``layer``: where the slider starts (None: 10, or the bank's last layer if it has fewer)."""
    from . import geometry

    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")
    controls = {"layer": _slider(_layer(layer, bank.n_layers, 10), 0, bank.n_layers - 1, "layer", "layer")}

    def compute(layer):
        return {"layer": layer, "emb": geometry.embed_2d(bank, layer, method),
                **geometry.distance_summary(bank, layer), **geometry.separability(bank, layer)}

    def draw(r, out):
        out.append_stdout(f"layer {r['layer']}: within {r['within']:.3f}, between {r['between']:.3f} "
                          f"(ratio {r['ratio']:.2f}); nearest-centroid accuracy "
                          f"{r['nearest_centroid_accuracy']:.2f}, silhouette {r['silhouette']:.2f}\n")
        _show_figure(out, plots.task_scatter(r["emb"], f"{method.upper()} of the task vectors at layer {r['layer']}"))

    return Explorer(controls, compute, draw, "Task vectors by layer")


def conflict_explorer(lm: LanguageModel, task_a: str = "antonyms", task_b: str = "en_fr", n_sets: int = 12,
                      n_dev: int = 10, tasks: list[str] | None = None) -> Explorer:
    """Pick A (the prompt's demonstrations) and B (the patched vector): who wins?"""
    from .conflicts import conflicting_tasks

    options = list(tasks or list_tasks(include_extra=False))
    controls = {"task_a": _choice(options, task_a, "A (prompt)", "task_a"),
                "task_b": _choice(options, task_b, "B (vector)", "task_b")}

    def compute(task_a, task_b):
        return conflicting_tasks(lm, task_a, task_b, n_sets=n_sets, n_dev=n_dev)

    def draw(frame, out):
        out.append_stdout(frame.round(2).to_string(index=False) + "\n\n")
        tv = frame.set_index("method").loc["task_vector"]
        out.append_stdout(f"With θ of {tv.task_b} patched at layer {tv.layer}: {tv.as_b:.2f} of the answers are "
                          f"{tv.task_b}'s, {tv.as_a:.2f} are {tv.task_a}'s.\n")

    return Explorer(controls, compute, draw, "Who wins: the prompt (A) or the task vector (B)?")


def top_tokens_explorer(lm: LanguageModel, bank, task: str | None = None, layer: int | None = None, k: int = 10,
                        center: bool = True) -> Explorer:
    """Pick a task and a layer: the logit-lens top tokens of that task's mean vector (centered by default).

    ``layer``: where the slider starts (None: 11, or the bank's last layer if it has fewer)."""
    from .inspect_vectors import top_tokens

    controls = {"task": _choice(bank.tasks, task or bank.tasks[0], "task", "task"),
                "layer": _slider(_layer(layer, bank.n_layers, 11), 0, bank.n_layers - 1, "layer", "layer")}

    def compute(task, layer):
        offset = bank.vectors[:, layer].mean(0) if center else 0.0
        return top_tokens(lm, bank.mean(task, layer) - offset, k=k)

    def draw(table, out):
        out.append_stdout(table.to_string(index=False, float_format="%.2f") + "\n")

    title = "Top tokens of a task's " + ("centered " if center else "") + "mean vector"
    return Explorer(controls, compute, draw, title)


def model_explorer(models: dict[str, LanguageModel], tasks: list[str] | None = None, task: str = "to_upper",
                   config=None) -> Explorer:
    """Pick a model and a task: its baseline, ICL and task-vector accuracy, and its curve by layer."""
    from .experiments import ExperimentConfig, run_task

    if not isinstance(models, dict) or not models or not all(isinstance(m, LanguageModel) for m in models.values()):
        raise ValueError("models must be a non-empty dict of name -> model, e.g. {'gemma': lm, 'smollm2': smol}.")
    config = config or ExperimentConfig(n_test=8, n_dev=8, n_baseline=8)
    controls = {"model": W.Dropdown(options=list(models), description="model"),
                "task": _task_dropdown(tasks, task)}

    def compute(model, task):
        return model, models[model].n_layers, run_task(models[model], task, config)

    def draw(result, out):
        model, n_layers, run = result
        s = run.summary.iloc[0]
        out.append_stdout(f"{model}, {run.task}: baseline {s.baseline:.2f}, ICL {s.icl:.2f}, task vector "
                          f"{s.task_vector:.2f} at layer {run.best_layer} of {n_layers} "
                          f"(relative depth {run.best_layer / n_layers:.2f})\n")
        _show_figure(out, plots.layer_curves(run.by_layer, title=f"{model}: task-vector accuracy by layer "
                                                                 f"({config.n_dev} dev sets)"))

    return Explorer(controls, compute, draw, "One task, one model")


def bank_explorer(lm: LanguageModel, bank, task: str | None = None, query: str = "", max_new_tokens: int = 6) -> Explorer:
    """Pick a vector from a :class:`tvlab.beyond.VectorBank` and type any query: the answer with and without it."""
    from .beyond import generate

    if not hasattr(bank, "apply"):
        raise ValueError(f"bank must be a tvlab.beyond.VectorBank (tvlab.beyond.build_bank), got {type(bank).__name__}.")
    task = task or bank.tasks[0]
    controls = {"task": _choice(bank.tasks, task, "vector", "task"),
                "query": W.Text(value=query or _first_input(task), description="query", continuous_update=False),
                "tokens": _slider(max_new_tokens, 1, 12, "tokens", "max_new_tokens")}

    def compute(task, query, tokens):
        if not query.strip():
            raise ValueError("type a query in the box")
        prompt = bank.prompt(lm, query.strip())
        return {"prompt": prompt, "layer": bank.layers[task], "task": task,
                "without": generate(lm, prompt, max_new_tokens=tokens).strip(),
                "with": bank.apply(lm, task, query.strip(), max_new_tokens=tokens)}

    def draw(r, out):
        out.append_stdout(f"zero-shot prompt: {r['prompt']!r}\n"
                          f"  without a vector:                  {r['without']!r}\n"
                          f"  with θ of {r['task']} at layer {r['layer']}: {r['with']!r}\n")

    return Explorer(controls, compute, draw, "A bank of task vectors: any query")
