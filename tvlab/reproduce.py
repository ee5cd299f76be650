"""``tvlab reproduce``: the paper's main experiment on many tasks, resumable, with a report.

>>> results = tvlab.reproduce.run_main(lm, tvlab.list_tasks(), tvlab.ExperimentConfig(), out="results")
>>> print(tvlab.reproduce.report(results))

Each finished task's predictions are written atomically to
``OUT/.partial/<settings-key>/<task>.csv``; running again with the same model, settings
and tasks picks up the finished ones, and different settings never share a folder.
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

from . import paper
from .engine import ForwardStats
from .experiments import ExperimentConfig, category_means, layer_accuracy, run_task, summarize
from .models import LanguageModel
from .tasks import Task, get_task


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


def settings_key(lm: LanguageModel, config: ExperimentConfig, task: Task) -> str:
    """A short hash of everything that changes a task's numbers."""
    spec = {"model": lm.name, "dtype": str(lm.dtype), "config": config.as_dict(), "task": task.name,
            "pairs": hashlib.sha256(json.dumps([(p.input, p.answers) for p in task.pairs]).encode()).hexdigest()}
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


def run_main(lm: LanguageModel, tasks: Sequence[str | Task], config: ExperimentConfig | None = None,
             out: str | Path | None = None, progress: bool = True) -> MainResults:
    """Run :func:`tvlab.run_task` on every task; with ``out``, resume finished tasks."""
    config = config or ExperimentConfig()
    resolved = [t if isinstance(t, Task) else get_task(t) for t in tasks]
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice: {names}.")
    stats, frames, counts, resumed = ForwardStats(), [], [], []
    start = time.perf_counter()
    bar = tqdm(resolved, desc="tasks", unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.name)
        partial = Path(out) / ".partial" / settings_key(lm, config, task) / f"{task.name}.csv" if out else None
        if partial is not None and partial.exists():
            predictions = pd.read_csv(partial, keep_default_na=False, na_values={"layer": [""]},
                                      dtype={"query": str, "expected": str, "predicted": str})
            predictions["layer"] = predictions["layer"].astype("Int64")
            meta = json.loads(partial.with_suffix(".json").read_text())
            resumed.append(task.name)
        else:
            run = run_task(lm, task, config, stats=stats)
            predictions = run.predictions
            meta = {"kept": run.filter_report.kept, "total": run.filter_report.total}
            if partial is not None:
                _write_atomic(partial.with_suffix(".json"), json.dumps(meta))
                _write_atomic(partial, predictions.to_csv(index=False))  # written last: marks the task done
        frames.append(predictions)
        counts.append({"task": task.name, "pairs": meta["total"], "single_token": meta["kept"]})
    predictions = pd.concat(frames, ignore_index=True)
    summary = summarize(predictions).merge(pd.DataFrame(counts), on="task")
    return MainResults(predictions, summary, layer_accuracy(predictions), category_means(summary),
                       pd.DataFrame(counts), config, lm.name, time.perf_counter() - start, stats, resumed)


# --------------------------------------------------------------------------- report

def _fmt(x) -> str:
    return "  -  " if pd.isna(x) else f"{x:5.2f}"


def report(results: MainResults) -> str:
    """The per-task and per-category tables, next to the paper's published averages."""
    lines = [f"Model: {results.model}   prompts: {results.config.format} format, {results.config.n_demos} demonstrations, "
             f"{results.config.n_test} test / {results.config.n_dev} dev / {results.config.n_baseline} baseline sets, "
             f"seed {results.config.seed}", ""]
    head = f"{'task':28s} {'category':12s} {'base':>5s} {'ICL':>5s} {'TV':>5s} {'TV/ICL':>6s} {'layer':>5s} {'1-token pairs':>13s}"
    lines += [head, "-" * len(head)]
    for _, r in results.summary.iterrows():
        lines.append(f"{r.task:28s} {r.category:12s} {_fmt(r.baseline)} {_fmt(r.icl)} {_fmt(r.task_vector)} "
                     f"{_fmt(r.tv_over_icl):>6s} {int(r.best_layer):5d} {f'{r.single_token}/{r.pairs}':>13s}")
    lines += ["", f"{'category':28s} {'tasks':>5s} {'base':>5s} {'ICL':>5s} {'TV':>5s} {'TV/ICL':>6s}   paper (all models) TV/ICL",
              "-" * 86]
    published = paper.category_means().set_index("category")
    for _, r in results.categories.iterrows():
        ref = published.loc[r.category] if r.category in published.index else None
        if r.category == "all tasks":
            ref = paper.model_means().set_index("model").loc["all models"]
        ref_text = f"{ref.task_vector:.2f} / {ref.icl:.2f} = {ref.tv_over_icl:.2f}" if ref is not None else ""
        lines.append(f"{r.category:28s} {int(r.n_tasks):5d} {_fmt(r.baseline)} {_fmt(r.icl)} {_fmt(r.task_vector)} "
                     f"{_fmt(r.tv_over_icl):>6s}   {ref_text}")
    lines += ["", "The paper's means over its 18 tasks (" + paper.CITATION + "):",
              f"{'model':14s} {'base':>5s} {'ICL':>5s} {'TV':>5s} {'TV/ICL':>6s}"]
    for _, r in paper.model_means().iterrows():
        lines.append(f"{r.model:14s} {_fmt(r.baseline)} {_fmt(r.icl)} {_fmt(r.task_vector)} {_fmt(r.tv_over_icl):>6s}")
    paper_tasks = results.summary[results.summary["task"].isin(set(paper.results()["task"]))]
    if len(paper_tasks):
        ours = paper_tasks[["baseline", "icl", "task_vector"]].mean()
        lines.append(f"{'this run':14s} {_fmt(ours.baseline)} {_fmt(ours.icl)} {_fmt(ours.task_vector)} "
                     f"{_fmt(ours.task_vector / ours.icl if ours.icl > 0 else float('nan')):>6s}   ({len(paper_tasks)} of the paper's tasks, {results.model})")
    return "\n".join(lines)


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
               "by_layer": json.loads(results.by_layer.to_json(orient="records"))}
    _write_atomic(out / "results.json", json.dumps(payload, indent=1))
    written.append(out / "results.json")
    import matplotlib.pyplot as plt

    for name, fig in (("main_results.png", plots.main_bars(results.summary, f"{results.model}: ICL vs task vector")),
                      ("accuracy_by_layer.png", plots.layer_curves(results.by_layer, title=f"{results.model}: task-vector accuracy by layer (dev)"))):
        fig.savefig(out / name, dpi=130)
        plt.close(fig)
        written.append(out / name)
    return written
