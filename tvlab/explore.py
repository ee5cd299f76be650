"""Small experiments for exploring by hand: the functions behind the notebooks' widgets.

>>> lm = tvlab.load_model("tiny-llama")       # tvlab.load_model() loads the real Gemma 3 270M
>>> tvlab.explore.next_token_probs(lm, "example:hot->cold\\nexample:big->", k=5).columns.tolist()
['rank', 'token', 'probability']
>>> r = tvlab.explore.three_predictions(lm, "antonyms", "big", layer=2)
>>> r.expected, r.zero_shot_prompt, r.table()["method"].tolist()
('small', 'example:big->', ['ICL (demonstrations + query)', 'task vector (θ patched at layer 2)', 'baseline (query alone)'])
>>> tvlab.explore.icl_vs_demos(lm, ["antonyms", "to_upper"], [0, 1, 2, 5], n_sets=20).shape  # a row per task and count
(8, 4)

Each returns plain data (a DataFrame or a small record), so a widget only has to draw it
and a test can check it without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ._checks import as_list, count, counts, text as _check_text
from .engine import next_token_logits, predict_last
from .experiments import ExperimentConfig, icl_and_task_vectors, prepare_task, prompt_format, zero_shot_predictions
from .models import LanguageModel, decode_token
from .prompts import FORMATS, Pair, PromptSet, get_format, sample_sets, single_token_filter, tokenize
from .tasks import Task, as_task_list, get_task


def next_token_probs(lm: LanguageModel, text: str, k: int = 10, digits: int = 2) -> pd.DataFrame:
    """The ``k`` most likely next tokens after ``text``: columns rank, token, probability.

    Probabilities are rounded to ``digits`` places (default 2): the last digits of a float32
    softmax differ between CPUs, BLAS libraries and thread counts, and a notebook's stored
    output must not.
    """
    k = count(k, "k")
    digits = count(digits, "digits", minimum=0)
    _check_text(text, "text")
    probs = next_token_logits(lm, [lm.tokenizer(text).input_ids])[0].softmax(-1)
    top = probs.topk(min(k, len(probs)))  # k beyond the vocabulary: every token, once
    return pd.DataFrame({"rank": range(1, len(top.values) + 1),
                         "token": [repr(decode_token(lm, i))[1:-1] for i in top.indices.tolist()],
                         "probability": top.values.numpy().round(digits)})


def icl_prompt(lm: LanguageModel, task: str | Task, n_demos: int, query: str, seed: int = 0,
               fmt: str = "paper") -> str:
    """A few-shot prompt for ``query`` with ``n_demos`` demonstrations of ``task`` (never the query itself)."""
    n_demos = count(n_demos, "n_demos", minimum=0)
    _check_text(query, "query")
    task = task if isinstance(task, Task) else get_task(task)
    pool = task.with_pairs((p for p in task.pairs if p.input != query), note="without the query")
    # Nested demonstrations: the prompt with n demonstrations starts like the one with n + 1.
    demos = sample_sets(pool, 1, max(n_demos, min(10, len(pool) - 1)), seed, "explore")[0].demos[:n_demos]
    return get_format(fmt).with_prefix(lm.prompt_prefix).render(demos, query)


def icl_vs_demos(lm: LanguageModel, tasks: Sequence[str | Task], n_demos: Sequence[int], n_sets: int = 20,
                 seed: int = 41, fmt: str = "paper", batch_size: int | None = None) -> pd.DataFrame:
    """ICL accuracy against the number of demonstrations: columns task, category, n_demos, accuracy.

    0 demonstrations is the zero-shot baseline. For each count, ``n_sets`` independent sets.
    """
    rows, n_demos, n_sets = [], counts(n_demos, "n_demos", minimum=0), count(n_sets, "n_sets")
    for name in as_task_list(tasks):
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
    """ICL accuracy of the same tasks in different prompt formats: task, format, accuracy, pairs kept.

    ``tasks``: names, task files or :class:`Task` objects."""
    tasks = [t if isinstance(t, Task) else get_task(t) for t in as_task_list(tasks)]
    by_name = {t.name: t for t in tasks}
    formats, n_sets, n_demos = as_list(formats, "formats"), count(n_sets, "n_sets"), count(n_demos, "n_demos")
    rows = []
    for fmt in formats:
        frame = icl_vs_demos(lm, tasks, [n_demos], n_sets=n_sets, seed=seed, fmt=fmt)
        for r in frame.itertuples():
            config = ExperimentConfig(format=fmt)
            _, report = single_token_filter(by_name[r.task], lm.tokenizer, prompt_format(lm, config))
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
    #: The Task scored against (a user's own Task has a name :func:`get_task` does not know).
    task_def: Task | None = field(default=None, repr=False, compare=False)

    def table(self) -> pd.DataFrame:
        rows = [("ICL (demonstrations + query)", self.icl), (f"task vector (θ patched at layer {self.layer})", self.task_vector),
                ("baseline (query alone)", self.baseline)]
        task = self.task_def if self.task_def is not None else get_task(self.task)
        return pd.DataFrame([{"method": m, "prediction": p, "correct": task.score(p, _pair(self, task))}
                             for m, p in rows])


def _pair(r: ThreePredictions, task: Task) -> Pair:
    return next((p for p in task.pairs if p.input == r.query), Pair(r.query, r.expected))


def three_predictions(lm: LanguageModel, task: str | Task, query: str, layer: int, n_demos: int = 5,
                      seed: int = 0, fmt: str = "paper") -> ThreePredictions:
    """Run one query three ways: ICL, task vector patched at ``layer``, zero-shot baseline."""
    _check_text(query, "query")
    n_demos = count(n_demos, "n_demos")
    lm.check_layer(layer)
    task = original = task if isinstance(task, Task) else get_task(task)
    config = ExperimentConfig(n_demos=n_demos, format=fmt, seed=seed)
    task, _ = prepare_task(lm, task, config)
    pool = task.with_pairs((p for p in task.pairs if p.input != query), note="without the query")
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
        decode_token(lm, icl[0]).strip(), decode_token(lm, int(tv[0, 0])).strip(), decode_token(lm, int(base[0])).strip(),
        task_def=original)


def query_swap(lm: LanguageModel, task: str | Task, theta_layer: int, n_queries: int = 30, seed: int = 41,
               fmt: str = "paper") -> pd.DataFrame:
    """Where do the layers after L read the query? Swap the query token's state at each layer.

    Each zero-shot prompt ``example:x->`` gets θ(S) at ``theta_layer`` over its last token, as in
    the paper. In addition, at one layer l, the hidden state of the *query token* x is overwritten
    with the state that another query x' has at the same position and layer. If the answer then
    follows x', the blocks after l still read the query from its own position; once the answer
    stays with x, the last token has already taken what it needs from the query.

    Pairs (x, x') whose prompts differ in one token only are used (single-token queries of equal
    prompt length). Returns one row per layer l: follows_x, follows_x_swapped (shares of the
    predictions scored as x's and as x''s answer), n.
    """
    n_queries = count(n_queries, "n_queries")
    lm.check_layer(theta_layer)
    config = ExperimentConfig(format=fmt, seed=seed)
    task, _ = prepare_task(lm, task, config)
    fmt_ = prompt_format(lm, config)
    sets = sample_sets(task, 4 * n_queries, config.n_demos, seed, "query-swap", config.n_dummies)
    ids = [tokenize(lm.tokenizer, fmt_, (), s.query.input).ids for s in sets]
    pairs = []  # (index of x, index of x', position of the one differing token, counted from the end)
    for i in range(len(sets)):
        for j in (i + 1, i + 2, i + 3):
            j %= len(sets)
            diff = [k for k in range(len(ids[i])) if len(ids[i]) == len(ids[j]) and ids[i][k] != ids[j][k]]
            if len(diff) == 1 and diff[0] < len(ids[i]) - 1 and sets[i].query.output != sets[j].query.output:
                pairs.append((i, j, diff[0] - len(ids[i])))
                break
        if len(pairs) == n_queries:
            break
    if not pairs:
        raise ValueError(f"no two queries of {task.name!r} differ in one token only; query_swap needs single-token inputs.")
    _, thetas = icl_and_task_vectors(lm, [sets[i] for i, _, _ in pairs], fmt_, with_icl=False)
    swapped_states = {}
    for position in sorted({p for _, _, p in pairs}):
        rows = [k for k, (_, _, p) in enumerate(pairs) if p == position]
        out = predict_last(lm, [ids[pairs[k][1]] for k in rows], read=True, read_position=position, predict=False)
        swapped_states.update({k: out.hidden[n] for n, k in enumerate(rows)})  # [n_layers, d_model]
    prompts, patches = [], []
    for layer in range(lm.n_layers):
        for k, (i, _, position) in enumerate(pairs):
            prompts.append(ids[i])
            patches.append([(theta_layer, thetas[k, theta_layer]), (layer, swapped_states[k][layer], position)])
    top = predict_last(lm, prompts, patches=patches).top_ids.view(lm.n_layers, len(pairs))
    rows = []
    for layer in range(lm.n_layers):
        guesses = [decode_token(lm, int(t)) for t in top[layer]]
        rows.append({"task": task.name, "layer": layer,
                     "follows_x": sum(task.score(g, sets[i].query) for g, (i, _, _) in zip(guesses, pairs)) / len(pairs),
                     "follows_x_swapped": sum(task.score(g, sets[j].query) for g, (_, j, _) in zip(guesses, pairs)) / len(pairs),
                     "n": len(pairs)})
    return pd.DataFrame(rows)
