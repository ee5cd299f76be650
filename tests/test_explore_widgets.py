"""The functions behind the notebooks' widgets, and the widgets driven without a browser."""

import pandas as pd
import pytest

import tvlab
from tvlab import exercises, explore, solutions, widgets


def test_next_token_probs_are_sorted_probabilities(tiny):
    probs = explore.next_token_probs(tiny, "example:hot->cold\nexample:big->", k=5)
    assert list(probs["rank"]) == [1, 2, 3, 4, 5]
    assert probs["probability"].is_monotonic_decreasing and 0 < probs["probability"].sum() <= 1.0001


def test_icl_prompt_nests_demonstrations_and_never_shows_the_query(tiny):
    five = explore.icl_prompt(tiny, "antonyms", 5, "hot")
    two = explore.icl_prompt(tiny, "antonyms", 2, "hot")
    assert five.endswith("example:hot->") and five.count("\n") == 5
    assert five.startswith(two[: two.rindex("\n")])
    assert "example:hot->cold" not in five
    assert explore.icl_prompt(tiny, "antonyms", 0, "hot") == "example:hot->"


def test_icl_vs_demos_frame(tiny):
    frame = explore.icl_vs_demos(tiny, ["antonyms", "next_letter"], [0, 2], n_sets=4)
    assert list(frame.columns) == ["task", "category", "n_demos", "accuracy"]
    assert len(frame) == 4 and frame["accuracy"].between(0, 1).all()


def test_format_comparison_frame(tiny):
    frame = explore.format_comparison(tiny, ["antonyms"], ["paper", "arrow"], n_sets=3)
    assert list(frame["format"]) == ["paper", "arrow"]
    assert frame.loc[0, "example"] == "example:x->y"


def test_three_predictions_agree_with_the_engine(tiny):
    r = explore.three_predictions(tiny, "antonyms", "hot", layer=2)
    assert r.expected == "cold" and r.zero_shot_prompt == "example:hot->"
    assert "example:hot->" in r.icl_prompt and len(r.dummy_prompts) == 2
    assert list(r.table()["method"].str.split().str[0]) == ["ICL", "task", "baseline"]
    with pytest.raises(ValueError, match="out of range"):
        explore.three_predictions(tiny, "antonyms", "hot", layer=99)


def test_layer_sweep_frame(tiny):
    frame = tvlab.layer_sweep(tiny, ["antonyms"], tvlab.ExperimentConfig(n_dev=3))
    assert list(frame["layer"]) == list(range(tiny.n_layers))


def test_icl_explorer_responds_to_its_controls(tiny):
    e = widgets.icl_explorer(tiny)
    e.refresh()
    assert e.result["prompt"].count("\n") == 5 and len(e.out.outputs) == 2  # prompt text + figure
    e.controls["n_demos"].value = 1  # fires the observer, as a user moving the slider would
    assert e.result["prompt"].count("\n") == 1
    e.controls["query"].value = "cold"
    assert e.result["prompt"].endswith("example:cold->")
    e.controls["query"].value = "  "
    assert e.result is None and "type a query" in e.error
    assert e.controls["n_demos"].continuous_update is False
    e.controls["task"].value = "country_capital"  # a new task brings one of its own queries
    assert e.controls["query"].value == tvlab.get_task("country_capital").pairs[0].input
    assert e.result["prompt"].endswith(f"example:{e.controls['query'].value}->")


def test_helper_modules_load_on_first_use():
    for name in ("exercises", "solutions", "widgets"):
        assert getattr(tvlab, name).__name__ == f"tvlab.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        tvlab.nonsense


def test_patching_explorer_uses_the_chosen_layer(tiny):
    e = widgets.patching_explorer(tiny, layer=1)
    e.refresh()
    assert e.result.layer == 1
    e.controls["layer"].value = 3
    assert e.result.layer == 3 and e.controls["layer"].max == tiny.n_layers - 1
    assert "Expected: " in e.out.outputs[0]["text"]


def test_layer_explorer_filters_tasks(tiny):
    by_layer = tvlab.layer_sweep(tiny, ["antonyms", "next_letter"], tvlab.ExperimentConfig(n_dev=2))
    e = widgets.layer_explorer(by_layer, tasks=["antonyms"])
    e.refresh()
    assert set(e.result["task"]) == {"antonyms"}
    e.controls["tasks"].value = ("antonyms", "next_letter")
    assert set(e.result["task"]) == {"antonyms", "next_letter"}
    e.controls["tasks"].value = ()
    assert "select at least one" in e.error


def test_exercise_checks_pass_the_reference_solutions(tiny, capsys):
    assert exercises.check_top_token(solutions.top_token, tiny)
    assert exercises.check_build_prompt(solutions.build_prompt)
    assert exercises.check_extract_theta(solutions.extract_theta, tiny)
    assert exercises.check_patched_prediction(solutions.patched_prediction, tiny)
    assert exercises.check_best_layers(solutions.best_layers)
    assert capsys.readouterr().out.count("PASS") == 5


def test_exercise_checks_fail_wrong_answers_with_a_hint(tiny, capsys):
    assert not exercises.check_build_prompt(lambda demos, q: f"{q} ->")
    assert not exercises.check_extract_theta(lambda lm, d, dummies, layer: solutions.extract_theta(lm, d, dummies, layer + 1), tiny)
    assert not exercises.check_patched_prediction(lambda lm, q, theta, layer: "nonsense", tiny)
    assert not exercises.check_best_layers(lambda by_layer: {})
    assert not exercises.check_top_token(lambda lm, text: 1 / 0, tiny)  # a crash is reported, not raised
    out = capsys.readouterr().out
    assert out.count("FAIL") == 5 and out.count("Hint:") == 5 and "ZeroDivisionError" in out


def test_next_token_explorer_follows_the_prompt(tiny):
    e = widgets.next_token_explorer(tiny, text="example:hot->cold\nexample:big->", k=3)
    e.refresh()
    assert len(e.result) == 3
    pd.testing.assert_frame_equal(e.result, explore.next_token_probs(tiny, "example:hot->cold\nexample:big->", k=3))
    e.controls["k"].value = 5
    assert len(e.result) == 5 and e.out.outputs[0]["text"].startswith("Most likely next token:")
    assert e.out.outputs[1]["output_type"] == "display_data"  # the bar chart
    e.controls["text"].value = " "
    assert e.result is None and "type a prompt" in e.error


def test_model_explorer_runs_the_chosen_model_and_task(tiny):
    other = tvlab.tiny_model("gpt2")
    config = tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2)
    e = widgets.model_explorer({"llama": tiny, "gpt2": other}, tasks=["to_upper", "antonyms"], config=config)
    e.refresh()
    assert e.result[0] == "llama" and e.result[2].task == "to_upper"
    e.controls["model"].value = "gpt2"
    e.controls["task"].value = "antonyms"
    model, n_layers, run = e.result
    assert (model, n_layers, run.task) == ("gpt2", other.n_layers, "antonyms")
    assert e.out.outputs[0]["text"].startswith("gpt2, antonyms: baseline")


def test_peak_relative_depth_check(capsys):
    assert exercises.check_peak_relative_depth(solutions.peak_relative_depth)
    assert not exercises.check_peak_relative_depth(lambda by_layer, n: by_layer["accuracy"].idxmax() / n)
    assert not exercises.check_peak_relative_depth(lambda by_layer, n: None)
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.count("FAIL") == 2 and out.count("Hint:") == 2
