"""Geometry, conflicting tasks and vector inspection (machinery, on tiny models)."""

import numpy as np
import pandas as pd
import pytest
import torch

import tvlab
from tvlab import conflicts, geometry, inspect_vectors


@pytest.fixture(scope="module")
def bank(tiny):
    return geometry.collect_task_vectors(tiny, ["antonyms", "next_letter", "to_upper"], n_per_task=6)


def test_collect_shapes_and_labels(bank, tiny):
    assert bank.vectors.shape == (18, tiny.n_layers, tiny.d_model)
    assert list(bank.labels.columns) == ["task", "category", "set"]
    assert bank.tasks == ["antonyms", "next_letter", "to_upper"]
    assert bank.settings["n_demos"] == 4 and bank.settings["n_per_task"] == 6


def test_vectors_equal_extract_task_vector(bank, tiny):
    task = tvlab.get_task("antonyms")
    config = tvlab.ExperimentConfig(n_demos=4)
    filtered, _ = tvlab.prepare_task(tiny, task, config)
    s = tvlab.sample_sets(filtered, 6, 4, 41, "geometry", 2)[2]
    theta = tvlab.extract_task_vector(tiny, s.demos, s.dummies, layer=1)
    torch.testing.assert_close(bank.vectors[2, 1], theta, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(bank, tmp_path):
    path = bank.save(tmp_path / "tv.safetensors")
    again = geometry.TaskVectors.load(path)
    assert torch.equal(again.vectors, bank.vectors)
    pd.testing.assert_frame_equal(again.labels, bank.labels)
    assert again.settings == bank.settings


def test_distances_on_a_known_geometry():
    # Two tight clusters in opposite directions: within ~0, between ~2.
    base = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    vectors = torch.cat([base[0] + 0.01 * torch.randn(5, 2), base[1] + 0.01 * torch.randn(5, 2)]).unsqueeze(1)
    labels = pd.DataFrame({"task": ["a"] * 5 + ["b"] * 5, "category": "custom", "set": list(range(5)) * 2})
    bank = geometry.TaskVectors(vectors, labels, {})
    summary = geometry.distance_summary(bank, 0)
    assert summary["within"] < 0.01 and summary["between"] > 1.9
    sep = geometry.separability(bank, 0)
    assert sep["nearest_centroid_accuracy"] == 1.0 and sep["silhouette"] > 0.9 and sep["chance"] == 0.5
    assert geometry.variability(bank, 0)["variability"].max() < 0.01
    pairs = geometry.pairwise_distances(bank, 0)
    assert (pairs["kind"] == "within task").sum() == 2 * 10 and len(pairs) == 45


def test_embed_2d_and_by_layer(bank, tiny):
    for method in ("pca", "tsne"):
        xy = geometry.embed_2d(bank, layer=2, method=method)
        assert list(xy.columns) == ["task", "category", "x", "y"] and len(xy) == 18
        assert np.isfinite(xy[["x", "y"]].to_numpy()).all()
    table = geometry.by_layer(bank)
    assert list(table["layer"]) == list(range(tiny.n_layers))
    with pytest.raises(ValueError, match="method must be"):
        geometry.embed_2d(bank, 0, method="umap")
    with pytest.raises(ValueError, match="out of range"):
        bank.at(99)


def test_top_tokens_are_the_unembedding_of_the_normed_vector(tiny):
    v = torch.randn(tiny.d_model)
    top = inspect_vectors.top_tokens(tiny, v, k=3)
    with torch.no_grad():
        logits = tiny.unembed(tiny.final_norm(v.view(1, 1, -1)))[0, 0]
    assert top["logit"].iloc[0] == pytest.approx(float(logits.max()), abs=0.01)
    with pytest.raises(ValueError, match="hidden size"):
        inspect_vectors.top_tokens(tiny, torch.zeros(3))


def test_top_tokens_by_task(bank, tiny):
    table = inspect_vectors.top_tokens_by_task(tiny, bank, layer=2, k=4)
    assert list(table["task"]) == bank.tasks and table["top_tokens"].str.count(",").eq(3).all()


def test_conflicting_tasks_scores_both_answers(tiny):
    frame = conflicts.conflicting_tasks(tiny, "next_letter", "to_upper", n_sets=6, n_dev=3)
    assert list(frame["method"]) == ["icl", "task_vector"]
    assert frame["as_a"].between(0, 1).all() and frame["as_b"].between(0, 1).all()
    assert frame.loc[1, "layer"] == frame.loc[1, "layer"]  # a chosen layer, not missing
    fixed = conflicts.conflicting_tasks(tiny, "next_letter", "to_upper", n_sets=6, layer=1)
    assert fixed.loc[1, "layer"] == 1


def test_conflicting_tasks_need_shared_inputs(tiny):
    with pytest.raises(tvlab.TaskError, match="share only 0 inputs"):
        conflicts.conflicting_tasks(tiny, "country_capital", "antonyms", n_sets=2, layer=1)


def test_notebook_exercise_checks_on_a_bank(bank, tiny, capsys, solutions):
    """The checks of notebooks 04-06 pass the reference solutions and fail wrong or crashing answers."""
    from tvlab import exercises

    layers = (0, tiny.n_layers - 1)
    assert exercises.check_mean_within_task_distance(solutions.mean_within_task_distance, bank, layers)
    assert exercises.check_winner(solutions.winner)
    assert exercises.check_top_k_tokens(solutions.top_k_tokens, tiny, bank, layer=2)
    assert capsys.readouterr().out.count("PASS") == 3

    assert not exercises.check_mean_within_task_distance(lambda b, layer: None, bank, layers)
    assert not exercises.check_mean_within_task_distance(  # all pairs, not only within a task
        lambda b, layer: geometry.distance_summary(b, layer)["between"], bank, layers)
    assert not exercises.check_winner(lambda frame: "B")
    assert not exercises.check_winner(lambda frame: frame.loc[99])  # a crash is reported, not raised
    assert not exercises.check_top_k_tokens(lambda lm, v, k: solutions.top_k_tokens(lm, v, k)[::-1], tiny, bank, layer=2)
    out = capsys.readouterr().out
    assert out.count("FAIL") == 5 and out.count("Hint:") == 5 and "KeyError" in out


def test_geometry_explorer_redraws_at_the_new_layer(bank):
    from tvlab import widgets

    e = widgets.geometry_explorer(bank, layer=1)
    e.refresh()
    assert e.result["layer"] == 1 and len(e.result["emb"]) == len(bank.labels)
    e.controls["layer"].value = 2
    assert e.result["layer"] == 2
    assert e.result["within"] == geometry.distance_summary(bank, 2)["within"]
    assert e.out.outputs[0]["text"].startswith("layer 2: within")
    assert e.out.outputs[1]["output_type"] == "display_data"


def test_conflict_explorer_scores_the_chosen_pair(tiny):
    from tvlab import widgets

    e = widgets.conflict_explorer(tiny, "next_letter", "to_upper", n_sets=3, n_dev=2)
    e.refresh()
    assert set(e.result["method"]) == {"icl", "task_vector"} and set(e.result["task_b"]) == {"to_upper"}
    e.controls["task_b"].value = "prev_letter"
    assert set(e.result["task_b"]) == {"prev_letter"}
    assert "With θ of prev_letter patched at layer" in e.out.outputs[1]["text"]
    e.controls["task_b"].value = "country_capital"  # no shared inputs: said in the output area
    assert e.result is None and "share only" in e.error


def test_top_tokens_explorer_centers_by_default(bank, tiny):
    from tvlab import widgets

    e = widgets.top_tokens_explorer(tiny, bank, task="to_upper", layer=1, k=4)
    e.refresh()
    want = inspect_vectors.top_tokens(tiny, bank.mean("to_upper", 1) - bank.vectors[:, 1].mean(0), k=4)
    pd.testing.assert_frame_equal(e.result, want)
    e.controls["layer"].value = 2
    assert e.result.equals(inspect_vectors.top_tokens(tiny, bank.mean("to_upper", 2) - bank.vectors[:, 2].mean(0), k=4))
    assert "rank" in e.out.outputs[0]["text"]


def test_task_scatter_draws_one_series_per_task(bank):
    import matplotlib.pyplot as plt

    fig = tvlab.plots.task_scatter(geometry.embed_2d(bank, 1, "pca"), "t")
    assert len(fig.axes[0].collections) == len(bank.tasks)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == bank.tasks
    plt.close(fig)


def test_conflict_vectors_never_saw_the_query_they_are_tested_on(tiny, monkeypatch):
    """θ_B for an A prompt comes from B demonstrations that never include that prompt's query (as in the paper)."""
    calls, captured = [], {}
    real_sample, real_icl = conflicts.sample_sets, conflicts.icl_and_task_vectors

    def spy_sample(*args, **kwargs):
        out = real_sample(*args, **kwargs)
        calls.append(out)
        return out

    def spy_icl(lm, sets, *args, **kwargs):
        captured["b_sets"] = list(sets)
        return real_icl(lm, sets, *args, **kwargs)

    monkeypatch.setattr(conflicts, "sample_sets", spy_sample)
    monkeypatch.setattr(conflicts, "icl_and_task_vectors", spy_icl)
    # Two small tasks over the same 12 letters: an unfiltered draw of 4 demonstrations and 2 dummies
    # from B would hold the A query in about half of the sets.
    letters = "abcdefghijkl"
    a = tvlab.Task("shift", "custom", tuple(tvlab.Pair(c, chr(ord(c) + 1)) for c in letters))
    b = tvlab.Task("upper", "custom", tuple(tvlab.Pair(c, c.upper()) for c in letters))
    conflicts.conflicting_tasks(tiny, a, b, n_sets=20, layer=1, n_demos=4)
    a_sets, b_sets = calls[0], captured["b_sets"]
    assert len(a_sets) == len(b_sets) == 20
    for a, b in zip(a_sets, b_sets):
        assert a.query.input not in {p.input for p in (*b.demos, *b.dummies)}
