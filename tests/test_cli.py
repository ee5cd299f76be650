import json

import pandas as pd
import pytest

from tvlab.cli import main

ARGS = ["reproduce", "--model", "tiny-llama", "--n-test", "4", "--n-dev", "3", "--n-baseline", "4", "--no-progress"]


def test_reproduce_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(ARGS + ["--tasks", "antonyms", "next_letter", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "antonyms" in printed and "all tasks" in printed and "LLaMA 7B" in printed
    assert "prompts per forward pass (auto: at most 6144 tokens per pass on a CPU)" in printed  # its argmax in slices
    assert "forward passes; 1 task per engine call." in printed
    for name in ("main_results.csv", "by_layer.csv", "predictions.csv", "results.json", "main_results.png", "accuracy_by_layer.png"):
        assert (out / name).stat().st_size > 0
    first = pd.read_csv(out / "main_results.csv")
    assert list(first["task"]) == ["antonyms", "next_letter"]
    assert json.loads((out / "results.json").read_text())["config"]["n_test"] == 4
    # Same settings again (the tasks comma-separated this time): both come from the saved partial results, same numbers.
    assert main(ARGS + ["--tasks", "antonyms,next_letter", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 tasks resumed" in printed and "per engine call" not in printed  # no engine call ran
    pd.testing.assert_frame_equal(pd.read_csv(out / "main_results.csv"), first)
    # Fewer tasks or other settings into the same folder would replace these results: refused before any work.
    assert main(ARGS + ["--tasks", "antonyms", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of its 2 tasks not in this run (next_letter)" in err and "--overwrite" in err
    assert main(ARGS[:-1] + ["--seed", "7", "--no-progress", "--tasks", "antonyms", "next_letter", "--out", str(out)]) == 2
    assert "seed 41, not 7" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(out / "main_results.csv"), first)
    # More tasks extend the run; --overwrite replaces it; different settings never reuse the saved predictions.
    assert main(ARGS + ["--tasks", "antonyms,next_letter,country_capital", "--out", str(out)]) == 0
    assert "2 tasks resumed" in capsys.readouterr().out
    assert main(ARGS[:-1] + ["--seed", "7", "--no-progress", "--tasks", "antonyms", "--out", str(out), "--overwrite"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert list(pd.read_csv(out / "main_results.csv")["task"]) == ["antonyms"]


def test_out_holding_other_files_or_another_model(tmp_path, capsys):
    from tvlab import ExperimentConfig, reproduce

    config = ExperimentConfig(n_test=4, n_dev=3, n_baseline=4)
    (tmp_path / "results.json").write_text('{"my": "own file"}')
    assert main(ARGS + ["--tasks", "antonyms", "--out", str(tmp_path)]) == 2
    assert "no results.json of a tvlab run" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == '{"my": "own file"}'
    (tmp_path / "results.json").write_text(json.dumps({"model": "gpt2", "config": config.as_dict(), "tasks": [{"task": "antonyms"}]}))
    assert reproduce.replaces_other_run(tmp_path, ["antonyms"], config) is None          # model not known yet
    assert reproduce.replaces_other_run(tmp_path, ["antonyms"], config, "gpt2") is None
    assert reproduce.replaces_other_run(tmp_path, ["antonyms"], ExperimentConfig(n_test=4, n_dev=3, n_baseline=4, batch_size=8)) is None
    assert main(ARGS + ["--tasks", "antonyms", "--out", str(tmp_path)]) == 2              # checked once the model is loaded
    assert "model gpt2, not tiny-llama" in capsys.readouterr().err
    assert reproduce.replaces_other_run(tmp_path / "empty", ["antonyms"], config) is None


def test_user_task_file(tmp_path, capsys):
    path = tmp_path / "shout.json"
    path.write_text(json.dumps([{"input": w, "output": w.upper()} for w in "abcdefghijklmnop"]))
    assert main(ARGS + ["--tasks", str(path), "--out", str(tmp_path / "o")]) == 0
    assert "shout" in capsys.readouterr().out


def test_unknown_task_is_a_clear_error(capsys, tmp_path):
    assert main(ARGS + ["--tasks", "antonym", "--out", str(tmp_path)]) == 2
    assert "Did you mean antonyms" in capsys.readouterr().err


def test_bad_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--n-test", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_remote_needs_the_nnsight_backend(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--model", "meta-llama/Llama-3.1-70B", "--remote"])
    assert "add --backend nnsight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--model", "meta-llama/Llama-3.1-70B", "--backend", "nnsight", "--remote", "--dtype", "float32"])
    assert "leave out --dtype and --device" in capsys.readouterr().err
