"""Figures, drawn from the tidy frames that the experiments return.

>>> fig = tvlab.plots.main_bars(summary)          # the paper's main-result bars, for your model
>>> fig = tvlab.plots.layer_curves(by_layer)      # accuracy by layer (the paper's layer figure)

One palette per category across the whole series (:data:`CATEGORY_COLORS`), and one per
method (:data:`METHOD_COLORS`). Labels always come from the same frame as the bars.
"""

from __future__ import annotations

import matplotlib
import matplotlib.ticker
import matplotlib.pyplot as plt
import pandas as pd

from .tasks import CATEGORIES, list_tasks

CATEGORY_COLORS = {"algorithmic": "#4C72B0", "translation": "#DD8452", "linguistic": "#55A868",
                   "knowledge": "#C44E52", "custom": "#8172B3"}
METHOD_COLORS = {"baseline": "#B0B0B0", "icl": "#2A6F97", "task_vector": "#E07A1F"}
METHOD_LABELS = {"baseline": "Baseline (zero-shot)", "icl": "ICL", "task_vector": "Task vector"}


def _task_order(tasks) -> list[str]:
    known = list_tasks()
    return sorted(tasks, key=lambda t: (known.index(t) if t in known else len(known), t))


def main_bars(summary: pd.DataFrame, title: str | None = None) -> matplotlib.figure.Figure:
    """Grouped bars per task: baseline, ICL and task-vector accuracy, tasks grouped by category."""
    df = summary.set_index("task").loc[_task_order(summary["task"])].reset_index()
    methods = ["baseline", "icl", "task_vector"]
    fig, ax = plt.subplots(figsize=(max(6, 0.62 * len(df) + 1.5), 4.2))
    width = 0.27
    for k, method in enumerate(methods):
        ax.bar([i + (k - 1) * width for i in range(len(df))], df[method], width,
               color=METHOD_COLORS[method], label=METHOD_LABELS[method])
    ax.set_xticks(range(len(df)))
    ax.set_xticklabels(df["task"], rotation=50, ha="right", fontsize=8)
    for tick, category in zip(ax.get_xticklabels(), df["category"]):
        tick.set_color(CATEGORY_COLORS.get(category, "black"))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (first token)")
    ax.set_title(title or "ICL, task vector and baseline accuracy per task")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def layer_curves(by_layer: pd.DataFrame, tasks: list[str] | None = None, title: str | None = None,
                 ax: plt.Axes | None = None) -> matplotlib.figure.Figure:
    """Dev accuracy of the task vector by layer: one thin line per task, bold line per category mean."""
    df = by_layer if tasks is None else by_layer[by_layer["task"].isin(tasks)]
    if df.empty:
        raise ValueError("no layer accuracies to plot: pass the by_layer frame of a run (and task names it holds).")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.2))
    few = df["task"].nunique() <= 6
    for task, rows in df.groupby("task", sort=False):
        color = CATEGORY_COLORS.get(rows["category"].iloc[0], "black")
        ax.plot(rows["layer"], rows["accuracy"], color=color, lw=1.8 if few else 0.8, alpha=1.0 if few else 0.35,
                marker="o" if few else None, ms=3, label=task if few else None)
    if not few:
        for category in [c for c in CATEGORIES + ("custom",) if c in set(df["category"])]:
            mean = df[df["category"] == category].groupby("layer")["accuracy"].mean()
            ax.plot(mean.index, mean.values, color=CATEGORY_COLORS[category], lw=2.5, label=f"{category} (mean)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer L (patched output of block L)")
    ax.set_ylabel("task-vector accuracy (dev)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "Where is the task? Task-vector accuracy by layer")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def next_token_bars(probs: pd.DataFrame, title: str | None = None, highlight: str | None = None,
                    ax: plt.Axes | None = None) -> matplotlib.figure.Figure:
    """Horizontal bars of the top next tokens (the frame of :func:`tvlab.explore.next_token_probs`)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 0.32 * len(probs) + 1.2))
    df = probs.iloc[::-1]
    colors = [METHOD_COLORS["task_vector"] if highlight is not None and t.strip() == highlight.strip()
              else METHOD_COLORS["icl"] for t in df["token"]]
    ax.barh([f"{t!r}" for t in df["token"]], df["probability"], color=colors)
    for y, p in enumerate(df["probability"]):
        ax.text(p, y, f" {p:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1e-9, float(probs["probability"].max())) * 1.18)
    ax.set_xlabel("probability of the next token")
    ax.set_title(title or "What the model predicts next")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def accuracy_vs_demos(frame: pd.DataFrame, title: str | None = None) -> matplotlib.figure.Figure:
    """ICL accuracy against the number of demonstrations, one line per task (category colours)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = "osD^vP*X"
    for k, (task, rows) in enumerate(frame.groupby("task", sort=False)):
        ax.plot(rows["n_demos"], rows["accuracy"], marker=markers[k % len(markers)], lw=1.8,
                color=CATEGORY_COLORS.get(rows["category"].iloc[0], "black"), label=task)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("number of demonstrations in the prompt (0 = zero-shot)")
    ax.set_ylabel("ICL accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "More demonstrations, better in-context learning")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig



_MARKERS = "osD^v<>P"


def task_scatter(emb: pd.DataFrame, title: str | None = None, ax: plt.Axes | None = None,
                 legend: bool = True) -> matplotlib.figure.Figure:
    """A 2-D embedding of task vectors (:func:`tvlab.geometry.embed_2d`): one colour per category, one marker per task."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 5.5))
    for category, rows in emb.groupby("category", sort=False):
        for k, (task, r) in enumerate(rows.groupby("task", sort=False)):
            ax.scatter(r.x, r.y, s=16, marker=_MARKERS[k % len(_MARKERS)], color=CATEGORY_COLORS.get(category, "#777777"),
                       alpha=0.8, label=task)
    ax.set(title=title or "Task vectors in 2-D", xticks=[], yticks=[])
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    return fig
