"""Figures from tidy frames: labels from the same frame as the bars, intervals where there are several sets."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import tvlab  # noqa: E402


def _predictions(tasks, n_sets=8, n_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        category = tvlab.tasks.task_category(task)
        for k in range(n_sets):
            for layer in range(n_layers):
                rows.append({"task": task, "category": category, "split": "dev", "set": k, "method": "task_vector",
                             "layer": layer, "correct": bool(rng.random() < 0.2 + 0.15 * layer)})
            for method in ("baseline", "icl", "task_vector"):
                rows.append({"task": task, "category": category, "split": "test", "set": k, "method": method,
                             "layer": 2 if method == "task_vector" else None, "correct": bool(rng.random() < 0.6)})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def test_main_bars_from_predictions_has_error_bars_and_ordered_labels():
    preds = _predictions(["antonyms", "next_letter", "country_capital"])
    fig = tvlab.plots.main_bars(preds)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["next_letter", "antonyms", "country_capital"]  # paper order
    assert len(ax.lines) == 9  # one interval per bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Baseline (zero-shot)", "ICL", "Task vector"]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0)
    summary = tvlab.summarize(preds)
    assert heights == sorted(round(v, 6) for v in summary[["baseline", "icl", "task_vector"]].to_numpy().ravel() if v > 0)
    fig = tvlab.plots.main_bars(summary)  # a summary table: the same bars, no intervals
    assert len(fig.axes[0].lines) == 0


def test_layer_curves_band_and_category_panels():
    few = _predictions(["antonyms", "to_upper"])
    fig = tvlab.plots.layer_curves(few)
    assert len(fig.axes[0].collections) == 2  # a confidence band per task
    fig = tvlab.plots.layer_curves(tvlab.layer_accuracy(few))  # one accuracy per layer: no band
    assert len(fig.axes[0].collections) == 0
    many = _predictions(["next_letter", "to_upper", "fr_en", "en_es", "antonyms", "country_capital", "person_language"])
    fig = tvlab.plots.layer_curves(many)
    assert [ax.get_title() for ax in fig.axes] == ["algorithmic", "translation", "linguistic", "knowledge"]
    labels = {t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()}
    assert {"next_letter", "fr_en", "person_language", "mean (95 % CI)"} <= labels  # every thin line is named


def test_model_anatomy_draws_each_position_and_the_blocks_attention(tiny):
    ids = tiny.tokenizer("example:hot->cold\nexample:big->").input_ids
    tokens = [tiny.tokenizer.decode([i]) for i in ids]
    attention = tvlab.engine.last_position_attention(tiny, ids)
    fig = tvlab.plots.model_anatomy(tiny, tokens, attention, block=2, answer=" small")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "->\n" + str(len(ids) - 1)
    lines = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None and a.get_text() == ""]
    assert len(lines) == len(ids)  # one red line per position, as wide as its weight
    widths = [a.arrow_patch.get_linewidth() for a in lines]
    assert widths.index(max(widths)) == int(attention[2].argmax())
    assert "reads layer 1" in " ".join(t.get_text() for t in ax.texts) and "d_model = 64" in ax.get_title()
    plt.close(fig)
    fig = tvlab.plots.model_anatomy(tiny, tokens, attention, block=0, answer=" small")
    assert "it reads the embeddings" in " ".join(t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    with pytest.raises(ValueError, match="block must be between 0 and 3"):
        tvlab.plots.model_anatomy(tiny, tokens, attention, block=4, answer=" small")
    with pytest.raises(ValueError, match=r"attention has shape \(4, 10\) but 11 tokens"):
        tvlab.plots.model_anatomy(tiny, tokens, attention[:, 1:], block=2, answer=" small")
