"""Beyond the paper (tvlab.beyond): machinery on tiny models, checked against plain forward passes."""

import pandas as pd
import pytest
import torch

import tvlab
import tvlab.prompts
from tvlab import beyond


def test_generate_without_a_vector_is_greedy_decoding(tiny):
    text = "example:hot->cold\nexample:big->"
    ids = tiny.tokenizer(text, return_tensors="pt").input_ids
    reference = tiny.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    want = tiny.tokenizer.decode(reference[0, ids.shape[1]:])
    assert beyond.generate(tiny, text, max_new_tokens=4, stop="") == want


def test_generate_patches_the_prompt_only(tiny):
    """Cached generation equals re-running the whole sequence with θ at the prompt's last position."""
    text, layer = "example:big->", 2
    theta = torch.randn(tiny.d_model) * 3
    got = beyond.generate(tiny, text, theta, layer, max_new_tokens=4, stop="")
    ids = tiny.tokenizer(text).input_ids
    last = len(ids) - 1
    seq = list(ids)
    for _ in range(4):
        with tvlab.patch_hidden(tiny, layer, last, theta), torch.no_grad():
            seq.append(int(tiny.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == tiny.tokenizer.decode(seq[len(ids):])
    assert got != beyond.generate(tiny, text, max_new_tokens=4, stop="")  # θ changed something


def test_generate_needs_a_layer_for_a_vector(tiny):
    with pytest.raises(ValueError, match="give the layer"):
        beyond.generate(tiny, "example:big->", torch.zeros(tiny.d_model))
    with pytest.raises(ValueError, match="out of range"):
        beyond.generate(tiny, "example:big->", torch.zeros(tiny.d_model), layer=99)


def test_accuracy_vs_sets_frame(tiny):
    frame = beyond.accuracy_vs_sets(tiny, "antonyms", layer=2, n_sets=(1, 4), n_demos=(1, 3), n_test=6, n_repeats=2)
    assert len(frame) == 2 * 2 * 2
    assert set(frame["n_sets"]) == {1, 4} and set(frame["n_demos"]) == {1, 3}
    assert frame["accuracy"].between(0, 1).all()


def test_accuracy_vs_sets_equals_patching_the_mean_by_hand(tiny):
    """n_sets=1 patches the first set's θ: the same as the paper's per-set task vector."""
    frame = beyond.accuracy_vs_sets(tiny, "to_upper", layer=1, n_sets=(1,), n_demos=(2,), n_test=5, n_repeats=1)
    config = tvlab.ExperimentConfig(n_demos=2)
    task, _ = tvlab.prepare_task(tiny, "to_upper", config)
    test, pool = beyond._split(task, 5, 41)
    fmt = tvlab.experiments.prompt_format(tiny, config)
    s = tvlab.sample_sets(pool, 1, 2, 41, "many-sets-2", 2)[0]
    theta = tvlab.extract_task_vector(tiny, s.demos, s.dummies, 1)
    hits = []
    for q in test:
        with tvlab.patch_hidden(tiny, 1, -1, theta), torch.no_grad():
            ids = tiny.tokenizer(fmt.render([], q.input), return_tensors="pt").input_ids
            hits.append(task.score(tiny.tokenizer.decode([int(tiny.model(input_ids=ids).logits[0, -1].argmax())]), q))
    assert frame["accuracy"].iloc[0] == pytest.approx(sum(hits) / len(hits))


def test_test_queries_never_appear_in_demonstrations(tiny):
    task, _ = tvlab.prepare_task(tiny, "antonyms", tvlab.ExperimentConfig())
    test, pool = beyond._split(task, 10, 41)
    assert not set(p.input for p in test) & set(p.input for p in pool.pairs)
    with pytest.raises(tvlab.TaskError, match="smaller n_test"):
        beyond._split(task, len(task.pairs), 41)


def test_adding_equals_hook_add_mode(tiny):
    """replace_vs_add writes (own state + α v); that is exactly patch_hidden(mode='add')."""
    fmt = tvlab.experiments.prompt_format(tiny, tvlab.ExperimentConfig())
    q = [tvlab.Pair("big", "small"), tvlab.Pair("hot", "cold")]
    v = torch.randn(tiny.d_model)
    own = beyond._zero_shot_states(tiny, q, fmt)[:, 2]
    ids = beyond._patched(tiny, q, fmt, own + 2.0 * v, 2)
    for i, pair in enumerate(q):
        x = tiny.tokenizer(fmt.render([], pair.input), return_tensors="pt").input_ids
        with tvlab.patch_hidden(tiny, 2, -1, 2.0 * v, mode="add"), torch.no_grad():
            assert int(tiny.model(input_ids=x).logits[0, -1].argmax()) == int(ids[i])


def test_replace_vs_add_frame(tiny):
    frame = beyond.replace_vs_add(tiny, "antonyms", layer=2, scales=(1, 4), n_sets=3, n_test=6)
    assert list(frame["method"]) == ["baseline", "replace θ", "add θ", "add θ", "add Δ", "add Δ"]
    assert frame["accuracy"].between(0, 1).all()


def test_multi_token_answers_frame(tiny):
    frame = beyond.multi_token_answers(tiny, "country_capital", layer=2, n_test=3, max_new_tokens=3)
    assert set(frame["method"]) == {"icl", "task_vector", "baseline"} and len(frame) == 9
    counts = tvlab.prompts.answer_token_counts(tiny.tokenizer, tvlab.experiments.prompt_format(tiny, tvlab.ExperimentConfig()),
                                       [tvlab.Pair(q, e) for q, e in zip(frame["query"], frame["expected"])])
    assert min(counts) > 1  # only answers of several tokens are tested
    assert frame["exact"].dtype == bool


def test_portability_frame_and_unknown_template(tiny):
    frame = beyond.portability(tiny, "antonyms", layer=2, targets=("paper", "natural"), n_test=5)
    assert set(zip(frame["target"], frame["method"])) == {("paper", "baseline"), ("paper", "task_vector"), ("paper", "icl"),
                                                          ("natural", "baseline"), ("natural", "task_vector")}
    assert frame.loc[frame["target"] == "natural", "example"].iloc[0].strip().startswith("The opposite of")
    with pytest.raises(tvlab.TaskError, match="NATURAL_TEMPLATES"):
        beyond.portability(tiny, "singular_plural", layer=2, targets=("natural",), n_test=5)


def test_composition_frame(tiny):
    frame = beyond.composition(tiny, layer_a=1, layer_b=2, n_sets=2, n_test=6)
    assert frame["method"].iloc[0].startswith("icl")
    assert any("at 1 + θ to_upper at 2" in m for m in frame["method"])
    assert {"as_composite", "as_next_letter", "as_to_upper"} <= set(frame.columns)
    assert (frame["n"] == 6).all()
    with pytest.raises(ValueError, match="next_letter then to_upper"):
        beyond.composition(tiny, 1, 2, task_a="antonyms")


def test_bank_round_trip_and_apply(tiny, tmp_path):
    bank = beyond.build_bank(tiny, ["to_upper", "antonyms"], n_sets=3, config=tvlab.ExperimentConfig(n_dev=2))
    assert bank.tasks == ["to_upper", "antonyms"] and all(0 <= layer < tiny.n_layers for layer in bank.layers.values())
    assert bank.settings["model"] == tiny.name and bank.settings["n_sets"] == 3
    path = bank.save(tmp_path / "bank.safetensors")
    again = beyond.VectorBank.load(path)
    assert again.layers == bank.layers and again.settings == bank.settings
    assert all(torch.equal(again.vectors[t], bank.vectors[t]) for t in bank.tasks)
    assert not list(tmp_path.glob("*.tmp"))
    fmt = tvlab.experiments.prompt_format(tiny, tvlab.ExperimentConfig())
    want = beyond.generate(tiny, fmt.render([], "big"), bank.vectors["antonyms"], bank.layers["antonyms"], 1).strip()
    assert again.apply(tiny, "antonyms", "big") == want


def test_bank_refuses_other_models_and_unknown_tasks(tiny, tmp_path):
    bank = beyond.VectorBank({"antonyms": torch.zeros(tiny.d_model)}, {"antonyms": 1}, {"model": "another-model"})
    with pytest.raises(ValueError, match="made with 'another-model'"):
        bank.apply(tiny, "antonyms", "big")
    with pytest.raises(KeyError, match="it holds antonyms"):
        bank.apply(tiny, "to_upper", "big")
    with pytest.raises(FileNotFoundError, match="build_bank"):
        beyond.VectorBank.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a tvlab vector bank"):
        beyond.VectorBank.load(tmp_path / "other.safetensors")


def test_bank_explorer_answers_with_and_without_the_vector(tiny):
    from tvlab import widgets

    bank = beyond.build_bank(tiny, ["antonyms", "to_upper"], n_sets=2, config=tvlab.ExperimentConfig(n_dev=2))
    e = widgets.bank_explorer(tiny, bank, task="antonyms", query="big", max_new_tokens=2)
    e.refresh()
    assert e.result["with"] == bank.apply(tiny, "antonyms", "big", max_new_tokens=2)
    assert e.result["without"] == beyond.generate(tiny, bank.prompt(tiny, "big"), max_new_tokens=2).strip()
    e.controls["task"].value = "to_upper"  # a new vector, the same query
    assert e.result["task"] == "to_upper" and e.result["layer"] == bank.layers["to_upper"]
    assert "with θ of to_upper at layer" in e.out.outputs[0]["text"]
    e.controls["query"].value = ""
    assert e.result is None and "type a query" in e.error


def test_add_patch_check(tiny, capsys, solutions):
    from tvlab import exercises

    assert exercises.check_add_patch(solutions.add_patch, tiny)
    assert not exercises.check_add_patch(lambda lm, text, v, layer, scale: "nonsense", tiny)
    assert not exercises.check_add_patch(lambda lm, text, v, layer, scale: v[10**6], tiny)  # reported, not raised
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.count("FAIL") == 2 and "IndexError" in out


def test_split_keeps_what_the_task_says_about_itself():
    """A task that maps an input to two outputs (and its notes) survives the test/pool split."""
    pairs = tvlab.get_task("antonyms").pairs
    twice = tvlab.Pair(pairs[0].input, pairs[2].output)
    own = tvlab.Task("my_opposites", "custom", pairs + (twice,), allow_multiple_outputs=True,
                     description="mine", source="by hand", notes=("written by hand",))
    for seed in range(5):  # some seeds leave both answers of the input in the pool
        test, pool = beyond._split(own, 3, seed)
        assert pool.allow_multiple_outputs and (pool.description, pool.source) == ("mine", "by hand")
        assert pool.notes[0] == "written by hand" and len(pool) == len(own) - 3


def test_portability_keeps_answers_that_are_one_token_in_every_target_format(tiny, monkeypatch):
    """A format with a space before the answer can split it: such pairs must not be scored by first token."""
    from tvlab import prompts

    real = prompts.answer_token_counts
    def splits(answer):  # pretend answers from a to l take two tokens in the 'arrow' format only
        return answer[0] < "m"

    def counts(tokenizer, fmt, pairs):
        got = real(tokenizer, fmt, pairs)
        return [2 if fmt.name == "arrow" and splits(p.output) else c for p, c in zip(pairs, got)]

    monkeypatch.setattr(prompts, "answer_token_counts", counts)
    seen = []
    real_accuracy = beyond._accuracy
    monkeypatch.setattr(beyond, "_accuracy", lambda lm, task, pairs, ids: seen.extend(pairs) or real_accuracy(lm, task, pairs, ids))
    beyond.portability(tiny, "antonyms", 1, targets=("paper", "arrow"), n_test=60)
    assert seen and not any(splits(p.output) for p in seen)
    with pytest.raises(tvlab.TaskError, match="one-token answers in every format"):
        beyond.portability(tiny, "antonyms", 1, targets=("paper",), n_test=10_000)
