"""Bad input to `tvlab reproduce` and to task files: refused before any model is loaded, with messages that say what to do."""

import dataclasses
import json

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
