"""The paper's experiments, returning tidy pandas DataFrames.

>>> lm = tvlab.load_model("tiny-llama")   # tvlab.load_model() loads the real Gemma 3 270M
>>> run = tvlab.run_task(lm, "antonyms", tvlab.ExperimentConfig(n_test=20, n_dev=20))
>>> run.summary.columns.tolist()         # one row: baseline, icl, task_vector, best_layer
['task', 'category', 'baseline', 'icl', 'task_vector', 'best_layer', 'tv_over_icl']
>>> run.by_layer.columns.tolist()        # dev accuracy of the task vector at every layer
['task', 'category', 'layer', 'accuracy']
>>> len(run.by_layer) == lm.n_layers
True

The protocol (Hendel et al. 2023, section 3 and the official code):

* **ICL**: demonstrations S and query x in one prompt; the first predicted token is scored.
* **Baseline**: the zero-shot prompt for x alone.
* **Task vector**: θ(S) is the hidden state at the last token (the arrow) of the prompt
  S + x', where x' is a *dummy query* (another input of the task), averaged over 2 dummies,
  read at every layer. It is written over the last-token hidden state of the zero-shot
  prompt for x at layer L; the model's first predicted token is scored.
* **Layer choice**: task-vector accuracy at every layer on dev sets; the best dev layer
  is used on independent test sets.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import pandas as pd
import torch

from ._checks import whole_number
from .engine import ForwardStats, predict_last, predict_last_plain
from .models import LanguageModel, decode_token
from .prompts import (FilterReport, PromptFormat, PromptSet, get_format, prompt_ids, sample_sets,
                      single_token_filter)
from .tasks import Pair, Task, as_task_list, get_task


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of an experiment; defaults follow the paper's protocol."""

    n_demos: int = 5
    n_test: int = 50
    n_dev: int = 50
    n_baseline: int = 100
    n_dummies: int = 2
    seed: int = 41
    format: str | PromptFormat = "paper"  # a name in tvlab.FORMATS, or a tvlab.PromptFormat of your own
    batch_size: int | None = None  # prompts per forward pass, None: chosen from free memory; speed, not results
    fast_path: bool = True     # False: one prompt per forward, a full forward per layer (the reference)

    def __post_init__(self) -> None:
        for name, least in (("n_test", 1), ("n_dev", 1), ("n_baseline", 1), ("n_dummies", 1), ("batch_size", 1),
                            ("n_demos", 0), ("seed", 0)):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            number = whole_number(value)
            if number is None or number < least:
                raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}.")
            object.__setattr__(self, name, number)  # a NumPy integer is kept as an int (as_dict goes to JSON)
        from .prompts import FORMATS

        if not isinstance(self.format, PromptFormat) and not (isinstance(self.format, str) and self.format in FORMATS):
            raise ValueError(f"unknown prompt format {self.format!r}; choose one of {', '.join(FORMATS)} "
                             "or pass a tvlab.PromptFormat.")
        if type(self.fast_path).__name__ not in ("bool", "bool_"):  # a NumPy bool is fine, "no" is not
            raise ValueError(f"fast_path must be True or False, got {self.fast_path!r}.")
        object.__setattr__(self, "fast_path", bool(self.fast_path))

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_format(lm: LanguageModel, config: ExperimentConfig) -> PromptFormat:
    """The config's format, with the model's prompt prefix (a newline when it has no BOS token)."""
    return get_format(config.format).with_prefix(lm.prompt_prefix)


def _check_model_and_config(lm, config) -> None:
    if not isinstance(lm, LanguageModel):
        name = lm if isinstance(lm, str) else "gemma-3-270m"
        raise TypeError(f"the first argument is a model, got {type(lm).__name__} {lm!r}: "
                        f"lm = tvlab.load_model({name!r}), then pass lm.")
    if not isinstance(config, ExperimentConfig):
        hint = " Pass tvlab.ExperimentConfig(**your_dict)." if isinstance(config, dict) else ""
        raise TypeError(f"config must be a tvlab.ExperimentConfig, e.g. tvlab.ExperimentConfig(n_test=10), "
                        f"got {type(config).__name__}.{hint}")


def _check_frame(frame, needs: Sequence[str], what: str, fix: str) -> None:
    """``frame`` must be a DataFrame with the columns ``needs``; else say which object to pass instead."""
    if type(frame).__name__ == "TaskRun":
        raise TypeError(f"{what} takes a frame, not a TaskRun: pass {fix}.")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} takes a pandas DataFrame ({fix}), got {type(frame).__name__}.")
    missing = [c for c in needs if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: the frame has no column(s) {', '.join(map(repr, missing))}; pass {fix}.")


def prepare_task(lm: LanguageModel, task: str | Task, config: ExperimentConfig) -> tuple[Task, FilterReport]:
    """Resolve a task and keep the pairs whose answer is one token for this model."""
    _check_model_and_config(lm, config)
    task = task if isinstance(task, Task) else get_task(task)
    need = config.n_demos + 1 + config.n_dummies
    fmt = prompt_format(lm, config)
    unclear = fmt.ambiguous(task.pairs)
    if unclear:
        shown = ", ".join(repr(t) for t in unclear[:3]) + (", ..." if len(unclear) > 3 else "")
        other = next(name for name in ("qa", "paper") if name != fmt.name)
        marks = " or ".join(repr(m) for m in fmt.marks())
        warnings.warn(f"task {task.name!r}: {len(unclear)} input(s) or answer(s) contain {marks}, which the prompt "
                      f"format {fmt.template!r} puts between input and answer ({shown}), so its prompts do not show "
                      f"where an input ends; another format (format={other!r}, --format {other}) keeps them apart.",
                      UserWarning, stacklevel=2)
    return single_token_filter(task, lm.tokenizer, fmt, min_pairs=need)


def _check_context(lm: LanguageModel, prompts: Sequence[Sequence[int]]) -> None:
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit and longest > limit:
        raise ValueError(f"a prompt has {longest} tokens but {lm.name} takes at most {limit}: use fewer demonstrations.")


# --------------------------------------------------------------------------- building blocks

def _set_prompts(lm: LanguageModel, sets: Sequence[PromptSet], fmt: PromptFormat,
                 with_icl: bool) -> tuple[list[tuple[int, ...]], list[int], list[str]]:
    """Every prompt of ``sets``: per set, its ICL prompt (if ``with_icl``) and one per dummy query.

    Returns the token ids, the set each prompt belongs to, and its role ("icl" or "dummy").
    """
    if any(len(s.dummies) == 0 for s in sets):
        raise ValueError("extracting a task vector needs at least one dummy query per set (n_dummies >= 1).")
    items, owner, role = [], [], []
    for k, s in enumerate(sets):
        for what, q in ([("icl", s.query)] if with_icl else []) + [("dummy", d) for d in s.dummies]:
            items.append((s.demos, q.input))
            owner.append(k)
            role.append(what)
    return prompt_ids(lm.tokenizer, fmt, items), owner, role


def _set_outputs(lm: LanguageModel, n_sets: int, owner: Sequence[int], role: Sequence[str], top_ids: torch.Tensor,
                 hidden: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """ICL predictions and θ ``[n_sets, n_layers, d_model]`` (the mean over each set's dummy prompts)."""
    owner_t = torch.as_tensor(owner)
    dummy = torch.tensor([r == "dummy" for r in role])
    thetas = torch.zeros(n_sets, lm.n_layers, lm.d_model).index_add_(0, owner_t[dummy], hidden[dummy])
    thetas /= torch.bincount(owner_t[dummy], minlength=n_sets).clamp(min=1)[:, None, None]
    icl = [0] * n_sets
    for k, what, token in zip(owner, role, top_ids.tolist()):
        if what == "icl":
            icl[k] = token
    return icl, thetas


def _forward(lm: LanguageModel, prompts, *, fast: bool, groups=None, patches=None, read: bool | Sequence[bool] = False,
             predict: bool | Sequence[bool] = True, batch_size: int | None = None, stats: ForwardStats | None = None):
    if fast:
        return predict_last(lm, prompts, groups=groups, patches=patches, read=read, predict=predict,
                            batch_size=batch_size, stats=stats)
    return predict_last_plain(lm, prompts, patches=patches, read=read, predict=predict, stats=stats)


def icl_and_task_vectors(lm: LanguageModel, sets: Sequence[PromptSet], fmt: PromptFormat, *, with_icl: bool = True,
                         batch_size: int | None = None, stats: ForwardStats | None = None,
                         fast: bool = True) -> tuple[list[int] | None, torch.Tensor]:
    """ICL predictions (token ids) and task vectors θ(S) ``[n_sets, n_layers, d_model]``.

    One forward pass per set, shared: the demonstrations run once, then the ICL query
    and each dummy query run on their cache. θ is the mean over the dummy prompts of the
    last-token hidden state at every layer; only the ICL prompts are unembedded.
    """
    prompts, owner, role = _set_prompts(lm, sets, fmt, with_icl)
    _check_context(lm, prompts)
    dummy = [r == "dummy" for r in role]
    out = _forward(lm, prompts, fast=fast, groups=owner, read=dummy, predict=[not d for d in dummy],
                   batch_size=batch_size, stats=stats)
    icl, thetas = _set_outputs(lm, len(sets), owner, role, out.top_ids, out.hidden)
    return (icl if with_icl else None), thetas


def extract_task_vector(lm: LanguageModel, demos: Sequence[Pair], dummies: Sequence[Pair], layer: int,
                        fmt: PromptFormat | str = "paper") -> torch.Tensor:
    """θ(S) at ``layer`` from demonstrations S and dummy queries: ``[d_model]``."""
    layer = lm.check_layer(layer)
    if isinstance(demos, Task) or isinstance(dummies, Task):
        raise ValueError("demos and dummies are lists of pairs, not a Task: e.g. task.pairs[:5] and task.pairs[5:7].")
    demos, dummies = list(demos), [dummies] if isinstance(dummies, Pair) else list(dummies)
    if not dummies:
        raise ValueError("extract_task_vector needs at least one dummy query (θ is read at a query's last token).")
    for what, pairs in (("demos", demos), ("dummies", dummies)):
        if not all(isinstance(p, Pair) for p in pairs):
            raise ValueError(f"{what} must be Pair(input, output) examples, e.g. task.pairs[:5]; got {pairs[:2]!r}.")
    fmt = get_format(fmt).with_prefix(lm.prompt_prefix)
    _, thetas = icl_and_task_vectors(lm, [PromptSet(tuple(demos), dummies[0], tuple(dummies))], fmt, with_icl=False)
    return thetas[0, layer]


def zero_shot_predictions(lm: LanguageModel, queries: Sequence[Pair], fmt: PromptFormat, *,
                          thetas: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                          batch_size: int | None = None, stats: ForwardStats | None = None, fast: bool = True) -> torch.Tensor:
    """Predicted token ids for zero-shot prompts, plain or patched.

    Without ``thetas``: ``[n_queries]``, the baseline. With ``thetas`` ``[n_queries,
    n_layers, d_model]`` and ``layers``: ``[n_queries, len(layers)]``, query i patched at
    each layer with its own θ. All copies of a query share everything but the last token.
    """
    base = prompt_ids(lm.tokenizer, fmt, [((), q.input) for q in queries])
    if thetas is None:
        return _forward(lm, base, fast=fast, batch_size=batch_size, stats=stats).top_ids
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(layer) for layer in layers]
    prompts, groups, patches = _patched(base, thetas, layers)
    out = _forward(lm, prompts, fast=fast, groups=groups, patches=patches, batch_size=batch_size, stats=stats)
    return out.top_ids.view(len(queries), len(layers))


def _patched(base: Sequence[tuple[int, ...]], thetas: torch.Tensor, layers: Sequence[int]):
    """Prompt ``i`` of ``base`` once per layer, patched there with ``thetas[i, layer]``; the copies form group ``i``."""
    prompts, groups, patches = [], [], []
    for i, ids in enumerate(base):
        for layer in layers:
            prompts.append(ids)
            groups.append(i)
            patches.append((layer, thetas[i, layer]))
    return prompts, groups, patches


# --------------------------------------------------------------------------- one task, end to end

@dataclass
class TaskRun:
    """Everything one task's run produced. ``predictions`` is the source of every number."""

    task: str
    category: str
    predictions: pd.DataFrame      # one row per scored prediction
    filter_report: FilterReport
    best_layer: int
    config: ExperimentConfig
    stats: ForwardStats = field(default_factory=ForwardStats)

    @property
    def by_layer(self) -> pd.DataFrame:
        return layer_accuracy(self.predictions)

    @property
    def summary(self) -> pd.DataFrame:
        return summarize(self.predictions)


def _rows(task: Task, lm, split: str, method: str, layer, pairs: Sequence[Pair], ids: Sequence[int]) -> list[dict]:
    text = {token: decode_token(lm, token) for token in set(ids)}
    rows = []
    for k, (pair, token) in enumerate(zip(pairs, ids)):
        predicted = text[token]
        rows.append({"task": task.name, "category": task.category, "split": split, "set": k, "method": method,
                     "layer": layer, "query": pair.input, "expected": pair.output, "predicted": predicted.strip(),
                     "correct": task.score(predicted, pair)})
    return rows


def _dev_sets(task: Task, config: ExperimentConfig) -> list[PromptSet]:
    return sample_sets(task, config.n_dev, config.n_demos, config.seed, "dev", config.n_dummies)


def _sweep_rows(lm: LanguageModel, task: Task, sets: Sequence[PromptSet], fmt: PromptFormat,
                engine_args: dict) -> list[dict]:
    """Task-vector predictions for every set's query at every layer, θ from the set itself."""
    _, thetas = icl_and_task_vectors(lm, sets, fmt, with_icl=False, **engine_args)
    queries = [s.query for s in sets]
    return _layer_rows(lm, task, queries, zero_shot_predictions(lm, queries, fmt, thetas=thetas, **engine_args))


def _layer_rows(lm: LanguageModel, task: Task, queries: Sequence[Pair], sweep: torch.Tensor) -> list[dict]:
    """The dev rows of a sweep: ``sweep[i, layer]`` is query i's prediction when patched at that layer."""
    rows = []
    for layer in range(sweep.shape[1]):
        rows += _rows(task, lm, "dev", "task_vector", layer, queries, sweep[:, layer].tolist())
    return rows


def layer_sweep(lm: LanguageModel, tasks: Sequence[str | Task], config: ExperimentConfig | None = None) -> pd.DataFrame:
    """Task-vector accuracy at every layer on ``config.n_dev`` dev sets per task (no test sets).

    Returns the :func:`layer_accuracy` frame: task, category, layer, accuracy.
    """
    config = config or ExperimentConfig()
    engine_args = {"batch_size": config.batch_size, "stats": None, "fast": config.fast_path}
    rows = []
    for name in as_task_list(tasks):
        task, _ = prepare_task(lm, name, config)
        rows += _sweep_rows(lm, task, _dev_sets(task, config), prompt_format(lm, config), engine_args)
    return layer_accuracy(pd.DataFrame(rows))


def run_task(lm: LanguageModel, task: str | Task, config: ExperimentConfig | None = None,
             stats: ForwardStats | None = None) -> TaskRun:
    """The paper's main experiment on one task: baseline, ICL, layer sweep on dev, TV on test."""
    config = config or ExperimentConfig()
    task, report = prepare_task(lm, task, config)
    return run_prepared_task(lm, task, report, config, stats)


def run_prepared_task(lm: LanguageModel, task: Task, report: FilterReport, config: ExperimentConfig,
                      stats: ForwardStats | None = None) -> TaskRun:
    """:func:`run_task` on a task :func:`prepare_task` has already filtered (``report`` is its filter report).

    Three calls of the engine, each as large as its dependencies allow:

    1. every prompt that needs no task vector: the dev sets (θ for the sweep), the test sets
       (ICL prediction and θ) and the zero-shot baseline prompts;
    2. the layer sweep: each dev query patched with its own set's θ at every layer;
    3. each test query patched with its own set's θ at the best dev layer.
    """
    return run_prepared_tasks(lm, [(task, report)], config, stats)[0]


@dataclass
class _Plan:
    """One task's sets and the token ids of its prompts, before any forward pass."""

    task: Task
    report: FilterReport
    dev: list[PromptSet]
    test: list[PromptSet]
    base: list[Pair]               # the baseline's queries
    sets: list[tuple[int, ...]]    # dev then test set prompts (see _set_prompts), then the baseline prompts
    owner: list[int]               # the set of each dev and test prompt: dev sets 0.., test sets len(dev)..
    role: list[str]
    dev_zero: list[tuple[int, ...]]   # zero-shot prompts of the dev queries (the sweep)
    test_zero: list[tuple[int, ...]]  # and of the test queries (the task vector on test)

    def groups(self) -> list[int]:
        """Pass 1's groups: a set's prompts share its demonstrations; each baseline prompt is alone."""
        n_sets = len(self.dev) + len(self.test)
        return self.owner + list(range(n_sets, n_sets + len(self.base)))


def _plan(lm: LanguageModel, task: Task, report: FilterReport, config: ExperimentConfig, fmt: PromptFormat) -> _Plan:
    dev = _dev_sets(task, config)
    test = sample_sets(task, config.n_test, config.n_demos, config.seed, "test", config.n_dummies)
    base = [s.query for s in sample_sets(task, config.n_baseline, 0, config.seed, "baseline")]
    items, owner, role = [], [], []
    for k, s in enumerate(dev + test):
        for what, q in ([("icl", s.query)] if k >= len(dev) else []) + [("dummy", d) for d in s.dummies]:
            items.append((s.demos, q.input))
            owner.append(k)
            role.append(what)
    zero = [((), q.input) for q in [s.query for s in dev] + [s.query for s in test] + base]
    ids = prompt_ids(lm.tokenizer, fmt, items + zero)  # one tokenizer call for every prompt of the task
    n, n_dev = len(items), len(dev)
    return _Plan(task, report, dev, test, base, ids[:n] + ids[n + n_dev + len(test):], owner, role,
                 ids[n:n + n_dev], ids[n + n_dev:n + n_dev + len(test)])


def _call(lm: LanguageModel, parts: Sequence[tuple[list, list[int], list]], engine_args: dict, read=False):
    """One engine call over several tasks' prompts: ``parts`` holds (prompts, groups, patches or reads) per task;
    group ids are made distinct across tasks. Returns the output and where each task's rows start."""
    prompts, groups, extra, starts = [], [], [], [0]
    for ids, grp, more in parts:
        offset = max(groups, default=-1) + 1
        prompts += ids
        groups += [offset + g for g in grp]
        extra += more
        starts.append(len(prompts))
    if read:  # a prompt that is read (a dummy prompt) needs no prediction
        out = _forward(lm, prompts, groups=groups, read=extra, predict=[not r for r in extra], **engine_args)
    else:
        out = _forward(lm, prompts, groups=groups, patches=extra, **engine_args)
    return out, starts


#: On a GPU, :func:`tvlab.reproduce.run_main` runs as many tasks per engine call as keep the task
#: vectors read back to the host under this many bytes.
READ_BUDGET = 2 * 2**30


def tasks_per_call(lm: LanguageModel, config: ExperimentConfig) -> int:
    """How many tasks :func:`tvlab.reproduce.run_main` runs together (:func:`run_prepared_tasks`).

    On a CUDA GPU: as many as keep the hidden states read back (float32, every layer, for each
    set and baseline prompt) under :data:`READ_BUDGET`, e.g. 11 tasks of LLaMA-7B's shape or all
    of Gemma 3 270M's with the default settings. Otherwise 1: on a CPU (its batches are full with
    one task already), through a backend (nnsight: one request per task keeps each request small)
    and on the plain path (``fast_path=False``: one prompt per forward pass anyway). An interrupted
    run resumes from its last finished block, so a block is also what an interruption can lose:
    on a GPU a few seconds to minutes of work.
    """
    if lm.device.type != "cuda" or lm.backend is not None or not config.fast_path:
        return 1
    prompts = config.n_dev * config.n_dummies + config.n_test * (1 + config.n_dummies) + config.n_baseline
    return max(1, READ_BUDGET // (prompts * lm.n_layers * lm.d_model * 4))


def run_prepared_tasks(lm: LanguageModel, prepared: Sequence[tuple[Task, FilterReport]], config: ExperimentConfig,
                       stats: ForwardStats | None = None) -> list[TaskRun]:
    """:func:`run_prepared_task` on several tasks at once, in three engine calls however many tasks.

    Each call holds every task's prompts of that step, so a GPU runs few, large batches
    instead of three calls' worth of small ones per task (:func:`tvlab.reproduce.run_main`
    runs blocks of tasks this way on a GPU). The predictions are those of one task at a time (in
    float32; in bfloat16 other batches can flip a rare near-tie, as another ``batch_size`` can).
    """
    stats = stats if stats is not None else ForwardStats()
    if not prepared:
        return []
    fmt = prompt_format(lm, config)
    engine_args = {"batch_size": config.batch_size, "stats": stats, "fast": config.fast_path}
    plans = [_plan(lm, task, report, config, fmt) for task, report in prepared]
    _check_context(lm, [ids for plan in plans for ids in plan.sets])

    # 1. Every set prompt and baseline prompt; θ is read from the dummy prompts, which need no prediction.
    out, starts = _call(lm, [(plan.sets, plan.groups(), [r == "dummy" for r in plan.role] + [False] * len(plan.base))
                             for plan in plans], engine_args, read=True)
    thetas, icl, baseline = [], [], []
    for plan, a in zip(plans, starts):
        n_sets, n_prompts = len(plan.dev) + len(plan.test), len(plan.owner)
        ids, theta = _set_outputs(lm, n_sets, plan.owner, plan.role, out.top_ids[a:a + n_prompts],
                                  out.hidden[a:a + n_prompts])
        thetas.append(theta)
        icl.append(ids[len(plan.dev):])
        baseline.append(out.top_ids[a + n_prompts:a + n_prompts + len(plan.base)].tolist())

    # 2. The layer sweep: each dev query patched with its own set's θ at every layer.
    layers = list(range(lm.n_layers))
    out, starts = _call(lm, [_patched(plan.dev_zero, theta[:len(plan.dev)], layers) for plan, theta in zip(plans, thetas)],
                        engine_args)
    sweeps, best = [], []
    for plan, a in zip(plans, starts):
        sweep = out.top_ids[a:a + len(plan.dev) * len(layers)].view(len(plan.dev), len(layers))
        rows = _layer_rows(lm, plan.task, [s.query for s in plan.dev], sweep)
        sweeps.append(rows)
        best.append(int(pd.DataFrame(rows).groupby("layer")["correct"].mean().idxmax()))  # ties -> the earliest layer

    # 3. Each test query patched with its own set's θ at its task's best dev layer.
    out, starts = _call(lm, [_patched(plan.test_zero, theta[len(plan.dev):], [layer])
                             for plan, theta, layer in zip(plans, thetas, best)], engine_args)
    runs = []
    for plan, a, rows, layer, icl_ids, base_ids in zip(plans, starts, sweeps, best, icl, baseline):
        test_q = [s.query for s in plan.test]
        rows = rows + _rows(plan.task, lm, "test", "icl", None, test_q, icl_ids)
        rows += _rows(plan.task, lm, "test", "task_vector", layer, test_q, out.top_ids[a:a + len(test_q)].tolist())
        rows += _rows(plan.task, lm, "test", "baseline", None, plan.base, base_ids)
        predictions = pd.DataFrame(rows)
        predictions["layer"] = predictions["layer"].astype("Int64")
        runs.append(TaskRun(plan.task.name, plan.task.category, predictions, plan.report, layer, config, stats))
    return runs


# --------------------------------------------------------------------------- tables

#: The columns of a predictions frame (``TaskRun.predictions``) that the summaries read.
_PREDICTION_COLUMNS = ("task", "category", "split", "method", "layer", "correct")


def layer_accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """Task-vector accuracy by layer on dev sets: columns task, category, layer, accuracy."""
    _check_frame(predictions, _PREDICTION_COLUMNS, "layer_accuracy", "run.predictions (one row per prediction)")
    dev = predictions[(predictions["split"] == "dev") & (predictions["method"] == "task_vector")]
    return (dev.groupby(["task", "category", "layer"], sort=False)["correct"].mean()
            .rename("accuracy").reset_index())


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95 % for z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0/n or n/n,
    which matters for accuracies over 20-50 sets.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci(predictions: pd.DataFrame, by: Sequence[str] = ("task", "method")) -> pd.DataFrame:
    """Accuracy with its 95 % Wilson interval, from the per-prediction frame: columns ``by``, accuracy, lo, hi, n."""
    rows = []
    for key, group in predictions.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        k, n = int(group["correct"].sum()), len(group)
        lo, hi = wilson_interval(k, n)
        rows.append({**dict(zip(by, key)), "accuracy": k / n, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows)


def summarize(predictions: pd.DataFrame, ci: bool = False) -> pd.DataFrame:
    """One row per task: baseline, ICL and task-vector accuracy on test, best layer, TV/ICL.

    ``ci=True`` adds ``baseline ±``, ``icl ±`` and ``task_vector ±``: the half-width of each
    accuracy's 95 % interval (Wilson; the larger side), so a table shows what is within noise.
    """
    _check_frame(predictions, _PREDICTION_COLUMNS, "summarize", "run.predictions, or pd.concat of several runs' predictions")
    test = predictions[predictions["split"] == "test"]
    acc = test.pivot_table(index=["task", "category"], columns="method", values="correct", aggfunc="mean", sort=False)
    best = test[test["method"] == "task_vector"].groupby(["task", "category"], sort=False)["layer"].first()
    table = acc.reindex(columns=["baseline", "icl", "task_vector"]).assign(best_layer=best.astype(int))
    table["tv_over_icl"] = table["task_vector"] / table["icl"].where(table["icl"] > 0)
    table.columns.name = None
    table = table.reset_index()
    if ci:
        bounds = accuracy_ci(test, by=("task", "method")).set_index(["task", "method"])
        half = (bounds["hi"] - bounds["accuracy"]).combine(bounds["accuracy"] - bounds["lo"], max)
        for method in ("baseline", "icl", "task_vector"):
            table.insert(table.columns.get_loc(method) + 1, f"{method} ±",
                         [half.get((t, method), float("nan")) for t in table["task"]])
    return table


def category_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Means over tasks by category, and over all tasks (the paper's averages are over tasks).

    If ``summary`` has the ``±`` columns of ``summarize(..., ci=True)``, so does the result: the
    tasks' independent sampling errors combined, sqrt(sum of squares) / number of tasks.
    """
    cols = ["baseline", "icl", "task_vector"]
    _check_frame(summary, ["category", *cols], "category_means", "run.summary, or tvlab.summarize(predictions)")
    by_cat = summary.groupby("category", sort=False)[cols].mean()
    by_cat.loc["all tasks"] = summary[cols].mean()
    by_cat["tv_over_icl"] = by_cat["task_vector"] / by_cat["icl"].where(by_cat["icl"] > 0)
    by_cat["n_tasks"] = summary.groupby("category", sort=False).size().reindex(by_cat.index).fillna(len(summary)).astype(int)
    for col in [c for c in cols if f"{c} ±" in summary]:
        def combined(half: pd.Series) -> float:
            return float((half ** 2).sum() ** 0.5 / len(half))
        half = summary.groupby("category", sort=False)[f"{col} ±"].apply(combined)
        half.loc["all tasks"] = combined(summary[f"{col} ±"])
        by_cat.insert(by_cat.columns.get_loc(col) + 1, f"{col} ±", half.reindex(by_cat.index))
    return by_cat.reset_index()
