"""``tvlab reproduce``: the paper's main experiment on many tasks, resumable, with a report.

>>> lm = tvlab.load_model("tiny-llama")   # tvlab.load_model() loads the real Gemma 3 270M
>>> config = tvlab.ExperimentConfig(n_test=2, n_dev=2, n_baseline=2)   # ExperimentConfig(): the paper's protocol
>>> results = tvlab.reproduce.run_main(lm, tvlab.list_tasks(), config, out="results", progress=False)
>>> print(tvlab.reproduce.report(results))   # doctest: +ELLIPSIS
Model: tiny-llama   prompts: paper format, 5 demonstrations, 2 test / 2 dev / 2 baseline sets, seed 41
<BLANKLINE>
± is the larger distance from an accuracy to the ends of its 95 % confidence interval over the sets (Wilson; ...).
<BLANKLINE>
task                         category          base       ICL        TV TV/ICL layer 1-token pairs
...
>>> again = tvlab.reproduce.run_main(lm, tvlab.list_tasks(), config, out="results", progress=False)
>>> len(again.resumed)                    # every task was picked up from results/.partial
19

Each finished task's predictions are written atomically to
``OUT/.partial/<settings-key>/<task>.csv``; running again with the same model, settings
and tasks picks up the finished ones, and different settings never share a folder (the key
covers the model's files, the scoring rule and the versions of tvlab, torch and transformers).
Every task is loaded and checked before the first forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from . import experiments, paper
from ._checks import whole_number
from .engine import ForwardStats
from .experiments import ExperimentConfig, category_means, layer_accuracy, prepare_task, run_prepared_tasks, summarize
from .models import LanguageModel
from .prompts import FilterReport
from .tasks import CATEGORIES, Scoring, Task, TaskError, as_task_list, get_task, is_task_file, load_task


@dataclass
class MainResults:
    predictions: pd.DataFrame
    summary: pd.DataFrame
    by_layer: pd.DataFrame
    categories: pd.DataFrame
    filter_counts: pd.DataFrame
    config: ExperimentConfig
    model: str
    seconds: float = 0.0
    stats: ForwardStats = field(default_factory=ForwardStats)
    resumed: list[str] = field(default_factory=list)
    tasks: dict[str, str] = field(default_factory=dict)  # name -> task_fingerprint, saved in results.json


_SMALL_FILE = 8 << 20  # files up to this size are hashed; larger ones (weights) count by size and mtime


def _folder_fingerprint(folder: Path) -> str:
    """A hash of a model folder's files: names and sizes, the contents of small files (config, tokenizer),
    and the mtime of large ones (weights), so that an edited or replaced model never reuses old results."""
    h = hashlib.sha256()
    files = (p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in sorted(files):  # hidden entries (.git, .cache) are not the model
        stat = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0".encode())
        if stat.st_size <= _SMALL_FILE:
            h.update(path.read_bytes())
        else:
            h.update(str(stat.st_mtime_ns).encode())
    return h.hexdigest()


def model_fingerprint(lm: LanguageModel) -> str:
    """What identifies the model's weights: its local folder's files, the offline model's manifest, else its name."""
    from . import models

    if Path(lm.name).is_dir():
        return _folder_fingerprint(Path(lm.name))
    if lm.name in models.OFFLINE_MODELS:  # the checksums of the converted files, from the cache's manifest
        manifest = models.cache_root() / "models" / models.OFFLINE_MODELS[lm.name].folder / "tvlab-manifest.json"
        try:
            files = json.loads(manifest.read_text())["files"]
            return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return lm.name


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"tvlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def task_fingerprint(task: Task) -> str:
    """A short hash of what makes a task's numbers: its pairs (with every accepted answer) and scoring rule."""
    pairs = json.dumps([(p.input, p.answers) for p in task.pairs])
    return hashlib.sha256(f"{task.scoring}\n{pairs}".encode()).hexdigest()[:16]


def settings_key(lm: LanguageModel, config: ExperimentConfig, task: Task) -> str:
    """A short hash of everything that changes a task's numbers: model (and its files), dtype, settings,
    the task's pairs and scoring rule, and the versions of tvlab, torch and transformers."""
    spec = {"model": lm.name, "weights": model_fingerprint(lm), "dtype": str(lm.dtype), "config": config.as_dict(),
            "task": task.name, "pairs_and_scoring": task_fingerprint(task), "versions": _versions()}
    for speed_only in ("batch_size", "fast_path"):  # they change how fast, not what is predicted
        spec["config"].pop(speed_only)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_tasks(tasks: Sequence[str | Path | Task], scoring: Scoring | None = None) -> list[Task]:
    """Tasks by name, path or :class:`Task`; every bad name or file and every duplicate in one TaskError.

    ``scoring`` applies to task files (None: exact, or the file's own rule, see :func:`tvlab.load_task`);
    built-in tasks keep their own rule.
    """
    resolved, problems = [], []
    for t in as_task_list(tasks):
        try:
            resolved.append(t if isinstance(t, Task) else load_task(t, scoring=scoring) if is_task_file(t) else get_task(t))
        except TaskError as e:
            problems.append(str(e))
    names = [t.name for t in resolved]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"{', '.join(repr(n) for n in twice)} listed more than once: list each task once (a task "
                        "from a file takes the file's name without its ending (.json, .csv, ...): rename a file whose name clashes).")
    if len(problems) == 1:
        raise TaskError(problems[0])
    if problems:
        raise TaskError(_listed(f"{len(problems)} problems with the tasks asked for:", problems))
    return resolved


def _listed(head: str, problems: list[str]) -> str:
    return head + "".join(f"\n  - {p}" for p in problems)


def prepare_tasks(lm: LanguageModel, tasks: Sequence[Task], config: ExperimentConfig) -> list[tuple[Task, FilterReport]]:
    """:func:`tvlab.prepare_task` for every task before any forward pass; all unusable tasks in one TaskError."""
    prepared, problems = [], []
    for task in tasks:
        try:
            prepared.append(prepare_task(lm, task, config))
        except TaskError as e:
            problems.append(str(e))
    if problems and len(tasks) == 1:
        raise TaskError(problems[0])
    if problems:
        raise TaskError(_listed(f"{len(problems)} of the {len(tasks)} tasks cannot be used, so nothing was run; "
                                "fix or leave out:", problems))
    return prepared


def run_main(lm: LanguageModel, tasks: Sequence[str | Task], config: ExperimentConfig | None = None,
             out: str | Path | None = None, progress: bool = True, scoring: Scoring | None = None,
             tasks_per_call: int | None = None) -> MainResults:
    """Run :func:`tvlab.run_task` on every task; with ``out``, resume finished tasks.

    Every task is loaded and filtered first, so an unusable one stops the run before any
    work, with all such tasks in one error. ``scoring`` applies to task files.
    ``tasks_per_call``: tasks run together, three engine calls per block of them (None:
    :func:`tvlab.experiments.tasks_per_call`, 1 on a CPU); the predictions do not depend on it
    (in float32), and with ``out`` each task is saved as soon as its block is done.
    """
    config = config or ExperimentConfig()
    resolved = resolve_tasks(tasks, scoring)
    prepared = prepare_tasks(lm, resolved, config)
    if tasks_per_call is None:
        tasks_per_call = experiments.tasks_per_call(lm, config)
    number = whole_number(tasks_per_call)
    if number is None or number < 1:
        raise ValueError(f"tasks_per_call must be a whole number >= 1 or None, got {tasks_per_call!r}.")
    tasks_per_call = number
    stats, start = ForwardStats(), time.perf_counter()
    done: dict[str, tuple[pd.DataFrame, dict]] = {}
    todo = []
    for task, (usable, filter_report) in zip(resolved, prepared):
        partial = Path(out) / ".partial" / settings_key(lm, config, task) / f"{task.name}.csv" if out else None
        if partial is not None and partial.exists():
            predictions = pd.read_csv(partial, keep_default_na=False, na_values={"layer": [""]},
                                      dtype={"query": str, "expected": str, "predicted": str})
            predictions["layer"] = predictions["layer"].astype("Int64")
            done[task.name] = predictions, json.loads(partial.with_suffix(".json").read_text())
        else:
            todo.append((usable, filter_report, partial))
    resumed = [task.name for task in resolved if task.name in done]
    bar = tqdm(total=len(resolved), initial=len(resumed), desc="tasks", unit="task", disable=not progress)
    for b in range(0, len(todo), tasks_per_call):
        block = todo[b:b + tasks_per_call]
        bar.set_postfix_str(", ".join(task.name for task, _, _ in block))
        runs = run_prepared_tasks(lm, [(task, report) for task, report, _ in block], config, stats=stats)
        for (task, report, partial), run in zip(block, runs):
            meta = {"kept": report.kept, "total": report.total}
            if partial is not None:
                _write_atomic(partial.with_suffix(".json"), json.dumps(meta))
                _write_atomic(partial, run.predictions.to_csv(index=False))  # written last: marks the task done
            done[task.name] = run.predictions, meta
        bar.update(len(block))
    bar.close()
    frames = [done[task.name][0] for task in resolved]
    counts = [{"task": task.name, "pairs": done[task.name][1]["total"], "single_token": done[task.name][1]["kept"]}
              for task in resolved]
    predictions = pd.concat(frames, ignore_index=True)
    summary = summarize(predictions, ci=True).merge(pd.DataFrame(counts), on="task")
    return MainResults(predictions, summary, layer_accuracy(predictions), category_means(summary),
                       pd.DataFrame(counts), config, lm.name, time.perf_counter() - start, stats, resumed,
                       {task.name: task_fingerprint(task) for task in resolved})


# --------------------------------------------------------------------------- report

def _fmt(x) -> str:
    return "  -  " if pd.isna(x) else f"{x:5.2f}"


def _pm(r, col: str) -> str:
    """An accuracy and the half-width of its 95 % interval, e.g. ' 0.62±.13' (just the accuracy without one)."""
    half = r.get(f"{col} ±")
    if half is None or pd.isna(half) or pd.isna(r[col]):
        return f"{_fmt(r[col])}    "
    return f"{r[col]:5.2f}±{half:.2f}".replace("±0.", "±.").replace("±1.00", "±1. ")


def _paper_tasks(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``summary`` that are the paper's own tasks (not user files that share a name)."""
    return summary[summary["task"].isin(set(paper.results()["task"])) & summary["category"].isin(CATEGORIES)]


def report(results: MainResults) -> str:
    """The per-task and per-category tables, next to the paper's published averages.

    The paper's numbers are shown only for the paper's tasks in this run: none for a run
    on your own tasks only; for a mix, the comparison is over the paper's tasks present.
    """
    paper_tasks = _paper_tasks(results.summary)
    compared = set(paper_tasks["category"]) | ({"all tasks"} if len(paper_tasks) == len(results.summary) else set())
    lines = [f"Model: {results.model}   prompts: {getattr(results.config.format, 'name', results.config.format)} format, {results.config.n_demos} demonstrations, "
             f"{results.config.n_test} test / {results.config.n_dev} dev / {results.config.n_baseline} baseline sets, "
             f"seed {results.config.seed}", ""]
    head = (f"{'task':28s} {'category':12s} {'base':>9s} {'ICL':>9s} {'TV':>9s} {'TV/ICL':>6s} {'layer':>5s} "
            f"{'1-token pairs':>13s}")
    lines += ["± is the larger distance from an accuracy to the ends of its 95 % confidence interval over the sets "
              "(Wilson; categories combine their tasks').",
              "", head, "-" * len(head)]
    for _, r in results.summary.iterrows():
        lines.append(f"{r.task:28s} {r.category:12s} {_pm(r, 'baseline')} {_pm(r, 'icl')} {_pm(r, 'task_vector')} "
                     f"{_fmt(r.tv_over_icl):>6s} {int(r.best_layer):5d} {f'{r.single_token}/{r.pairs}':>13s}")
    ref_head = "   paper (all models) TV/ICL" if len(paper_tasks) else ""
    lines += ["", f"{'category':28s} {'tasks':>5s} {'base':>9s} {'ICL':>9s} {'TV':>9s} {'TV/ICL':>6s}{ref_head}",
              "-" * (70 + len(ref_head))]
    published = paper.category_means().set_index("category")
    for _, r in results.categories.iterrows():
        ref = published.loc[r.category] if r.category in published.index and r.category in compared else None
        if r.category == "all tasks" and r.category in compared:
            ref = paper.model_means().set_index("model").loc["all models"]
        ref_text = f"{ref.task_vector:.2f} / {ref.icl:.2f} = {ref.tv_over_icl:.2f}" if ref is not None else ""
        lines.append(f"{r.category:28s} {int(r.n_tasks):5d} {_pm(r, 'baseline')} {_pm(r, 'icl')} {_pm(r, 'task_vector')} "
                     f"{_fmt(r.tv_over_icl):>6s}   {ref_text}".rstrip())
    if not len(paper_tasks):
        return "\n".join(lines)
    lines += ["", "The paper's means over its 18 tasks (" + paper.CITATION + "):",
              f"{'model':14s} {'base':>5s} {'ICL':>5s} {'TV':>5s} {'TV/ICL':>6s}"]
    for _, r in paper.model_means().iterrows():
        lines.append(f"{r.model:14s} {_fmt(r.baseline)} {_fmt(r.icl)} {_fmt(r.task_vector)} {_fmt(r.tv_over_icl):>6s}")
    ours = paper_tasks[["baseline", "icl", "task_vector"]].mean()
    lines.append(f"{'this run':14s} {_fmt(ours.baseline)} {_fmt(ours.icl)} {_fmt(ours.task_vector)} "
                 f"{_fmt(ours.task_vector / ours.icl if ours.icl > 0 else float('nan')):>6s}   ({len(paper_tasks)} of the paper's tasks, {results.model})")
    return "\n".join(lines)


RESULT_FILES = ("main_results.csv", "by_layer.csv", "by_category.csv", "predictions.csv", "results.json",
                "main_results.png", "accuracy_by_layer.png")


def replaces_other_run(out: str | Path, tasks: Sequence[str | Task], config: ExperimentConfig,
                       model: str | None = None) -> str | None:
    """Why :func:`save` into ``out`` would replace the results of another run, or None.

    ``out/results.json`` of an earlier run may be replaced by a run with its model, its
    settings (batch size and fast path aside) and all its tasks: every number it held comes back.
    Otherwise (or when the folder holds result files that no readable results.json
    describes) this says what differs, so a caller can stop before any work. ``model``
    None leaves the model out of the comparison (it is known only once loaded). A :class:`Task`
    is compared by its pairs and scoring too: a task file named like an earlier task is another task.
    """
    out = Path(out)
    present = [name for name in RESULT_FILES if (out / name).is_file()]
    if not present:
        return None
    try:
        earlier = json.loads((out / "results.json").read_text())
        earlier_tasks = [row["task"] for row in earlier["tasks"]]
        earlier_config, earlier_model = dict(earlier["config"]), earlier["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it holds {', '.join(present)} but no results.json of a tvlab run that describes them"
    reasons = []
    if model is not None and earlier_model != model:
        reasons.append(f"model {earlier_model}, not {model}")
    ours = {k: v for k, v in config.as_dict().items() if k not in ("batch_size", "fast_path")}  # speed, not results
    changed = [f"{k} {earlier_config.get(k)!r}, not {v!r}" for k, v in ours.items() if earlier_config.get(k, v) != v]
    reasons += changed
    names = [t.name if isinstance(t, Task) else t for t in tasks]
    missing = [t for t in earlier_tasks if t not in set(names)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        reasons.append(f"{len(missing)} of its {len(earlier_tasks)} tasks not in this run ({shown})")
    prints = earlier.get("task_fingerprints") if isinstance(earlier.get("task_fingerprints"), dict) else {}
    other = [t.name for t in tasks if isinstance(t, Task) and prints.get(t.name, task_fingerprint(t)) != task_fingerprint(t)]
    if other:
        reasons.append(f"other pairs or scoring under the name{'s' if len(other) > 1 else ''} {', '.join(other[:5])}")
    if not reasons:
        return None
    return "it holds the results of another run: " + "; ".join(reasons)


def save(results: MainResults, out: str | Path) -> list[Path]:
    """Write CSV, JSON and PNG results to ``out``; returns the paths written."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in (("main_results.csv", results.summary), ("by_layer.csv", results.by_layer),
                        ("by_category.csv", results.categories), ("predictions.csv", results.predictions)):
        _write_atomic(out / name, frame.to_csv(index=False))
        written.append(out / name)
    payload = {"model": results.model, "config": results.config.as_dict(), "seconds": round(results.seconds, 1),
               "paper": paper.CITATION,
               "tasks": json.loads(results.summary.to_json(orient="records")),
               "categories": json.loads(results.categories.to_json(orient="records")),
               "by_layer": json.loads(results.by_layer.to_json(orient="records")),
               "task_fingerprints": results.tasks}
    _write_atomic(out / "results.json", json.dumps(payload, indent=1))
    written.append(out / "results.json")
    import matplotlib.pyplot as plt

    for name, fig in (("main_results.png", plots.main_bars(results.predictions, f"{results.model}: ICL vs task vector")),
                      ("accuracy_by_layer.png", plots.layer_curves(results.predictions, title=f"{results.model}: task-vector accuracy by layer (dev)"))):
        fig.savefig(out / name, dpi=130)
        plt.close(fig)
        written.append(out / name)
    return written
