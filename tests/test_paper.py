import tvlab


def test_paper_table_has_18_tasks_for_7_models_with_our_names():
    df = tvlab.paper.results()
    assert len(df) == 126 and df["model"].nunique() == 7
    assert set(df["task"]) == set(tvlab.list_tasks(include_extra=False))


def test_paper_means_match_the_published_averages():
    means = tvlab.paper.model_means().set_index("model")
    assert round(means.loc["LLaMA 7B", "task_vector"], 3) == 0.776
    assert round(means.loc["all models", "icl"], 2) == 0.84
    cats = tvlab.paper.category_means().set_index("category")
    assert round(cats.loc["translation", "task_vector"], 2) == 0.61


def test_layer_peaks():
    peaks = tvlab.paper.layer_peaks().set_index("model")
    assert peaks.loc["LLaMA 7B", "relative_depth"] == round(14 / 32, 3)
