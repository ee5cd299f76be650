"""Regenerate docs/bad_inputs.md: every bad input tvlab guards against, and what the user sees.

    python docs/bad_inputs.py          # rewrites docs/bad_inputs.md from the real messages

tests/test_docs.py checks that the file matches what the code says today.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


class Printed(Exception):
    """What the command line printed on stderr (an argparse error, or tvlab's own ``tvlab: error:`` line)."""


def _command_line(*argv: str) -> None:
    from tvlab.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        main(["reproduce", "--model", "tiny-llama", *argv])
    lines = err.getvalue().strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "error:" in line)
    raise Printed(" ".join(line.strip() for line in lines[start:]))


def _cases(tmp: Path):
    import pandas as pd
    import torch

    import tvlab
    import tvlab.widgets
    from tvlab import models

    lm = tvlab.tiny_model("llama")

    def task_file(name: str, text: str) -> str:
        path = tmp / name
        path.write_text(text)
        return str(path)

    phrases = [{"input": f"w{i}", "output": "two words"} for i in range(20)] + [{"input": "x", "output": "one"}]
    small = tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2)
    blocker = tmp / "a-file"
    blocker.write_text("")

    def unwritable_cache():
        os.environ["TVLAB_CACHE"] = str(blocker / "cache")
        try:
            models.default_model_path()
        finally:
            del os.environ["TVLAB_CACHE"]

    class Odd(torch.nn.Module):
        def forward(self, x):
            return {"hidden": x}

    def odd_block():
        odd = tvlab.tiny_model("llama", n_layers=1)
        odd.blocks[0] = Odd()
        with tvlab.patch_hidden(odd, 0, -1, torch.zeros(odd.d_model)):
            odd.blocks[0](torch.zeros(1, 2, odd.d_model))

    def unknown_family():
        other = tvlab.tiny_model("llama", n_layers=1)
        other.model.config.model_type = "martian"
        models.family_of(other.model)

    def far_position():
        with torch.no_grad(), tvlab.read_hidden(lm, position=40):
            lm.model(input_ids=torch.tensor([[2, 5, 6]]))

    def wrong_patch():
        ids = lm.tokenizer("example:big->").input_ids
        every_layer = tvlab.engine.predict_last(lm, [ids], read=True).hidden[0]  # [n_layers, d_model]
        with tvlab.patch_hidden(lm, 2, -1, every_layer):
            tvlab.engine.predict_last_plain(lm, [ids])

    def not_utf8():
        (tmp / "latin-1.csv").write_bytes("café,coffee\n".encode("latin-1"))
        tvlab.load_task(tmp / "latin-1.csv")

    def as_error(call):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call()

    def earlier_run() -> str:
        folder = tmp / "earlier-run"
        folder.mkdir(exist_ok=True)
        (folder / "results.json").write_text(json.dumps({
            "model": "tiny-llama", "config": tvlab.ExperimentConfig().as_dict(),
            "tasks": [{"task": name} for name in ("antonyms", "fr_en", "en_es", "en_fr", "next_letter", "prev_letter", "to_upper")]}))
        return str(folder)

    def earlier_run_of(task: str) -> str:
        folder = tmp / "earlier-run-of-one"
        folder.mkdir(exist_ok=True)
        config = tvlab.ExperimentConfig()
        (folder / "results.json").write_text(json.dumps({
            "model": "tiny-llama", "config": config.as_dict(), "tasks": [{"task": task}],
            "task_fingerprints": {task: tvlab.reproduce.task_fingerprint(tvlab.get_task(task))}}))
        return str(folder)

    def cpu_only_torch(*argv):
        with mock.patch("torch.cuda.is_available", lambda: False), mock.patch("torch.backends.cuda.is_built", lambda: False), \
                mock.patch("torch.__version__", "2.8.0+cpu"):  # the same page on every machine
            _command_line(*argv)

    def grade_into_folder():
        from tvlab import course

        (tmp / "subs" / "alice").mkdir(parents=True, exist_ok=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            course.main(["grade", str(HERE.parent / "notebooks" / "01_icl_basics.ipynb"), "--submissions",
                         str(tmp / "subs"), "--out", str(tmp / "subs")])
        raise Printed(err.getvalue().strip())

    few = [{"input": "hot", "output": "cold"}, {"input": "big", "output": "small"}]

    def without_nnsight():
        with mock.patch.dict("sys.modules", {"nnsight": None}):  # import nnsight -> ImportError
            tvlab.load_model("tiny-llama", backend="nnsight")

    def ndif(answer=None, key: str | None = "key"):
        """load_model on NDIF with the status endpoint answering ``answer`` (raised if an exception): no network."""
        import nnsight
        from nnsight import ndif as nnsight_ndif

        def status(path, *args, **kwargs):
            if isinstance(answer, Exception):
                raise answer
            return {"deployments": answer}

        env = {k: v for k, v in os.environ.items() if k not in ("NDIF_API_KEY", "NDIF_HOST")}
        with mock.patch.dict(os.environ, {**env, **({"NDIF_API_KEY": key} if key else {})}, clear=True), \
                mock.patch.object(nnsight.CONFIG.API, "APIKEY", None), \
                mock.patch.object(nnsight.CONFIG.API, "HOST", "https://api.ndif.us"), \
                mock.patch.object(nnsight_ndif, "_get", status), contextlib.redirect_stderr(io.StringIO()):
            tvlab.load_model("meta-llama/Llama-3.1-70B", backend="nnsight", remote=True)

    def unreachable():
        import httpx

        ndif(httpx.ConnectError("[Errno -3] Temporary failure in name resolution"))

    hosted = {"a": {"repo_id": "openai-community/gpt2", "deployment_level": "HOT"}}

    return [
        ("Task", "an unknown task name", lambda: tvlab.get_task("antonym")),
        ("Task", "a task file that is not JSON", lambda: tvlab.load_task(task_file("t.json", "{oops"))),
        ("Task", "a row without \"output\"", lambda: tvlab.load_task(task_file("t.json", '[{"input": "a"}]'))),
        ("Task", "an empty string", lambda: tvlab.load_task(task_file("t.json", '[{"input": "a", "output": " "}]'))),
        ("Task", "a task file that is not UTF-8", not_utf8),
        ("Task", "one input, two outputs, in a task file (a warning; both are accepted)", lambda: as_error(
            lambda: tvlab.load_task(task_file("t.json", '[{"input": "a", "output": "b"}, {"input": "a", "output": "c"}]')))),
        ("Task", "one input, two outputs, in a Task built in code (and tvlab's own data)", lambda: tvlab.Task(
            "t", "custom", (tvlab.Pair("a", "b"), tvlab.Pair("a", "c")))),
        ("Task", "a row repeated in a task file (a warning; kept once)", lambda: as_error(
            lambda: tvlab.load_task(task_file("t.csv", "hot,cold\nup,down\nhot,cold\n")))),
        ("Task", "a pair listed twice in a Task built in code", lambda: tvlab.Task(
            "t", "custom", (tvlab.Pair("a", "b"), tvlab.Pair("a", "b")))),
        ("Task", "a task file row whose accept is not a list", lambda: tvlab.load_task(task_file(
            "t.json", '[{"input": "a", "output": "b", "accept": 5}]'))),
        ("Task", "an unknown scoring rule", lambda: tvlab.Task("t", "custom", (tvlab.Pair("a", "b"),), scoring="Exact")),
        ("Task", "a list of tasks where one is expected", lambda: tvlab.run_task(lm, ["antonyms", "fr_en"], small)),
        ("Task", "a JSON object task file with an answer that is not a string", lambda: tvlab.load_task(task_file(
            "t.json", '{"hot": "cold", "big": {"size": "small"}}'))),
        ("Task", "a CSV row with three columns", lambda: tvlab.load_task(task_file("t.csv", "a,b\nc,d,e\n"))),
        ("Task", "a CSV header that names the input column but no output column", lambda: tvlab.load_task(task_file(
            "t.csv", "id,source,antonym\n1,hot,cold\n"))),
        ("Task", "a file tvlab does not read (a .txt file)", lambda: tvlab.get_task(task_file("t.txt", "hot cold\n"))),
        ("Task", "a folder where a task file is expected", lambda: tvlab.get_task(str(tmp))),
        ("Task", "fewer pairs than a set needs", lambda: tvlab.sample_sets(
            tvlab.Task("five", "custom", tuple(tvlab.Pair(str(i), str(i)) for i in range(5))), 1, 5, seed=0, n_dummies=2)),
        ("Task", "answers that are not one token", lambda: tvlab.run_task(lm, task_file("p.json", json.dumps(phrases)), small)),
        ("Task", "several unusable tasks in one run (all reported before any work)", lambda: tvlab.reproduce.run_main(
            lm, ["antonyms", task_file("p.json", json.dumps(phrases)), task_file("few.json", json.dumps(few))], small,
            progress=False)),
        ("Settings", "a layer out of range", lambda: tvlab.explore.three_predictions(lm, "antonyms", "hot", layer=4)),
        ("Settings", "a layer that is not a whole number", lambda: tvlab.explore.three_predictions(lm, "antonyms", "hot", layer=2.5)),
        ("Settings", "a patch of the wrong shape (a task vector of every layer)", wrong_patch),
        ("Settings", "text where token ids are expected", lambda: tvlab.engine.predict_last(lm, ["example:big->"])),
        ("Settings", "a layer a task vector bank does not have", lambda: tvlab.geometry.TaskVectors(
            torch.zeros(2, 4, 8), pd.DataFrame({"task": ["a", "b"], "category": "custom", "set": 0}), {}).mean("a", 7)),
        ("Settings", "separability of one task's vectors", lambda: tvlab.geometry.separability(tvlab.geometry.TaskVectors(
            torch.zeros(2, 4, 8), pd.DataFrame({"task": ["a", "a"], "category": "custom", "set": [0, 1]}), {}), 1)),
        ("Settings", "a zero or negative count", lambda: tvlab.ExperimentConfig(n_test=0)),
        ("Settings", "more demonstrations than the context allows", lambda: tvlab.run_task(
            lm, "antonyms", tvlab.ExperimentConfig(n_demos=120, n_test=1, n_dev=1, n_baseline=1))),
        ("Settings", "a position that is not in the prompt", far_position),
        ("Settings", "a position that is not a whole number", lambda: tvlab.read_hidden(lm, position=1.5).__enter__()),
        ("Settings", "patch rows that are not row numbers", lambda: tvlab.patch_hidden(
            lm, 1, -1, torch.zeros(lm.d_model), rows=[0.5]).__enter__()),
        ("Settings", "a token id that is not a whole number (it would be truncated to another word)",
         lambda: tvlab.engine.predict_last(lm, [[3, 4.5, 5]])),
        ("Settings", "inputs that contain the prompt format's own arrow (a warning)", lambda: as_error(
            lambda: tvlab.prepare_task(lm, tvlab.Task("arrows", "custom", [(f"w{i}->x", "y") for i in range(12)]), small))),
        ("Settings", "a layer where every task vector is the same, laid out by t-SNE", lambda: tvlab.geometry.embed_2d(
            tvlab.geometry.TaskVectors(torch.ones(8, 4, 8), pd.DataFrame({"task": ["a", "b"] * 4, "category": "custom",
                                                                          "set": range(8)}), {}), 0)),
        ("Settings", "an unknown prompt format", lambda: tvlab.ExperimentConfig(format="chat")),
        ("Settings", "fast_path that is not True or False", lambda: tvlab.ExperimentConfig(fast_path="no")),
        ("Settings", "a zero or negative count in an analysis (a negative one would slice from the end)",
         lambda: tvlab.beyond.multi_token_answers(lm, "country_capital", 1, n_test=-1)),
        ("Settings", "an empty list of tasks", lambda: tvlab.layer_sweep(lm, [], small)),
        ("Settings", "a task named twice where vectors are collected", lambda: tvlab.geometry.collect_task_vectors(
            lm, ["antonyms", "antonyms"], n_per_task=2)),
        ("Settings", "a widget started outside its slider's range (it would move to the nearest end)",
         lambda: tvlab.widgets.patching_explorer(lm, layer=7)),
        ("Settings", "a model's name where the model is expected", lambda: tvlab.run_task("tiny-llama", "antonyms", small)),
        ("Settings", "a dict where an ExperimentConfig is expected", lambda: tvlab.run_task(lm, "antonyms", {"n_test": 2})),
        ("Settings", "a TaskRun where its predictions are expected", lambda: tvlab.summarize(tvlab.run_task(lm, "antonyms", small))),
        ("Settings", "a folder where a file to save vectors to is expected", lambda: tvlab.beyond.VectorBank(
            {"a": torch.zeros(8)}, {"a": 1}).save(tmp)),
        ("Settings", "a file that is not a saved bank of task vectors", lambda: tvlab.geometry.TaskVectors.load(
            task_file("t.csv", "hot,cold\n"))),
        ("Model", "an unknown model name, offline", lambda: tvlab.load_model("no-such-org/no-such-model")),
        ("Model", "a family missing from the table", unknown_family),
        ("Model", "a block that returns something unexpected", odd_block),
        ("Model", "an unknown dtype", lambda: tvlab.load_model("tiny-llama", dtype="float8")),
        ("Cache", "a cache folder that cannot be written", unwritable_cache),
        ("Remote", "`backend=\"nnsight\"` without nnsight installed", without_nnsight),
        ("Remote", "`remote=True` without an NDIF API key (checked before any network call)", lambda: ndif(key=None)),
        ("Remote", "`remote=True` when NDIF cannot be reached", unreachable),
        ("Remote", "`remote=True` with a model NDIF does not host", lambda: ndif(hosted)),
        ("Remote", "`remote=True` with a local model", lambda: tvlab.load_model("tiny-llama", backend="nnsight", remote=True)),
        ("Command line", "`--device cuda` with a CPU-only torch", lambda: cpu_only_torch("--device", "cuda", "--out", str(tmp))),
        ("Command line", "an unknown `--device`", lambda: _command_line("--device", "gpu", "--out", str(tmp))),
        ("Command line", "`--out` naming a file", lambda: _command_line("--out", str(blocker))),
        ("Command line", "a negative `--seed`", lambda: _command_line("--seed", "-5")),
        ("Command line", "`--remote` without `--backend nnsight`", lambda: _command_line("--remote")),
        ("Command line", "`--out` holding another run's results (fewer tasks; checked before loading the model)",
         lambda: _command_line("--tasks", "antonyms", "--out", earlier_run())),
        ("Command line", "a task file named like a task whose results `--out` holds (other pairs)",
         lambda: _command_line("--tasks", task_file("antonyms.json", json.dumps(phrases)), "--out", earlier_run_of("antonyms"))),
        ("Command line", "`tvlab course grade --out` naming a folder (refused before grading)", grade_into_folder),
        ("Command line", "bad task names and a task listed twice (all reported before loading)", lambda: _command_line(
            "--tasks", "antonym,antonyms", "antonyms", str(tmp / "missing.json"), "--out", str(tmp))),
    ]


def collect() -> list[tuple[str, str, str]]:
    """(kind, bad input, what the user sees) for every case."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, what, call in _cases(Path(tmp)):
            try:
                call()
            except Exception as e:  # the point: show the message
                message = (str(e) if isinstance(e, Printed) else f"{type(e).__name__}: {e}").replace(tmp, "/tmp/…")
            else:
                raise AssertionError(f"{what}: no error was raised")
            rows.append((kind, what, message))
    return rows


def render(rows) -> str:
    lines = ["# Bad input, and what you see", "",
             "Generated by `python docs/bad_inputs.py` from the real messages; `tests/test_docs.py` keeps it current.",
             "Interrupted work is covered by tests too (`tests/test_robustness.py`): a model conversion",
             "killed half-way is never read and is redone on the next load; a corrupt cache file fails its",
             "checksum and is rebuilt; two processes loading the default model at once convert it once",
             "(the second waits on a file lock); an interrupted `tvlab reproduce` keeps every finished task",
             "(written atomically) and resumes from them when run again with the same settings.", "",
             "| kind | bad input | what the user sees |", "|---|---|---|"]
    for kind, what, message in rows:
        lines.append(f"| {kind} | {what} | `{message.replace('|', '/').replace(chr(10), ' ')}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (HERE / "bad_inputs.md").write_text(render(collect()), encoding="utf-8")
    print(f"wrote {HERE / 'bad_inputs.md'}")
