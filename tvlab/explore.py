"""Small experiments for exploring by hand: the functions behind the notebooks' widgets.

>>> tvlab.explore.next_token_probs(lm, "example:hot->cold\\nexample:big->", k=5)
>>> tvlab.explore.three_predictions(lm, "antonyms", "big", layer=10)
>>> tvlab.explore.icl_vs_demos(lm, ["antonyms", "to_upper"], [0, 1, 2, 5], n_sets=20)

Each returns plain data (a DataFrame or a small record), so a widget only has to draw it
and a test can check it without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .engine import predict_last
from .experiments import (ExperimentConfig, decode_token, icl_and_task_vectors, prepare_task, prompt_format,
                          zero_shot_predictions)
from .models import LanguageModel
from .prompts import FORMATS, Pair, PromptSet, get_format, sample_sets, single_token_filter, tokenize
from .tasks import Task, get_task


@torch.inference_mode()
def next_token_probs(lm: LanguageModel, text: str, k: int = 10) -> pd.DataFrame:
    """The ``k`` most likely next tokens after ``text``: columns rank, token, probability."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
    logits = lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    probs = logits.softmax(-1)
    top = probs.topk(k)
    return pd.DataFrame({"rank": range(1, k + 1),
                         "token": [repr(decode_token(lm, i))[1:-1] for i in top.indices.tolist()],
                         "probability": top.values.cpu().numpy().round(4)})


def icl_prompt(lm: LanguageModel, task: str | Task, n_demos: int, query: str, seed: int = 0,
               fmt: str = "paper") -> str:
    """A few-shot prompt for ``query`` with ``n_demos`` demonstrations of ``task`` (never the query itself)."""
    task = task if isinstance(task, Task) else get_task(task)
    pool = Task(task.name, task.category, tuple(p for p in task.pairs if p.input != query), task.scoring)
    if n_demos < 0:
        raise ValueError(f"n_demos must be >= 0, got {n_demos}.")
    # Nested demonstrations: the prompt with n demonstrations starts like the one with n + 1.
    demos = sample_sets(pool, 1, max(n_demos, 10), seed, "explore")[0].demos[:n_demos]
    return get_format(fmt).with_prefix(lm.prompt_prefix).render(demos, query)


def icl_vs_demos(lm: LanguageModel, tasks: Sequence[str | Task], n_demos: Sequence[int], n_sets: int = 20,
                 seed: int = 41, fmt: str = "paper", batch_size: int = 256) -> pd.DataFrame:
    """ICL accuracy against the number of demonstrations: columns task, category, n_demos, accuracy.

    0 demonstrations is the zero-shot baseline. For each count, ``n_sets`` independent sets.
    """
    rows = []
    for name in tasks:
        config = ExperimentConfig(n_demos=max(n_demos), format=fmt, seed=seed)
        task, _ = prepare_task(lm, name, config)
        fmt_ = prompt_format(lm, config)
        for n in n_demos:
            sets = sample_sets(task, n_sets, n, seed, f"demos-{n}")
            prompts = [tokenize(lm.tokenizer, fmt_, s.demos, s.query.input).ids for s in sets]
            top = predict_last(lm, prompts, batch_size=batch_size).top_ids
            correct = [task.score(decode_token(lm, t), s.query) for t, s in zip(top.tolist(), sets)]
            rows.append({"task": task.name, "category": task.category, "n_demos": n,
                         "accuracy": sum(correct) / len(correct)})
    return pd.DataFrame(rows)


def format_comparison(lm: LanguageModel, tasks: Sequence[str], formats: Sequence[str] = tuple(FORMATS),
                      n_sets: int = 20, n_demos: int = 5, seed: int = 41) -> pd.DataFrame:
    """ICL accuracy of the same tasks in different prompt formats: task, format, accuracy, pairs kept."""
    rows = []
    for fmt in formats:
        frame = icl_vs_demos(lm, tasks, [n_demos], n_sets=n_sets, seed=seed, fmt=fmt)
        for r in frame.itertuples():
            config = ExperimentConfig(format=fmt)
            _, report = single_token_filter(get_task(r.task), lm.tokenizer, prompt_format(lm, config))
            rows.append({"task": r.task, "format": fmt, "example": get_format(fmt).demo("x", "y").replace("\n", "⏎"),
                         "accuracy": r.accuracy, "one_token_pairs": f"{report.kept}/{report.total}"})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ThreePredictions:
    """ICL, task-vector and zero-shot predictions for one query, with the prompts used."""

    task: str
    query: str
    expected: str
    layer: int
    icl_prompt: str
    dummy_prompts: tuple[str, ...]
    zero_shot_prompt: str
    icl: str
    task_vector: str
    baseline: str

    def table(self) -> pd.DataFrame:
        rows = [("ICL (demonstrations + query)", self.icl), (f"task vector (θ patched at layer {self.layer})", self.task_vector),
                ("baseline (query alone)", self.baseline)]
        return pd.DataFrame([{"method": m, "prediction": p, "correct": get_task(self.task).score(p, _pair(self))}
                             for m, p in rows])


def _pair(r: ThreePredictions) -> Pair:
    return next((p for p in get_task(r.task).pairs if p.input == r.query), Pair(r.query, r.expected))


def three_predictions(lm: LanguageModel, task: str | Task, query: str, layer: int, n_demos: int = 5,
                      seed: int = 0, fmt: str = "paper") -> ThreePredictions:
    """Run one query three ways: ICL, task vector patched at ``layer``, zero-shot baseline."""
    lm.check_layer(layer)
    task = task if isinstance(task, Task) else get_task(task)
    config = ExperimentConfig(n_demos=n_demos, format=fmt, seed=seed)
    task, _ = prepare_task(lm, task, config)
    pool = Task(task.name, task.category, tuple(p for p in task.pairs if p.input != query), task.scoring)
    s = sample_sets(pool, 1, n_demos, seed, "explore", n_dummies=2)[0]
    query_pair = next((p for p in task.pairs if p.input == query), Pair(query, "?"))
    s = PromptSet(s.demos, query_pair, s.dummies)
    fmt_ = prompt_format(lm, config)
    icl, thetas = icl_and_task_vectors(lm, [s], fmt_)
    tv = zero_shot_predictions(lm, [query_pair], fmt_, thetas=thetas, layers=[layer])
    base = zero_shot_predictions(lm, [query_pair], fmt_)
    return ThreePredictions(
        task.name, query, query_pair.output, layer, fmt_.render(s.demos, query),
        tuple(fmt_.render(s.demos, d.input) for d in s.dummies), fmt_.render((), query),
        decode_token(lm, icl[0]).strip(), decode_token(lm, int(tv[0, 0])).strip(), decode_token(lm, int(base[0])).strip())
