import pandas as pd
import pytest
import torch

import tvlab
from tvlab.engine import predict_last_plain
from tvlab.experiments import prompt_format
from tvlab.prompts import tokenize

SMALL = tvlab.ExperimentConfig(n_test=6, n_dev=5, n_baseline=7, batch_size=16)


def test_run_task_returns_tidy_frames(tiny):
    run = tvlab.run_task(tiny, "antonyms", SMALL)
    p = run.predictions
    assert set(p["method"]) == {"baseline", "icl", "task_vector"}
    assert len(p[(p.split == "dev")]) == 5 * tiny.n_layers
    assert len(p[(p.split == "test") & (p.method == "baseline")]) == 7
    assert list(run.by_layer["layer"]) == list(range(tiny.n_layers))
    s = run.summary
    assert list(s.columns) == ["task", "category", "baseline", "icl", "task_vector", "best_layer", "tv_over_icl"]
    assert s.loc[0, "best_layer"] == run.best_layer == run.by_layer["accuracy"].idxmax()


def test_same_seed_same_tables(tiny):
    a = tvlab.run_task(tiny, "next_letter", SMALL).predictions
    b = tvlab.run_task(tiny, "next_letter", SMALL).predictions
    pd.testing.assert_frame_equal(a, b)
    c = tvlab.run_task(tiny, "next_letter", tvlab.ExperimentConfig(n_test=6, n_dev=5, n_baseline=7, batch_size=3)).predictions
    pd.testing.assert_frame_equal(a, c)


def test_task_vector_matches_a_plain_reimplementation(tiny):
    """θ = mean over dummies of the last-token hidden state; patched prediction = plain patched forward."""
    fmt = prompt_format(tiny, SMALL)
    s = tvlab.sample_sets(tvlab.get_task("antonyms"), 1, 5, seed=3, n_dummies=2)[0]
    dummy_ids = [tokenize(tiny.tokenizer, fmt, s.demos, d.input).ids for d in s.dummies]
    hidden = predict_last_plain(tiny, dummy_ids, read=True).hidden
    theta = tvlab.extract_task_vector(tiny, s.demos, s.dummies, layer=2)
    torch.testing.assert_close(theta, hidden[:, 2].mean(0), atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="n_test must be"):
        tvlab.ExperimentConfig(n_test=0)
    with pytest.raises(ValueError, match="n_demos must be"):
        tvlab.ExperimentConfig(n_demos=-1)
    with pytest.raises(ValueError, match="unknown prompt format"):
        tvlab.ExperimentConfig(format="chat")


def test_summary_and_categories(tiny):
    runs = [tvlab.run_task(tiny, t, SMALL).predictions for t in ("antonyms", "next_letter", "to_upper")]
    summary = tvlab.summarize(pd.concat(runs))
    cats = tvlab.category_means(summary)
    assert list(cats["category"]) == ["linguistic", "algorithmic", "all tasks"]
    assert cats.set_index("category").loc["all tasks", "n_tasks"] == 3


def test_wilson_interval_known_values():
    from tvlab.experiments import wilson_interval

    lo, hi = wilson_interval(10, 20)
    assert abs(lo - 0.2993) < 1e-3 and abs(hi - 0.7007) < 1e-3     # 0.5 over 20: about ±0.20
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17                            # not a zero-width interval at 0/20
    assert wilson_interval(20, 20)[1] == 1.0


def test_summary_and_categories_carry_their_uncertainty(tiny):
    run = tvlab.run_task(tiny, "antonyms", tvlab.ExperimentConfig(n_test=6, n_dev=3, n_baseline=4))
    table = tvlab.summarize(run.predictions, ci=True)
    assert list(table.columns[2:8]) == ["baseline", "baseline ±", "icl", "icl ±", "task_vector", "task_vector ±"]
    ci = tvlab.experiments.accuracy_ci(run.predictions[run.predictions["split"] == "test"])
    row = ci[ci["method"] == "icl"].iloc[0]
    assert row["n"] == 6 and row["lo"] <= row["accuracy"] <= row["hi"]
    assert table["icl ±"].iloc[0] == max(row["hi"] - row["accuracy"], row["accuracy"] - row["lo"])
    cats = tvlab.category_means(table)
    assert "icl ±" in cats and cats["icl ±"].iloc[0] == table["icl ±"].iloc[0]  # one task: its own interval
