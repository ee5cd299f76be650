"""Conflicting tasks: prompt with task A's demonstrations, patch in θ of task B. Who wins?

>>> lm = tvlab.load_model("tiny-llama")   # tvlab.load_model() loads the real Gemma 3 270M
>>> frame = tvlab.conflicts.conflicting_tasks(lm, "next_letter", "to_upper", n_sets=10)
>>> frame.columns.tolist(), frame["method"].tolist()   # as_a, as_b: accuracy scored as A's, as B's answer
(['task_a', 'task_b', 'method', 'layer', 'as_a', 'as_b', 'n'], ['icl', 'task_vector'])
>>> tvlab.conflicts.paper_pairs(lm, n_sets=4, n_dev=4).shape   # the paper's five pairs, next to its LLaMA-13B numbers
(5, 9)

If θ(S) really carries the task, patching θ_B over the last token of an A prompt at B's
layer should make the model do B, even though every demonstration in the prompt shows A.
Each prediction is scored against A's answer and against B's answer for the same query,
so queries must be valid inputs of both tasks.
"""

from __future__ import annotations

import pandas as pd

from ._checks import count
from .engine import predict_last
from .experiments import ExperimentConfig, icl_and_task_vectors, layer_sweep, prepare_task, prompt_format
from .models import LanguageModel, decode_token
from .prompts import sample_sets, tokenize
from .tasks import Task, TaskError

#: The paper's pairs (A -> B) and its LLaMA-13B results (Hendel et al. 2023, conflicting-tasks experiment).
PAPER_CONFLICTS = pd.DataFrame([
    ("next_letter", "to_upper", .91, .00, .10, .77),
    ("list_last", "list_first", .95, .05, .20, .78),
    ("prev_letter", "next_letter", .51, .14, .08, .74),
    ("present_simple_past_simple", "present_simple_gerund", .98, .00, .01, .97),
    ("en_es", "en_fr", .93, .04, .91, .07),
], columns=["task_a", "task_b", "icl_as_a", "icl_as_b", "tv_as_a", "tv_as_b"])


def conflicting_tasks(lm: LanguageModel, task_a: str, task_b: str, n_sets: int = 50, layer: int | None = None,
                      n_demos: int = 4, seed: int = 41, fmt: str = "paper", n_dev: int = 20) -> pd.DataFrame:
    """ICL on A's prompts, and the same prompts with θ_B patched at B's best dev layer.

    Returns one row per method (icl, task_vector): task_a, task_b, method, layer, as_a, as_b, n.
    ``layer``: patch there instead of B's best layer (chosen on ``n_dev`` dev sets of B).
    """
    n_sets = count(n_sets, "n_sets")
    config = ExperimentConfig(n_demos=n_demos, seed=seed, format=fmt, n_dev=n_dev)
    a, _ = prepare_task(lm, task_a, config)
    b, _ = prepare_task(lm, task_b, config)
    b_by_input = {p.input: p for p in b.pairs}
    shared = a.with_pairs((p for p in a.pairs if p.input in b_by_input), note=f"only the inputs {b.name} also has")
    need = n_demos + 1
    if len(shared) < need:
        raise TaskError(f"{task_a} and {task_b} share only {len(shared)} inputs; a conflicting-task set needs {need}. "
                        "Pick two tasks over the same inputs (e.g. next_letter and to_upper).")
    if layer is None:
        sweep = layer_sweep(lm, [b], config)
        layer = int(sweep.set_index("layer")["accuracy"].idxmax())
    lm.check_layer(layer)
    fmt_ = prompt_format(lm, config)
    a_sets = sample_sets(shared, n_sets, n_demos, seed, f"conflict-{b.name}")
    b_sets = [_set_without(b, s.query.input, n_demos, seed, f"conflict-{a.name}-{k}", config.n_dummies)
              for k, s in enumerate(a_sets)]
    _, thetas = icl_and_task_vectors(lm, b_sets, fmt_, with_icl=False)
    prompts = [tokenize(lm.tokenizer, fmt_, s.demos, s.query.input).ids for s in a_sets]
    icl = predict_last(lm, prompts).top_ids
    patched = predict_last(lm, prompts, patches=[(layer, thetas[k, layer]) for k in range(n_sets)]).top_ids
    rows = []
    for method, ids in (("icl", icl), ("task_vector", patched)):
        guesses = [decode_token(lm, t) for t in ids.tolist()]
        as_a = sum(a.score(g, s.query) for g, s in zip(guesses, a_sets)) / n_sets
        as_b = sum(b.score(g, b_by_input[s.query.input]) for g, s in zip(guesses, a_sets)) / n_sets
        rows.append({"task_a": a.name, "task_b": b.name, "method": method, "layer": layer if method == "task_vector" else None,
                     "as_a": as_a, "as_b": as_b, "n": n_sets})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def _set_without(task: Task, query: str, n_demos: int, seed: int, split: str, n_dummies: int):
    """One set of ``task`` none of whose demonstrations or dummies has the input ``query``.

    θ_B must not have seen the A prompt's query: B's demonstration of it would carry B's answer.
    """
    pool = task.with_pairs([p for p in task.pairs if p.input != query], f"without the query {query!r}")
    return sample_sets(pool, 1, n_demos, seed, split, n_dummies)[0]


def paper_pairs(lm: LanguageModel, n_sets: int = 50, **kwargs) -> pd.DataFrame:
    """The paper's five pairs on ``lm``, one row per pair, next to the paper's LLaMA-13B numbers."""
    n_sets = count(n_sets, "n_sets")
    rows = []
    for r in PAPER_CONFLICTS.itertuples():
        f = conflicting_tasks(lm, r.task_a, r.task_b, n_sets=n_sets, **kwargs).set_index("method")
        rows.append({"task_a": r.task_a, "task_b": r.task_b, "layer": int(f.loc["task_vector", "layer"]),
                     "icl_as_a": f.loc["icl", "as_a"], "icl_as_b": f.loc["icl", "as_b"],
                     "tv_as_a": f.loc["task_vector", "as_a"], "tv_as_b": f.loc["task_vector", "as_b"],
                     "paper_tv_as_a": r.tv_as_a, "paper_tv_as_b": r.tv_as_b})
    return pd.DataFrame(rows)
