"""Bad input to `tvlab reproduce` and to task files: refused before any model is loaded, with messages that say what to do."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import tvlab
from tvlab import models, reproduce
from tvlab import cli
from tvlab.cli import main
from tvlab.models import ModelError
from tvlab.tasks import TaskError

ARGS = ["reproduce", "--model", "tiny-llama", "--n-test", "2", "--n-dev", "2", "--n-baseline", "2", "--no-progress"]
SMALL = tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2)


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", load_model)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _write(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


# --------------------------------------------------------------------------- devices

def test_unavailable_or_unknown_device_is_a_model_error_saying_what_to_do(no_cuda, monkeypatch):
    with pytest.raises(ModelError, match=r"'cuda' is not available: this torch .* without CUDA\. Drop --device.*install a CUDA build"):
        models._resolve_device("cuda")
    with pytest.raises(ModelError, match=r"'mps' is not available.*Drop --device"):
        models._resolve_device("mps")
    with pytest.raises(ModelError, match=r"unknown device 'gpu'; use cpu, cuda"):
        models._resolve_device("gpu")
    assert models._resolve_device("cpu") == torch.device("cpu") and models._resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelError, match=r"'cuda:3' is not available: this machine has 1 CUDA GPU"):
        models._resolve_device("cuda:3")


def test_cli_checks_the_device_before_loading(no_cuda, no_loading, tmp_path, capsys):
    assert main(ARGS + ["--device", "cuda", "--tasks", "antonyms", "--out", str(tmp_path)]) == 2
    assert "install a CUDA build of torch" in capsys.readouterr().err


# --------------------------------------------------------------------------- --out, --seed, --dtype, --tasks

def test_out_that_is_a_file_or_under_a_file_is_refused_at_parse_time(no_loading, tmp_path, capsys):
    blocker = tmp_path / "results.csv"
    blocker.write_text("")
    for out, message in ((blocker, "is a file, not a folder"), (blocker / "sub", "cannot create the folder")):
        with pytest.raises(SystemExit):
            main(ARGS + ["--tasks", "antonyms", "--out", str(out)])
        err = capsys.readouterr().err
        assert "argument --out" in err and message in err


def test_negative_seed_names_the_option_at_parse_time(no_loading, capsys):
    with pytest.raises(SystemExit):
        main(ARGS + ["--seed", "-5"])
    assert "argument --seed: must be >= 0, got -5" in capsys.readouterr().err


def test_dtype_defaults_to_the_environment_variable(monkeypatch, tmp_path, capsys):
    seen = []

    def load_model(name, dtype=None, device=None, **options):
        seen.append(dtype)
        raise ModelError("stop here")

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setenv("TVLAB_DTYPE", "bfloat16")
    assert main(ARGS + ["--tasks", "antonyms", "--out", str(tmp_path)]) == 2
    assert seen == [None]  # load_model reads TVLAB_DTYPE
    assert "(bfloat16)" in capsys.readouterr().err
    assert main(ARGS + ["--tasks", "antonyms", "--dtype", "float16", "--out", str(tmp_path)]) == 2
    assert seen == [None, "float16"]


def test_bad_and_duplicate_tasks_are_reported_together_before_loading(no_loading, tmp_path, capsys):
    assert main(ARGS + ["--tasks", "antonym", "antonyms", str(tmp_path / "missing.json"), "antonyms", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "Did you mean antonyms" in err and "missing.json' does not exist" in err
    assert "'antonyms' listed more than once" in err


def test_tasks_split_on_commas_but_an_existing_path_stays_whole(tmp_path):
    odd = _write(tmp_path / "a,b.json", [{"input": "x", "output": "y"}])
    assert cli._task_specs(["antonyms,fr_en", "next_letter", odd, "en_fr, "]) == ["antonyms", "fr_en", "next_letter", odd, "en_fr"]
    assert cli._task_specs(None) == tvlab.list_tasks(include_extra=False)
    with pytest.raises(TaskError, match="names no task"):
        cli._task_specs([","])


def test_scoring_option_applies_to_task_files_only(tmp_path, monkeypatch):
    path = _write(tmp_path / "capitals.json", [{"input": f"c{i}", "output": f"C{i}"} for i in range(12)])
    seen = {}

    def run_main(lm, tasks, config, out=None, progress=True, scoring="exact"):
        seen.update({t.name: t.scoring for t in tasks})
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "run_main", run_main)
    assert main(ARGS + ["--scoring", "prefix", "--tasks", f"{path},antonyms,country_capital", "--out", str(tmp_path / "o")]) == 130
    assert seen == {"capitals": "prefix", "antonyms": "exact", "country_capital": "prefix"}


# --------------------------------------------------------------------------- task files

def test_task_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("input,output\ncafé,coffee\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin1\.csv' is not UTF-8 text.*[Ss]ave it with the UTF-8 encoding"):
        tvlab.load_task(path)


def test_the_papers_json_object_format_loads_like_the_list_format(tmp_path):
    words = {"hot": "cold", "big": "small", "up": "down"}
    as_object = tvlab.load_task(_write(tmp_path / "a.json", words))
    as_list = tvlab.load_task(_write(tmp_path / "b.json", [{"input": k, "output": v} for k, v in words.items()]))
    assert as_object.pairs == as_list.pairs and len(as_object) == 3
    tvlab_format = tvlab.load_task(_write(tmp_path / "c.json", {"task": "c", "pairs": [{"input": "hot", "output": "cold"}]}))
    assert [(p.input, p.output) for p in tvlab_format.pairs] == [("hot", "cold")]
    listed = tvlab.load_task(_write(tmp_path / "d.json", {"big": ["large", "huge"]}))
    assert listed.pairs == (tvlab.Pair("big", "large", ("huge",)),)
    with pytest.raises(TaskError, match="maps to an output string"):
        tvlab.load_task(_write(tmp_path / "e.json", {"hot": {"nested": 1}}))


def test_user_file_with_several_outputs_for_an_input_accepts_them_all_and_warns(tmp_path):
    rows = [{"input": "big", "output": "small"}, {"input": "hot", "output": "cold"},
            {"input": "big", "output": "little"}, {"input": "hot", "output": "cool"}, {"input": "up", "output": "down"}]
    with pytest.warns(UserWarning, match=r"2 input\(s\) have several outputs \('big', 'hot'\)"):
        task = tvlab.load_task(_write(tmp_path / "t.json", rows))
    assert task.pairs == (tvlab.Pair("big", "small", ("little",)), tvlab.Pair("hot", "cold", ("cool",)), tvlab.Pair("up", "down"))
    assert task.score(" little", task.pairs[0]) and task.score("small", task.pairs[0])
    with pytest.raises(TaskError, match="mapped to two outputs"):  # tasks built in code (and built-in data) stay strict
        tvlab.Task("t", "custom", (tvlab.Pair("a", "b"), tvlab.Pair("a", "c")))


# --------------------------------------------------------------------------- run_main and its report

def test_unusable_tasks_are_all_reported_before_any_forward_pass(tiny, tmp_path, monkeypatch):
    phrases = _write(tmp_path / "phrases.json", [{"input": f"w{i}", "output": "two words"} for i in range(20)])
    few = _write(tmp_path / "few.json", [{"input": "hot", "output": "cold"}, {"input": "big", "output": "small"}])

    def run_task(*args, **kwargs):
        raise AssertionError("a task was run before every task was checked")

    monkeypatch.setattr(reproduce, "run_prepared_tasks", run_task)
    with pytest.raises(TaskError, match=r"2 of the 3 tasks cannot be used, so nothing was run") as e:
        reproduce.run_main(tiny, ["antonyms", phrases, few], SMALL, progress=False)
    assert "phrases: 0/20 pairs kept (their answer is one token); 20 dropped" in str(e.value) and "few: 2/2" in str(e.value)


def test_report_compares_with_the_paper_only_over_the_papers_tasks(tiny, tmp_path):
    mine = _write(tmp_path / "mine.json", [{"input": w, "output": w.upper()} for w in "abcdefghijklmnop"])
    results = reproduce.run_main(tiny, [mine, "antonyms"], SMALL, progress=False)
    assert list(results.summary["pairs"]) == [16, len(tvlab.get_task("antonyms"))]  # counts before the filter
    mixed = reproduce.report(results)
    assert "The paper's means over its 18 tasks" in mixed and "(1 of the paper's tasks" in mixed
    all_tasks_row = next(line for line in mixed.splitlines() if line.startswith("all tasks"))
    assert "=" not in all_tasks_row  # a mean over a user task is not compared with the paper's mean
    summary = results.summary[results.summary["task"] == "mine"]
    only_mine = dataclasses.replace(results, summary=summary, categories=tvlab.experiments.category_means(summary))
    text = reproduce.report(only_mine)
    assert "mine" in text and "The paper's" not in text and "paper (all models)" not in text and "LLaMA" not in text


def test_settings_key_covers_scoring_versions_and_local_model_files(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    local = models.LanguageModel(tiny.model, tiny.tokenizer, str(folder))
    task, config = tvlab.get_task("antonyms"), tvlab.ExperimentConfig()
    key = reproduce.settings_key(local, config, task)
    assert reproduce.settings_key(local, tvlab.ExperimentConfig(batch_size=3), task) == key  # speed only
    assert reproduce.settings_key(local, config, dataclasses.replace(task, scoring="prefix")) != key
    config_json = folder / "config.json"
    config_json.write_text(config_json.read_text().replace("\n}", ',\n  "edited": true\n}'))
    edited = reproduce.settings_key(local, config, task)
    assert edited != key
    monkeypatch.setattr("transformers.__version__", "0.0.0")
    assert reproduce.settings_key(local, config, task) != edited


def test_settings_key_of_an_offline_model_follows_its_manifest_checksums(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    folder = tmp_path / "models" / models.OFFLINE_MODELS["gemma-3-270m"].folder
    folder.mkdir(parents=True)
    manifest = folder / "tvlab-manifest.json"
    offline = models.LanguageModel(tiny.model, tiny.tokenizer, "gemma-3-270m")
    task, config = tvlab.get_task("antonyms"), tvlab.ExperimentConfig()
    manifest.write_text(json.dumps({"format": 1, "files": {"model.safetensors": [10, "aaa"]}}))
    key = reproduce.settings_key(offline, config, task)
    manifest.write_text(json.dumps({"format": 1, "files": {"model.safetensors": [10, "aaa"]}, "mtimes": {"model.safetensors": 5}}))
    assert reproduce.settings_key(offline, config, task) == key  # a touched file, same contents
    manifest.write_text(json.dumps({"format": 1, "files": {"model.safetensors": [10, "bbb"]}}))
    assert reproduce.settings_key(offline, config, task) != key  # converted again, different weights


def test_cli_shows_a_task_file_warning_as_one_plain_line(tmp_path, monkeypatch, capsys):
    def load_model(*args, **kwargs):
        raise ModelError("stop here")

    monkeypatch.setattr(models, "load_model", load_model)
    path = _write(tmp_path / "t.json", [{"input": "big", "output": "small"}, {"input": "big", "output": "little"}])
    assert main(ARGS + ["--tasks", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tvlab: warning: " in err and "1 input(s) have several outputs ('big')" in err and "UserWarning" not in err


# --------------------------------------------------------------------------- data from other projects, values from NumPy

def test_repeated_rows_in_a_task_file_are_kept_once_and_named(tmp_path):
    rows = ["hot,cold", "up,down", "big,small", "left,right", "hot,cold", "up,down", "hot,chilly"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning) as caught:
        task = tvlab.load_task(tmp_path / "t.csv")
    said = " ".join(str(w.message) for w in caught)
    assert "1 row(s) repeat an earlier row" in said and "1 input(s) have several outputs ('hot')" in said
    assert task.pairs == (tvlab.Pair("hot", "cold", ("chilly",)), tvlab.Pair("up", "down"), tvlab.Pair("big", "small"),
                          tvlab.Pair("left", "right"))
    with pytest.raises(TaskError, match="listed twice"):  # in code, a repeated pair is an error
        tvlab.Task("t", "custom", (tvlab.Pair("a", "b"), tvlab.Pair("a", "b")))


@pytest.mark.parametrize("row, pair", [
    ({"input": "a", "output": "b", "accept": None}, tvlab.Pair("a", "b")),       # pandas writes NaN as null
    ({"input": "a", "output": ["b", "c"]}, tvlab.Pair("a", "b", ("c",))),       # a list of outputs, as in {"a": ["b", "c"]}
    ({"input": "a", "output": "b", "accept": "c"}, tvlab.Pair("a", "b", ("c",))),
    ({"input": 7, "output": 8}, tvlab.Pair("7", "8")),
])
def test_task_file_rows_from_other_tools_load_as_meant(tmp_path, row, pair):
    assert tvlab.load_task(_write(tmp_path / "t.json", [row])).pairs == (pair,)


@pytest.mark.parametrize("row, message", [
    ({"input": None, "output": "b"}, "has the input None; it must be a string"),
    ({"input": "a", "output": "b", "accept": 5}, "has accept 5; it must be a list"),
])
def test_task_file_rows_that_cannot_be_pairs_name_the_row(tmp_path, row, message):
    with pytest.raises(TaskError, match=message):
        tvlab.load_task(_write(tmp_path / "t.json", [row]))


def test_pairs_and_tasks_built_in_code_take_what_users_write():
    assert tvlab.Pair("big", "small", accept="little").answers == ("small", "little")  # not its letters
    task = tvlab.Task("t", "custom", [("a", "b"), ("c", "d", ["e"])])
    assert task.pairs == (tvlab.Pair("a", "b"), tvlab.Pair("c", "d", ("e",)))
    with pytest.raises(TaskError, match="scoring must be 'exact' or 'prefix', got 'Exact'"):
        tvlab.Task("t", "custom", task.pairs, scoring="Exact")
    with pytest.raises(TaskError, match="expected a Pair"):
        tvlab.Task("t", "custom", ["a->b"])


def test_numpy_integers_count_as_whole_numbers_and_other_values_say_why(tiny):
    import numpy as np

    assert tiny.check_layer(np.int64(2)) == 2 and type(tiny.check_layer(np.int64(2))) is int
    for bad in (2.0, True, "2"):
        with pytest.raises(ValueError, match="layer must be a whole number, a block index from 0 to 3"):
            tiny.check_layer(bad)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        tiny.check_layer(9)
    config = tvlab.ExperimentConfig(n_demos=np.int64(4), n_test=np.int32(3))
    assert (config.n_demos, config.n_test) == (4, 3) and json.dumps(config.as_dict())
    with pytest.raises(ValueError, match="n_test must be a whole number >= 1, got True"):
        tvlab.ExperimentConfig(n_test=True)
    assert len(tvlab.sample_sets(tvlab.get_task("antonyms"), np.int64(2), 3, np.int64(5))) == 2
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got None"):
        tvlab.sample_sets(tvlab.get_task("antonyms"), 2, 3, seed=None)
    task = tvlab.get_task("antonyms")
    theta = tvlab.extract_task_vector(tiny, task.pairs[:3], task.pairs[3:5], layer=np.int64(1))
    assert torch.equal(theta, tvlab.extract_task_vector(tiny, task.pairs[:3], task.pairs[3:5], layer=1))


def test_one_name_where_a_list_is_expected_is_one_task_and_a_list_where_one_is_expected_says_so(tiny):
    small = tvlab.ExperimentConfig(n_dev=2)
    assert set(tvlab.layer_sweep(tiny, "antonyms", small)["task"]) == {"antonyms"}
    frame = tvlab.explore.icl_vs_demos(tiny, "antonyms", 2, n_sets=2)
    assert list(frame["task"]) == ["antonyms"] and list(frame["n_demos"]) == [2]
    with pytest.raises(TaskError, match="expected one task, got 2"):
        tvlab.run_task(tiny, ["antonyms", "fr_en"], SMALL)


def test_bad_arguments_to_the_lower_level_api_say_what_to_pass(tiny):
    task = tvlab.get_task("antonyms")
    with pytest.raises(ValueError, match="at least one dummy query"):
        tvlab.extract_task_vector(tiny, task.pairs[:3], [], layer=1)
    with pytest.raises(ValueError, match="demos must be Pair"):
        tvlab.extract_task_vector(tiny, [("hot", "cold")], task.pairs[3:5], layer=1)
    with pytest.raises(ValueError, match="not a Task"):
        tvlab.extract_task_vector(tiny, task, task.pairs[3:5], layer=1)
    one = tvlab.extract_task_vector(tiny, task.pairs[:3], task.pairs[3], layer=1)  # a single dummy Pair
    assert one.shape == (tiny.d_model,)
    with pytest.raises(ValueError, match="token ids, not text"):
        tvlab.engine.predict_last(tiny, ["example:big->"])
    ids = tiny.tokenizer("example:big->").input_ids
    theta = tvlab.engine.predict_last(tiny, [ids], read=True).hidden[0]
    with tvlab.patch_hidden(tiny, 2, -1, theta[2].numpy()):  # a NumPy vector is a vector
        assert tvlab.engine.predict_last_plain(tiny, [ids]).top_ids.shape == (1,)
    for value, message in ((None, "must be a tensor of size 64"), (theta, r"4 vectors but 1 row\(s\) are patched"),
                           (theta[:, :8], r"shape \[4, 8\] but must be \[64\]")):
        with pytest.raises(ValueError, match=message):
            with tvlab.patch_hidden(tiny, 2, -1, value):
                tvlab.engine.predict_last_plain(tiny, [ids])
    with pytest.raises(ValueError, match="position must be a whole number"):
        with tvlab.patch_hidden(tiny, 2, "last", theta[2]):
            pass
    with tvlab.read_hidden(tiny, layers=2) as rec:  # one layer
        tvlab.engine.predict_last_plain(tiny, [ids])
    assert rec.hidden.shape == (1, 1, tiny.d_model)


def test_a_small_task_of_ones_own_gives_a_prompt_and_says_what_to_add(tiny, tmp_path):
    rows = ["hot,cold", "up,down", "big,small", "left,right", "fast,slow", "old,new", "wet,dry", "hard,soft"]
    (tmp_path / "small8.csv").write_text("\n".join(rows) + "\n")
    task = tvlab.load_task(tmp_path / "small8.csv")
    prompt = tvlab.explore.icl_prompt(tiny, task, 3, "cat")
    assert prompt.count("->") == 4 and prompt.endswith("cat->")
    with pytest.raises(TaskError, match="8 usable pairs remain but a set needs 10. Add pairs to the task, or use fewer"):
        tvlab.run_task(tiny, task, tvlab.ExperimentConfig(n_demos=7, n_test=2, n_dev=2, n_baseline=2))


@pytest.mark.parametrize("name, text", [
    ("a.tsv", "hot\tcold\nbig\tsmall\n"),
    ("b.jsonl", '{"input": "hot", "output": "cold"}\n\n{"input": "big", "output": "small"}\n'),
    ("c.csv", "id,Source,Target,notes\n1,hot,cold,x\n2,big,small,y\n"),   # another project's columns, by header
    ("d.csv", "question,answer\nhot,cold\nbig,small\n"),
    ("e.tsv", "prompt\tcompletion\nhot\tcold\nbig\tsmall\n"),
    ("f.csv", "word,Output\nhot,cold\nbig,small\n"),                    # two columns: one known name is enough
    ("g.csv", "antonym,input\ncold,hot\nsmall,big\n"),
])
def test_task_tables_and_json_lines_from_other_projects_load_as_is(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    for task in (tvlab.load_task(tmp_path / name), tvlab.get_task(str(tmp_path / name))):
        assert [(p.input, p.output) for p in task.pairs] == [("hot", "cold"), ("big", "small")]


def test_what_is_not_a_task_file_says_what_tvlab_reads(tmp_path):
    (tmp_path / "t.txt").write_text("hot cold\n")
    (tmp_path / "ok.csv").write_text("hot,cold\n")
    (tmp_path / "bad.jsonl").write_text('{"input": "hot", "output": "cold"}\nnot json\n')
    (tmp_path / "short.csv").write_text("id,input,output\n1,hot,cold\n2,big\n")
    (tmp_path / "half.csv").write_text("id,source,antonym\n1,hot,cold\n")
    for path, message in ((tmp_path / "t.txt", r"not a task file tvlab reads: it reads .json .*\.jsonl .*\.csv and \.tsv"),
                          (tmp_path, r"is a folder; name the task files themselves. It holds 4 task file\(s\): .*bad.jsonl .*half.csv .*ok.csv .*short.csv\."),
                          (tmp_path / "bad.jsonl", "line 2 is not valid JSON"),
                          (tmp_path / "short.csv", "row 3 has 2 columns; the header names the input in column 2"),
                          (tmp_path / "half.csv", r"names the input column \('source'\) but no output column: name the "
                                                  "output column one of output, target"),
                          (tmp_path / "gone.txt", "does not exist")):
        with pytest.raises(TaskError, match=message):
            tvlab.get_task(str(path))
    with pytest.raises(TaskError, match="unknown task 'antonym'. Did you mean antonyms"):
        tvlab.get_task("antonym")  # a name, not a path
    # One-letter names (x, y) alone do not make a header: w,x is the first pair of a next-letter table.
    (tmp_path / "letters.csv").write_text("w,x\nx,y\n")
    assert [(p.input, p.output) for p in tvlab.load_task(tmp_path / "letters.csv").pairs] == [("w", "x"), ("x", "y")]


def test_task_vector_banks_check_layers_and_what_each_summary_needs(tiny, tmp_path):
    bank = tvlab.geometry.collect_task_vectors(tiny, ["antonyms", "next_letter"], n_per_task=2)
    path = bank.save(tmp_path / "new" / "folder" / "bank.safetensors")  # missing folders are made
    assert tvlab.geometry.TaskVectors.load(path).vectors.equal(bank.vectors)
    with pytest.raises(FileNotFoundError, match="no task vectors at"):
        tvlab.geometry.TaskVectors.load(tmp_path / "missing.safetensors")
    assert bank.mean("antonyms", np.int64(1)).shape == (tiny.d_model,)
    for layer, message in ((99, "layer 99 is out of range: these vectors have layers 0 to 3"),
                           (-1, "layer -1 is out of range"), (1.5, "layer 1.5 must be a whole number")):
        with pytest.raises(ValueError, match=message):
            bank.mean("antonyms", layer)
        with pytest.raises(ValueError, match=message):
            bank.at(layer)
    one = tvlab.geometry.TaskVectors(bank.vectors[:2], bank.labels.iloc[:2], bank.settings)
    for summary in (tvlab.geometry.separability, tvlab.geometry.distance_summary):
        with pytest.raises(ValueError, match=r"compares tasks, and these vectors hold 1 \(antonyms\)"):
            summary(one, 1)
    single = tvlab.geometry.TaskVectors(bank.vectors[1:], bank.labels.iloc[1:], bank.settings)
    with pytest.raises(ValueError, match="needs two vectors of each task or more, and antonyms has one"):
        tvlab.geometry.separability(single, 1)
    assert tvlab.geometry.separability(bank, 1)["chance"] == 0.5


def test_next_token_probs_lists_at_most_the_vocabulary(tiny):
    table = tvlab.explore.next_token_probs(tiny, "example:big->", k=10**6)
    assert len(table) == len(tiny.tokenizer) and table["rank"].iloc[-1] == len(table)
    for k in (0, 2.5, "3"):
        with pytest.raises(ValueError, match="k must be a whole number >= 1"):
            tvlab.explore.next_token_probs(tiny, "example:big->", k=k)


# --------------------------------------------------------------------------- the analysis helpers and widgets

@pytest.fixture
def no_forward(tiny, monkeypatch):
    """Any forward pass of the tiny model fails the test: a bad count must be refused before any work."""
    def forward(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(tiny.model, "forward", forward)
    return tiny


@pytest.mark.parametrize("call, name", [
    (lambda lm: tvlab.beyond.multi_token_answers(lm, "country_capital", 1, n_test=-1), "n_test"),  # [:-1] ran 32
    (lambda lm: tvlab.beyond.composition(lm, 1, 2, n_test=-3), "n_test"),
    (lambda lm: tvlab.beyond.composition(lm, 1, 2, n_test=30), "at most 25"),
    (lambda lm: tvlab.beyond.accuracy_vs_sets(lm, "antonyms", 1, n_sets=(0, 1)), "n_sets"),  # a mean of no vectors
    (lambda lm: tvlab.beyond.accuracy_vs_sets(lm, "antonyms", 1, n_sets=[]), "n_sets is empty"),
    (lambda lm: tvlab.beyond.accuracy_vs_sets(lm, "antonyms", 1, n_repeats=0), "n_repeats"),
    (lambda lm: tvlab.beyond.replace_vs_add(lm, "antonyms", 1, n_sets=0), "n_sets"),
    (lambda lm: tvlab.beyond.replace_vs_add(lm, "antonyms", 1, scales=["big"]), "scales"),
    (lambda lm: tvlab.beyond.generate(lm, "x", max_new_tokens=-1), "max_new_tokens"),
    (lambda lm: tvlab.beyond.generate(lm, ""), "text"),
    (lambda lm: tvlab.beyond.build_bank(lm, ["antonyms"], n_sets=0), "n_sets"),
    (lambda lm: tvlab.beyond.portability(lm, "country_capital", 1, n_test=0), "n_test"),
    (lambda lm: tvlab.geometry.collect_task_vectors(lm, ["antonyms"], n_per_task=0), "n_per_task"),
    (lambda lm: tvlab.conflicts.conflicting_tasks(lm, "next_letter", "to_upper", n_sets=0), "n_sets"),
    (lambda lm: tvlab.conflicts.paper_pairs(lm, n_sets=0), "n_sets"),
    (lambda lm: tvlab.explore.icl_vs_demos(lm, ["antonyms"], [1], n_sets=0), "n_sets"),
    (lambda lm: tvlab.explore.icl_vs_demos(lm, ["antonyms"], []), "n_demos is empty"),
    (lambda lm: tvlab.explore.format_comparison(lm, ["antonyms"], formats=[]), "formats is empty"),
    (lambda lm: tvlab.explore.query_swap(lm, "next_letter", 1, n_queries=0), "n_queries"),
    (lambda lm: tvlab.explore.icl_prompt(lm, "antonyms", 2.5, "big"), "n_demos"),
    (lambda lm: tvlab.explore.three_predictions(lm, "antonyms", "", layer=1), "query"),
    (lambda lm: tvlab.explore.next_token_probs(lm, ["a b"]), "text"),
])
def test_a_bad_count_or_text_is_named_before_any_forward_pass(no_forward, call, name):
    with pytest.raises(ValueError, match=name):
        call(no_forward)


@pytest.mark.parametrize("call", [
    lambda lm: tvlab.layer_sweep(lm, [], SMALL),
    lambda lm: reproduce.run_main(lm, [], SMALL, progress=False),
    lambda lm: tvlab.geometry.collect_task_vectors(lm, []),
    lambda lm: tvlab.beyond.build_bank(lm, []),
    lambda lm: tvlab.explore.icl_vs_demos(lm, [], [1]),
])
def test_no_tasks_is_an_error_not_an_empty_result(no_forward, call):
    with pytest.raises(TaskError, match="no tasks given"):
        call(no_forward)


def test_a_task_named_twice_is_refused_where_vectors_would_count_twice(no_forward):
    with pytest.raises(TaskError, match="'antonyms' named more than once"):
        tvlab.geometry.collect_task_vectors(no_forward, ["antonyms", "antonyms"], n_per_task=2)
    with pytest.raises(TaskError, match="named more than once"):
        tvlab.beyond.build_bank(no_forward, ["antonyms", tvlab.get_task("antonyms")])


def test_one_item_where_a_list_is_expected_is_a_list_of_it():
    from tvlab._checks import as_list, counts

    assert counts(4, "n_sets") == [4] and counts(np.int64(2), "n") == [2] and counts((1, 2), "n") == [1, 2]
    assert as_list("qa", "targets") == ["qa"] and as_list(["qa", "paper"], "targets") == ["qa", "paper"]
    vectors = tvlab.geometry.TaskVectors(torch.randn(8, 3, 4), __import__("pandas").DataFrame(
        {"task": ["a"] * 4 + ["b"] * 4, "category": "custom", "set": list(range(4)) * 2}), {})
    assert list(tvlab.geometry.by_layer(vectors, layers=2)["layer"]) == [2]


def test_format_comparison_and_a_bank_explorer_take_tasks_from_files(tiny, tmp_path):
    rows = [{"input": f"w{i}", "output": f"w{i + 1}"} for i in range(12)]  # one-token words of the tiny vocabulary
    path = _write(tmp_path / "shift.json", rows)
    frame = tvlab.explore.format_comparison(tiny, [path], formats=["paper"], n_sets=2, n_demos=2)
    assert list(frame["task"]) == ["shift"] and frame["one_token_pairs"].iloc[0].endswith("/12")
    bank = tvlab.beyond.VectorBank({"shift": torch.zeros(tiny.d_model)}, {"shift": 1}, {"model": tiny.name})
    explorer = tvlab.widgets.bank_explorer(tiny, bank)  # before: get_task("shift"), an unknown task
    assert explorer.controls["query"].value == ""


def test_a_prompt_format_of_ones_own_goes_into_an_experiment_config(tiny):
    mine = tvlab.PromptFormat("mine", "Word: {x} Opposite: {y}")
    config = tvlab.ExperimentConfig(format=mine, n_test=2, n_dev=2, n_baseline=2)
    assert json.loads(json.dumps(config.as_dict()))["format"]["template"] == "Word: {x} Opposite: {y}"
    frame = tvlab.explore.icl_vs_demos(tiny, ["antonyms"], [1], n_sets=2, fmt=mine)
    assert len(frame) == 1
    with pytest.raises(ValueError, match="unknown prompt format"):
        tvlab.ExperimentConfig(format=["paper"])
    with pytest.raises(ValueError, match="fast_path must be True or False"):
        tvlab.ExperimentConfig(fast_path="no")
    assert tvlab.ExperimentConfig(fast_path=np.bool_(False)).fast_path is False


def test_the_wrong_object_in_the_main_api_says_what_to_pass(tiny):
    with pytest.raises(TypeError, match=r"load_model\('tiny-llama'\)"):
        tvlab.run_task("tiny-llama", "antonyms", SMALL)
    with pytest.raises(TypeError, match=r"ExperimentConfig\(\*\*your_dict\)"):
        tvlab.run_task(tiny, "antonyms", {"n_test": 2})
    run = tvlab.run_task(tiny, "antonyms", SMALL)
    with pytest.raises(TypeError, match="pass run.predictions"):
        tvlab.summarize(run)
    with pytest.raises(ValueError, match="no column.*'split'.*pass run.predictions"):
        tvlab.layer_accuracy(run.summary)
    with pytest.raises(ValueError, match="pass run.summary"):
        tvlab.category_means(run.predictions)
    assert len(tvlab.category_means(run.summary)) == 2  # its category and all tasks


def test_widgets_refuse_a_start_outside_their_range_and_name_the_choices(tiny):
    w = tvlab.widgets
    with pytest.raises(ValueError, match="layer must be a whole number from 0 to 3, got 7"):
        w.patching_explorer(tiny, layer=7)
    assert w.patching_explorer(tiny).controls["layer"].value == 3  # the default 10 on a 4-layer model: its last
    with pytest.raises(ValueError, match="n_demos must be a whole number from 0 to 10"):
        w.icl_explorer(tiny, n_demos=50)
    with pytest.raises(ValueError, match="task_a 'antonym' is not one of the choices: next_letter"):
        w.conflict_explorer(tiny, task_a="antonym")
    with pytest.raises(ValueError, match="models must be a non-empty dict"):
        w.model_explorer([tiny])
    vectors = tvlab.geometry.TaskVectors(torch.randn(12, 4, tiny.d_model), __import__("pandas").DataFrame(
        {"task": ["antonyms"] * 6 + ["fr_en"] * 6, "category": "custom", "set": list(range(6)) * 2}), {})
    with pytest.raises(ValueError, match="task 'antonym' is not one of the choices: antonyms, fr_en"):
        w.top_tokens_explorer(tiny, vectors, task="antonym")
    with pytest.raises(ValueError, match="bank must be a tvlab.beyond.VectorBank"):
        w.bank_explorer(tiny, vectors)


def test_saving_vectors_into_a_folder_or_loading_a_foreign_file_says_so(tmp_path):
    bank = tvlab.beyond.VectorBank({"a": torch.zeros(4)}, {"a": 1})
    with pytest.raises(ValueError, match="is a folder: give the file"):
        bank.save(tmp_path)
    vectors = tvlab.geometry.TaskVectors(torch.zeros(2, 3, 4), __import__("pandas").DataFrame(
        {"task": ["a", "b"], "category": "custom", "set": 0}), {})
    with pytest.raises(ValueError, match="is a folder"):
        vectors.save(tmp_path)
    (tmp_path / "t.csv").write_text("hot,cold\n")
    with pytest.raises(ValueError, match="not a safetensors file of task vectors"):
        tvlab.geometry.TaskVectors.load(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="not a safetensors file of a tvlab vector bank"):
        tvlab.beyond.VectorBank.load(tmp_path / "t.csv")
    bank_file = bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="holds no tvlab task vectors.*VectorBank.load"):
        tvlab.geometry.TaskVectors.load(bank_file)


def test_token_ids_and_vectors_of_the_wrong_kind_are_named(tiny):
    with pytest.raises(ValueError, match="token ids must be from 0 to 11049"):
        tvlab.engine.predict_last(tiny, [[10**7]])
    with pytest.raises(ValueError, match="got -5"):
        tvlab.engine.predict_last(tiny, [[-5, 3]])
    with pytest.raises(ValueError, match=r"wrap one prompt as \[ids\]"):
        tvlab.engine.predict_last(tiny, [1, 2, 3])
    from tvlab import inspect_vectors

    every_layer = torch.randn(tiny.n_layers, tiny.d_model)
    with pytest.raises(ValueError, match="take one layer's row"):
        inspect_vectors.top_tokens(tiny, every_layer)
    assert len(inspect_vectors.top_tokens(tiny, every_layer[1].numpy(), k=3)) == 3  # a NumPy vector is fine
    assert len(inspect_vectors.top_tokens(tiny, every_layer[1], k=10**7)) == 11050  # k beyond the vocabulary: all
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        inspect_vectors.top_tokens(tiny, every_layer[1], k=-1)
    vectors = tvlab.geometry.TaskVectors(torch.randn(4, tiny.n_layers, tiny.d_model), __import__("pandas").DataFrame(
        {"task": ["a", "a", "b", "b"], "category": "custom", "set": [0, 1, 0, 1]}), {})
    with pytest.raises(ValueError, match="layer 9 is out of range: these vectors have layers 0 to 3"):
        inspect_vectors.top_tokens_by_task(tiny, vectors, 9)


def test_hooks_check_positions_layers_and_rows_before_the_forward_pass(tiny):
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match="position must be a whole number"):
        with tvlab.read_hidden(tiny, position=1.5):
            raise AssertionError("entered")
    with pytest.raises(ValueError, match="layers is empty"):
        with tvlab.read_hidden(tiny, layers=[]):
            raise AssertionError("entered")
    with pytest.raises(ValueError, match="rows must be batch row numbers"):
        with tvlab.patch_hidden(tiny, 1, -1, torch.zeros(tiny.d_model), rows=[0.5]):
            raise AssertionError("entered")
    with pytest.raises(IndexError, match=r"patch rows \[5\] are not all in this batch of 2"):
        with tvlab.patch_hidden(tiny, 1, -1, torch.zeros(tiny.d_model), rows=[5]):
            tiny.model(ids)
    with tvlab.read_hidden(tiny, layers=[2]) as plain:
        tiny.model(ids)
    for rows in (1, [1], torch.tensor([1])):  # one row alone, a list or a tensor of rows: the same patch
        with tvlab.patch_hidden(tiny, 1, -1, torch.zeros(tiny.d_model), rows=rows), tvlab.read_hidden(tiny, layers=[1, 2]) as rec:
            tiny.model(ids)
        assert rec.hidden[1, 0].abs().sum() == 0 and torch.equal(rec.hidden[0, 1], plain.hidden[0, 0])


def test_a_float_token_id_is_refused_not_truncated_to_another_word(tiny):
    with pytest.raises(ValueError, match="token ids must be whole numbers, got 4.5"):
        tvlab.engine.predict_last(tiny, [[3, 4.5, 5]])
    with pytest.raises(ValueError, match="token ids must be whole numbers"):
        tvlab.engine.predict_last_plain(tiny, [[3.0, 4.0]])
    with pytest.raises(ValueError, match="a tensor of torch.float32"):
        tvlab.engine.predict_last(tiny, [torch.tensor([3.0, 4.0])])
    same = tvlab.engine.predict_last(tiny, [np.array([3, 4, 5]), torch.tensor([3, 4, 5]), [3, 4, 5]]).top_ids
    assert len(set(same.tolist())) == 1  # NumPy and tensor ids are ids


def test_a_template_mark_inside_an_input_stays_as_written_and_is_warned_of(tiny):
    from tvlab.prompts import FORMATS

    assert FORMATS["paper"].demo("a{y}b", "c") == "example:a{y}b->c"
    assert FORMATS["paper"].query("a{x}") == "example:a{x}->"
    task = tvlab.Task("arrows", "custom", [(f"w{i}->x", "y") for i in range(12)])
    with pytest.warns(UserWarning, match=r"12 input\(s\) or answer\(s\) contain '->', which the prompt format 'example:\{x\}->\{y\}'.*format='qa'"):
        tvlab.prepare_task(tiny, task, SMALL)
    with pytest.warns(UserWarning, match="format='paper'"):
        tvlab.prepare_task(tiny, tvlab.Task("answers", "custom", [(f"A: w{i}", "y") for i in range(12)]),
                           dataclasses.replace(SMALL, format="qa"))


def test_a_json_file_in_tvlabs_own_format_keeps_its_category_and_scoring(tmp_path):
    spec = json.loads((tvlab.tasks.data_dir() / "country_capital.json").read_text())
    (tmp_path / "capitals.json").write_text(json.dumps(spec))
    task = tvlab.load_task(tmp_path / "capitals.json")
    builtin = tvlab.get_task("country_capital")
    assert (task.name, task.category, task.scoring) == ("capitals", "knowledge", "prefix")
    assert task.pairs == builtin.pairs and task.description == builtin.description
    assert tvlab.load_task(tmp_path / "capitals.json", scoring="exact").scoring == "exact"  # asked for: kept
    (tmp_path / "odd.json").write_text(json.dumps({**spec, "category": "geography"}))
    assert tvlab.load_task(tmp_path / "odd.json").category == "custom"  # a category tvlab does not know


def test_a_task_file_named_like_an_earlier_task_does_not_replace_its_results(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(ARGS + ["--tasks", "antonyms", "--out", str(out)]) == 0
    own = tmp_path / "mine" / "antonyms.json"
    own.parent.mkdir()
    _write(own, [{"input": f"w{i}", "output": "x"} for i in range(20)])
    before = (out / "main_results.csv").read_text()
    capsys.readouterr()
    assert main(ARGS + ["--tasks", str(own), "--out", str(out)]) == 2
    assert "other pairs or scoring under the name antonyms" in capsys.readouterr().err
    assert (out / "main_results.csv").read_text() == before
    assert reproduce.replaces_other_run(out, [tvlab.get_task("antonyms")], SMALL) is None  # the same task again


def test_a_layer_where_every_task_vector_is_the_same_is_refused_before_t_sne(tmp_path):
    import pandas as pd

    vectors = torch.ones(10, 2, 8)  # layer 0: all equal (scikit-learn's t-SNE of these crashed the kernel)
    vectors[:, 1] = torch.randn(10, 8)
    bank = tvlab.geometry.TaskVectors(vectors, pd.DataFrame({"task": ["a"] * 5 + ["b"] * 5, "category": "custom",
                                                             "set": range(10)}), {})
    for method in ("tsne", "pca"):
        with pytest.raises(ValueError, match="every vector at layer 0 is the same"):
            tvlab.geometry.embed_2d(bank, 0, method)
    assert np.isfinite(tvlab.geometry.embed_2d(bank, 1, "pca")[["x", "y"]].to_numpy()).all()
