"""Figures, drawn from the tidy frames that the experiments return.

>>> lm = tvlab.load_model("tiny-llama")           # tvlab.load_model() loads the real Gemma 3 270M
>>> run = tvlab.run_task(lm, "antonyms", tvlab.ExperimentConfig(n_test=5, n_dev=5, n_baseline=5))
>>> fig = tvlab.plots.main_bars(run.summary)      # the paper's main-result bars, for your model
>>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
['Baseline (zero-shot)', 'ICL', 'Task vector']
>>> fig = tvlab.plots.layer_curves(run.by_layer)  # accuracy by layer (the paper's layer figure)

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


def _is_predictions(frame: pd.DataFrame) -> bool:
    return "correct" in frame.columns


def main_bars(frame: pd.DataFrame, title: str | None = None) -> matplotlib.figure.Figure:
    """Grouped bars per task: baseline, ICL and task-vector accuracy, tasks grouped by category.

    Pass the per-prediction frame (``run.predictions``) to get 95 % confidence intervals as error
    bars (seaborn, bootstrap over the test sets), or a ``summarize`` table for the bars alone.
    """
    import seaborn as sns

    methods = ["baseline", "icl", "task_vector"]
    if _is_predictions(frame):
        test = frame[frame["split"] == "test"]
        order = _task_order(test["task"].unique())
        categories = test.drop_duplicates("task").set_index("task").loc[order, "category"]
    else:
        df = frame.set_index("task").loc[_task_order(frame["task"])].reset_index()
        order, categories = list(df["task"]), df.set_index("task")["category"]
        test = df.melt(id_vars=["task"], value_vars=methods, var_name="method", value_name="correct")
    fig, ax = plt.subplots(figsize=(max(6, 0.62 * len(order) + 1.5), 4.2))
    sns.barplot(data=test, x="task", y="correct", hue="method", order=order, hue_order=methods,
                palette=METHOD_COLORS, errorbar=("ci", 95) if _is_predictions(frame) else None,
                seed=0, err_kws={"linewidth": 1}, capsize=0.15, ax=ax)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=50, ha="right", fontsize=8)
    for tick, task in zip(ax.get_xticklabels(), order):
        tick.set_color(CATEGORY_COLORS.get(categories[task], "black"))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("")
    ax.set_ylabel("accuracy (first token)")
    ax.set_title(title or "ICL, task vector and baseline accuracy per task")
    handles, labels = ax.get_legend_handles_labels()
    extra = ["lines: 95 % confidence interval"] if _is_predictions(frame) else []
    ax.legend(handles, [METHOD_LABELS[m] for m in labels], title=extra[0] if extra else None, title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def layer_curves(frame: pd.DataFrame, tasks: list[str] | None = None, title: str | None = None,
                 ax: plt.Axes | None = None) -> matplotlib.figure.Figure:
    """Dev accuracy of the task vector by layer.

    ``frame``: the ``by_layer`` table (one accuracy per task and layer), or the per-prediction
    frame (``run.predictions``), which adds a 95 % confidence band (seaborn). Up to 6 tasks: one
    labelled line each. More: one panel per category, each task a thin labelled line and the
    category's mean in bold (``ax`` is then ignored).
    """
    import seaborn as sns

    if _is_predictions(frame):
        frame = frame[(frame["split"] == "dev") & (frame["method"] == "task_vector")]
        frame = frame.rename(columns={"correct": "accuracy"}).astype({"accuracy": float, "layer": int})
    df = frame if tasks is None else frame[frame["task"].isin(tasks)]
    if df.empty:
        raise ValueError("no layer accuracies to plot: pass the by_layer frame of a run (and task names it holds).")
    band = ("ci", 95) if df.duplicated(["task", "layer"]).any() else None  # several sets per layer: a band

    def style(ax, label_y=True):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("layer L (patched output of block L)")
        ax.set_ylabel("task-vector accuracy (dev)" if label_y else "")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)

    if df["task"].nunique() <= 6:
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.2))
        for task, rows in df.groupby("task", sort=False):
            color = CATEGORY_COLORS.get(rows["category"].iloc[0], "black")
            sns.lineplot(data=rows, x="layer", y="accuracy", errorbar=band, seed=0, color=color, marker="o",
                         markersize=4, lw=1.8, label=task, ax=ax)
        style(ax)
        ax.set_title(title or "Where is the task? Task-vector accuracy by layer")
        ax.legend(fontsize=8, frameon=False, loc="upper left", title="band: 95 % CI" if band else None, title_fontsize=7)
        fig.tight_layout()
        return fig
    categories = [c for c in CATEGORIES + ("custom",) if c in set(df["category"])]
    fig, axes = plt.subplots(1, len(categories), figsize=(3.6 * len(categories), 3.8), sharey=True, squeeze=False)
    for k, (category, ax) in enumerate(zip(categories, axes[0])):
        rows = df[df["category"] == category]
        color = CATEGORY_COLORS[category]
        per_task = rows.groupby(["task", "layer"], sort=False)["accuracy"].mean().reset_index()
        for (task, r), style_ in zip(per_task.groupby("task", sort=False), ["-", "--", ":", "-."] * 3):
            ax.plot(r["layer"], r["accuracy"], color=color, lw=0.9, alpha=0.55, ls=style_, label=task)
        sns.lineplot(data=rows, x="layer", y="accuracy", errorbar=band, seed=0, color=color, lw=2.5,
                     label="mean" + (" (95 % CI)" if band else ""), ax=ax)
        style(ax, label_y=k == 0)
        ax.set_title(category, color=color)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.suptitle(title or "Where is the task? Task-vector accuracy by layer")
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


def model_anatomy(lm, tokens: list[str], attention, block: int, answer: str) -> matplotlib.figure.Figure:
    """Positions x layers of one prompt: a square per hidden state, a line per residual stream, and the
    last position's attention in ``block`` as red lines as wide as their weights.

    ``tokens``: the prompt's tokens, decoded; ``attention``: :func:`tvlab.engine.last_position_attention`
    of the same prompt; ``answer``: the predicted next token, written above the last position.
    """
    n, L = len(tokens), lm.n_layers
    if not 0 <= block < L:
        raise ValueError(f"block must be between 0 and {L - 1}, got {block}.")
    if tuple(attention.shape) != (L, n):
        raise ValueError(f"attention has shape {tuple(attention.shape)} but {n} tokens and {L} blocks need ({L}, {n}): "
                         "pass tvlab.engine.last_position_attention of the same prompt.")
    fig, ax = plt.subplots(figsize=(10.5, 7.5))
    for x in range(n):
        color, last = ("#E07A1F", True) if x == n - 1 else ("#2A6F97", False)
        ax.plot([x, x], [0, L], color=color, lw=2.5 if last else 1.2, alpha=0.6, zorder=1)
        ax.scatter([x] * (L + 1), range(L + 1), s=60 if last else 30, color=color, marker="s", zorder=3)
    for x, w in enumerate(attention[block].tolist()):  # row `block` is layer block-1: what block `block` reads
        # A gentle arc (at most a third of a row above its chord) keeps every line between the row it reads
        # and the row it writes, and the lines from nearby positions apart.
        bend = -0.6 / max(n - 1 - x, 1) if x < n - 2 else 0.0
        ax.annotate("", xy=(n - 1, block + 1), xytext=(x, block), zorder=2, arrowprops=dict(
            arrowstyle="-", color="#C44E52", lw=0.3 + 12 * w, alpha=0.75, shrinkA=4, shrinkB=4,
            connectionstyle=f"arc3,rad={bend:.3f}"))
        if w >= 0.1:  # the weights that carry most of the mix, written where their lines start
            ax.text(x + 0.12, block - 0.45, f"{w:.2f}", fontsize=8, color="#C44E52", ha="left", va="center",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5), zorder=4)
    ax.add_patch(plt.Rectangle((-0.4, -0.4), n - 1.2, L + 0.8, fill=False, ls="--", lw=1, color="#777777"))
    ax.annotate(f"next token: {answer!r}", xy=(n - 1, L), xytext=(n - 1, L + 1.3), ha="center", fontsize=9,
                color="#E07A1F", arrowprops=dict(arrowstyle="->", color="#E07A1F"))
    reads = f"layer {block - 1}" if block else "the embeddings"
    ax.text(-0.4, L + 0.8, f"red: attention of the last position in block {block}: it reads {reads} "
            f"(line width = weight, mean of the heads)", fontsize=8, color="#C44E52",
            va="center")
    ax.text(n - 0.6, L / 2, "residual stream:\nblock L adds its\noutput to the\nstate below it", fontsize=8,
            color="#E07A1F", va="center")
    ax.text((n - 2) / 2, -1.6, "earlier positions: later tokens read them only through their keys and values "
            "(kept as the KV cache)", ha="center", fontsize=8, color="#555555")
    ax.set_xticks(range(n), [f"{t!r}"[1:-1] + f"\n{x}" for x, t in enumerate(tokens)], fontsize=8)
    ax.set_yticks(range(L + 1), ["embeddings"] + [f"layer {layer}" for layer in range(L)], fontsize=7)
    ax.set(ylim=(-2, L + 2), xlim=(-0.7, n + 1.2), xlabel="position (token)")
    ax.set_title(f"{lm.name}: {L} layers; each square is a hidden state of d_model = {lm.d_model} numbers", fontsize=10)
    ax.spines[["top", "right", "left", "bottom"]].set_visible(False)
    fig.tight_layout()
    return fig
