"""The functions behind the notebooks' widgets, and the widgets driven without a browser."""

import pandas as pd
import pytest

import tvlab
from tvlab import exercises, explore, widgets


def test_next_token_probs_are_sorted_probabilities(tiny):
    probs = explore.next_token_probs(tiny, "example:hot->cold\nexample:big->", k=5, digits=8)
    assert list(probs["rank"]) == [1, 2, 3, 4, 5]
    assert probs["probability"].is_monotonic_decreasing and 0 < probs["probability"].sum() <= 1.0001
    shown = explore.next_token_probs(tiny, "example:hot->cold\nexample:big->", k=5)  # rounded for display
    assert (shown["probability"] == probs["probability"].round(2)).all()


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
    """The same three tokens as the plain reference path: one prompt per forward, nothing shared."""
    from tvlab.engine import predict_last_plain

    # Random models whose three answers differ (the `tiny` fixture answers one token to everything).
    cases = [(tvlab.tiny_model("llama", seed=2), "hot", 1), (tvlab.tiny_model("llama", seed=2), "big", 0),
             (tvlab.tiny_model("gpt2", seed=0), "hot", 2)]
    for lm, query, layer in cases:
        r = explore.three_predictions(lm, "antonyms", query, layer=layer)
        ids = lambda text: lm.tokenizer(text).input_ids  # noqa: E731
        icl = predict_last_plain(lm, [ids(r.icl_prompt)]).top_ids[0]
        dummies = predict_last_plain(lm, [ids(d) for d in r.dummy_prompts], read=True).hidden  # [2, layers, d]
        theta = dummies.mean(0)[layer]  # θ: the mean over the dummy prompts' last-token states
        zero = ids(r.zero_shot_prompt)
        tv = predict_last_plain(lm, [zero], patches=[(layer, theta)]).top_ids[0]
        base = predict_last_plain(lm, [zero]).top_ids[0]
        want = [lm.tokenizer.decode([int(t)]).strip() for t in (icl, tv, base)]
        assert [r.icl, r.task_vector, r.baseline] == want
        assert list(r.table()["prediction"]) == want
        assert len(set(want)) == 3  # three different answers: a mix-up of any two would show
        assert r.zero_shot_prompt == f"{lm.prompt_prefix}example:{query}->" and len(r.dummy_prompts) == 2
        demos = r.icl_prompt[: r.icl_prompt.rindex("\n") + 1]
        assert all(d.startswith(demos) for d in r.dummy_prompts)  # the dummies follow the same demonstrations
    assert r.expected == "cold"
    assert list(r.table()["method"].str.split().str[0]) == ["ICL", "task", "baseline"]
    with pytest.raises(ValueError, match="out of range"):
        explore.three_predictions(tiny, "antonyms", "hot", layer=99)


def _own_task(name="my_opposites"):
    """A user's own task (not a built-in name) that maps one input to two outputs."""
    pairs = tvlab.get_task("antonyms").pairs
    extra = tvlab.Pair(pairs[1].input, pairs[2].output)  # a second answer for the same input
    return tvlab.Task(name, "custom", pairs + (extra,), allow_multiple_outputs=True, description="mine",
                      notes=("written by hand",))


def test_three_predictions_table_scores_a_users_own_task(tiny):
    own = _own_task()
    query = own.pairs[0].input
    r = explore.three_predictions(tiny, own, query, layer=2)
    table = r.table()  # no get_task("my_opposites"): the record keeps the task it scored with
    assert r.task == "my_opposites" and r.expected == own.pairs[0].output
    assert list(table["correct"]) == [own.score(p, own.pairs[0]) for p in table["prediction"]]
    assert explore.icl_prompt(tiny, own, 5, query).endswith(f"example:{query}->")


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
    for name in ("exercises", "widgets"):
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


def test_exercise_checks_pass_the_reference_solutions(tiny, capsys, solutions):
    assert exercises.check_top_token(solutions.top_token, tiny)
    assert exercises.check_build_prompt(solutions.build_prompt)
    assert exercises.check_extract_theta(solutions.extract_theta, tiny)
    assert exercises.check_patched_prediction(solutions.patched_prediction, tiny)
    assert exercises.check_best_layers(solutions.best_layers)
    assert capsys.readouterr().out.count("PASS") == 5


def test_exercise_checks_fail_wrong_answers_with_a_hint(tiny, capsys, solutions):
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


def test_peak_relative_depth_check(capsys, solutions):
    assert exercises.check_peak_relative_depth(solutions.peak_relative_depth)
    assert not exercises.check_peak_relative_depth(lambda by_layer, n: by_layer["accuracy"].idxmax() / n)
    assert not exercises.check_peak_relative_depth(lambda by_layer, n: None)
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.count("FAIL") == 2 and out.count("Hint:") == 2


@pytest.mark.parametrize("make, behind", [(lambda lm: widgets.icl_explorer(lm), "icl_prompt"),
                                          (lambda lm: widgets.patching_explorer(lm, layer=1), "three_predictions")])
def test_a_task_change_computes_once_with_the_new_query(tiny, monkeypatch, make, behind):
    e = make(tiny)
    e.refresh()
    calls = []
    real = getattr(explore, behind)

    def counted(lm, task, *args, **kwargs):
        calls.append((task, args))
        return real(lm, task, *args, **kwargs)

    monkeypatch.setattr(explore, behind, counted)
    e.controls["task"].value = "country_capital"
    new_query = tvlab.get_task("country_capital").pairs[0].input
    assert e.controls["query"].value == new_query
    assert len(calls) == 1 and calls[0][0] == "country_capital" and new_query in calls[0][1]
    assert e.error is None and e.result is not None


def _texts(outputs):
    return [(o["output_type"], o.get("text")) for o in outputs]


def test_static_output_is_what_the_widget_shows(tiny):
    e = widgets.next_token_explorer(tiny, text="example:hot->cold\nexample:big->", k=3)
    e.refresh()
    static = e.static()
    assert _texts(static.outputs) == _texts(e.out.outputs)
    assert static.outputs[1]["output_type"] == "display_data" and "image/png" in static.outputs[1]["data"]
    assert repr(static).startswith("Most likely next token:")
    e.controls["k"].value = 5
    assert _texts(e.static().outputs) == _texts(e.out.outputs)  # the current settings


def test_static_output_without_displaying_the_widget(tiny, monkeypatch, capsys):
    e = widgets.icl_explorer(tiny, n_demos=2)  # never displayed, never refreshed
    static = e.static()
    assert static.outputs[0]["text"].startswith("Prompt:\n") and e.out.outputs == ()
    e.refresh()
    calls = []
    real = explore.icl_prompt
    monkeypatch.setattr(explore, "icl_prompt", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    again = e.static()
    assert calls == [] and _texts(again.outputs) == _texts(static.outputs)  # the shown result, not a recompute
    shown = []
    monkeypatch.setattr("IPython.display.publish_display_data", lambda data, metadata=None, **kw: shown.append(data))
    again._ipython_display_()  # ordinary cell output: the prompt on stdout, then the figure
    assert capsys.readouterr().out == static.outputs[0]["text"] and "image/png" in shown[0]


def test_decode_token_lives_with_the_model(tiny):
    import importlib

    from tvlab.models import decode_token

    ids = tiny.tokenizer("example:big->").input_ids
    assert [decode_token(tiny, i) for i in ids] == [tiny.tokenizer.decode([i]) for i in ids]
    assert decode_token(tiny, tiny.tokenizer.convert_tokens_to_ids("big")).strip() == "big"
    for name in ("experiments", "explore", "beyond", "conflicts", "inspect_vectors"):
        assert importlib.import_module(f"tvlab.{name}").decode_token is decode_token


def test_an_explorer_leaves_readable_text_for_readers_without_a_kernel(tiny):
    e = widgets.icl_explorer(tiny, task="antonyms", n_demos=2, query="hot")
    bundle = e._mimebundle()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == e.widget.model_id
    assert bundle["text/plain"] == widgets.Explorer.PLACEHOLDER and "VBox" not in bundle["text/plain"]
