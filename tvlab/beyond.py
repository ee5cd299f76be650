"""Beyond the paper: the questions it leaves open, each one function that returns a tidy frame.

>>> from tvlab import beyond
>>> lm = tvlab.load_model("tiny-llama")   # 4 layers; tvlab.load_model() loads Gemma 3 270M (18: try layer 10)
>>> beyond.accuracy_vs_sets(lm, "antonyms", layer=2).columns.tolist()    # θ averaged over many S, vs one S
['task', 'n_demos', 'n_sets', 'repeat', 'accuracy']
>>> beyond.replace_vs_add(lm, "antonyms", layer=2)["method"].unique().tolist()   # overwrite (the paper) vs add
['baseline', 'replace θ', 'add θ', 'add Δ']
>>> beyond.multi_token_answers(lm, "country_capital", 2).columns.tolist()   # exact match of whole answers
['task', 'method', 'query', 'expected', 'generated', 'exact', 'first_word']
>>> beyond.portability(lm, "country_capital", 2)["target"].unique().tolist()   # θ from one format used in another
['paper', 'arrow', 'qa', 'natural']
>>> beyond.composition(lm, layer_a=1, layer_b=2).columns.tolist()   # next_letter then to_upper: two vectors at once
['method', 'as_composite', 'as_next_letter', 'as_to_upper', 'n']
>>> bank = beyond.build_bank(lm, ["antonyms", "country_capital"]); path = bank.save("bank.safetensors")
>>> theta, layer = bank.vectors["country_capital"], bank.layers["country_capital"]
>>> text = beyond.generate(lm, "example:France->", theta, layer)   # several tokens, θ patched into the prompt only
>>> answer = beyond.VectorBank.load("bank.safetensors").apply(lm, "antonyms", "happy")   # the patched answer

Each experiment keeps its test queries out of every demonstration set it averages, so an
averaged θ never saw the answer it is tested on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ._checks import as_list, count, counts, file_to_write, text as check_text
from .engine import generate_greedy, predict_last
from .experiments import (ExperimentConfig, icl_and_task_vectors, layer_sweep, prepare_task, prompt_format,
                          zero_shot_predictions)
from .models import LanguageModel, decode_token
from .prompts import PromptFormat, get_format, sample_sets, tokenize
from .tasks import Pair, Task, TaskError, as_task_list, get_task

#: Natural sentences that end where the answer starts ({x} is the query), for :func:`portability`.
NATURAL_TEMPLATES: dict[str, str] = {
    "country_capital": "The capital of {x} is",
    "location_continent": "{x} is a place on the continent of",
    "location_religion": "The main religion in {x} is",
    "person_language": "The native language of {x} was",
    "antonyms": "The opposite of {x} is",
    "en_fr": "In French, the word {x} is",
    "en_es": "In Spanish, the word {x} is",
    "fr_en": "In English, the French word {x} is",
    "es_en": "In English, the Spanish word {x} is",
    "present_simple_past_simple": "The past tense of {x} is",
    "present_simple_gerund": "The -ing form of {x} is",
    "plural_singular": "The singular of {x} is",
    "to_upper": "The capital letter of {x} is",
    "to_lower": "The small letter of {x} is",
    "next_letter": "In the alphabet, the letter after {x} is",
    "prev_letter": "In the alphabet, the letter before {x} is",
}


# --------------------------------------------------------------------------- shared pieces

def _split(task: Task, n_test: int, seed: int) -> tuple[list[Pair], Task]:
    """``n_test`` test pairs, and the task without them (the pool every demonstration set comes from)."""
    rng = np.random.default_rng([seed, 8])
    order = rng.permutation(len(task.pairs))
    if len(task.pairs) <= n_test:
        raise TaskError(f"task {task.name!r} has {len(task.pairs)} usable pairs; {n_test} test queries leave none "
                        "for demonstrations. Use a smaller n_test.")
    test = [task.pairs[i] for i in order[:n_test]]
    pool = task.with_pairs((task.pairs[i] for i in order[n_test:]), note=f"without its {n_test} test queries")
    return test, pool


def _accuracy(lm: LanguageModel, task: Task, pairs: Sequence[Pair], ids) -> float:
    return float(np.mean([task.score(decode_token(lm, int(t)), p) for t, p in zip(ids, pairs)]))


def _patched(lm: LanguageModel, queries: Sequence[Pair], fmt: PromptFormat, vectors: torch.Tensor, layer: int,
             batch_size: int | None = None) -> torch.Tensor:
    """Zero-shot predictions with ``vectors[i]`` ([n, d] or [d]) written over query i's last state at ``layer``."""
    vectors = vectors.expand(len(queries), -1) if vectors.dim() == 1 else vectors
    thetas = torch.zeros(len(queries), lm.n_layers, lm.d_model)
    thetas[:, layer] = vectors.float().cpu()
    return zero_shot_predictions(lm, queries, fmt, thetas=thetas, layers=[layer], batch_size=batch_size)[:, 0]


def _zero_shot_run(lm: LanguageModel, queries: Sequence[Pair], fmt: PromptFormat, batch_size: int | None = None,
                   predict: bool = True):
    """The zero-shot prompts, run once: ``.top_ids`` (the baseline; -1 unless ``predict``) and ``.hidden``
    ``[n, n_layers, d_model]``."""
    prompts = [tokenize(lm.tokenizer, fmt, (), q.input).ids for q in queries]
    return predict_last(lm, prompts, read=True, predict=predict, batch_size=batch_size)


def _zero_shot_states(lm: LanguageModel, queries: Sequence[Pair], fmt: PromptFormat, batch_size: int | None = None):
    """Every block's output at the last token of each zero-shot prompt: ``[n, n_layers, d_model]``."""
    return _zero_shot_run(lm, queries, fmt, batch_size, predict=False).hidden


def _best_layer(lm: LanguageModel, task: Task, config: ExperimentConfig) -> int:
    sweep = layer_sweep(lm, [task], config)
    return int(sweep.set_index("layer")["accuracy"].idxmax())


# --------------------------------------------------------------------------- many-S task vectors

def accuracy_vs_sets(lm: LanguageModel, task: str | Task, layer: int, n_sets: Sequence[int] = (1, 2, 4, 8, 16),
                     n_demos: Sequence[int] = (1, 3, 5), n_test: int = 30, n_repeats: int = 3,
                     seed: int = 41, fmt: str = "paper") -> pd.DataFrame:
    """Task-vector accuracy when θ is the mean over k demonstration sets, for each k and set size.

    For every number of demonstrations d and every repeat, ``max(n_sets)`` fresh sets of d
    demonstrations give one θ each at ``layer``; the first k of them are averaged and that one
    vector is patched into all ``n_test`` zero-shot test prompts. Returns one row per
    (n_demos, n_sets, repeat): accuracy.
    """
    n_sets, n_demos = counts(n_sets, "n_sets"), counts(n_demos, "n_demos")
    n_test, n_repeats = count(n_test, "n_test"), count(n_repeats, "n_repeats")
    lm.check_layer(layer)
    config = ExperimentConfig(n_demos=max(n_demos), format=fmt, seed=seed)
    task, _ = prepare_task(lm, task, config)
    test, pool = _split(task, n_test, seed)
    fmt_ = prompt_format(lm, config)
    k_max = max(n_sets)
    rows = []
    for d in n_demos:
        sets = sample_sets(pool, k_max * n_repeats, d, seed, f"many-sets-{d}", config.n_dummies)
        _, thetas = icl_and_task_vectors(lm, sets, fmt_, with_icl=False)
        for r in range(n_repeats):
            block = thetas[r * k_max:(r + 1) * k_max, layer]
            for k in n_sets:
                ids = _patched(lm, test, fmt_, block[:k].mean(0), layer)
                rows.append({"task": task.name, "n_demos": d, "n_sets": k, "repeat": r,
                             "accuracy": _accuracy(lm, task, test, ids)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- replace vs add

def replace_vs_add(lm: LanguageModel, task: str | Task, layer: int, scales: Sequence[float] = (0.5, 1, 2, 4, 8),
                   n_sets: int = 16, n_test: int = 30, seed: int = 41, fmt: str = "paper") -> pd.DataFrame:
    """Overwrite the last hidden state with θ (the paper), or add a vector to it, scaled.

    θ is the mean over ``n_sets`` sets. Methods: ``replace θ``; ``add θ`` (α·θ added);
    ``add Δ``, where Δ = mean θ(S) - mean zero-shot state of the same dummy queries: the
    difference that the demonstrations make at that layer (function-vector style). Also the
    zero-shot ``baseline``. Returns one row per method and scale: accuracy.
    """
    scales = as_list(scales, "scales")
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in scales):
        raise ValueError(f"scales must be numbers (the factors α of the added vector), got {scales!r}.")
    n_sets, n_test = count(n_sets, "n_sets"), count(n_test, "n_test")
    lm.check_layer(layer)
    config = ExperimentConfig(format=fmt, seed=seed)
    task, _ = prepare_task(lm, task, config)
    test, pool = _split(task, n_test, seed)
    fmt_ = prompt_format(lm, config)
    sets = sample_sets(pool, n_sets, config.n_demos, seed, "replace-vs-add", config.n_dummies)
    _, thetas = icl_and_task_vectors(lm, sets, fmt_, with_icl=False)
    theta = thetas[:, layer].mean(0)
    dummies = [d for s in sets for d in s.dummies]
    delta = theta - _zero_shot_states(lm, dummies, fmt_)[:, layer].mean(0)
    zero = _zero_shot_run(lm, test, fmt_)  # the baseline, and each prompt's own state
    own, base = zero.hidden[:, layer], zero.top_ids  # adding v = writing (own state + v)
    rows = [{"task": task.name, "method": "baseline", "scale": 0.0, "accuracy": _accuracy(lm, task, test, base)},
            {"task": task.name, "method": "replace θ", "scale": 1.0,
             "accuracy": _accuracy(lm, task, test, _patched(lm, test, fmt_, theta, layer))}]
    for method, vector in (("add θ", theta), ("add Δ", delta)):
        for a in scales:
            ids = _patched(lm, test, fmt_, own + a * vector, layer)
            rows.append({"task": task.name, "method": method, "scale": float(a), "accuracy": _accuracy(lm, task, test, ids)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- several tokens

def generate(lm: LanguageModel, text: str, theta: torch.Tensor | None = None, layer: int | None = None,
             max_new_tokens: int = 8, stop: str = "\n", mode: str = "replace") -> str:
    """Greedy continuation of ``text``; θ is patched at ``layer`` over the prompt's last token only.

    The prompt runs once with the patch and fills the key/value cache; every generated token
    then runs on that cache without any patch, so later steps see θ only through the cache,
    as they would see demonstrations. Stops at ``stop`` (a newline by default).
    """
    check_text(text, "text", "the prompt to continue")
    max_new_tokens = count(max_new_tokens, "max_new_tokens")
    if theta is not None:
        if layer is None:
            raise ValueError("give the layer to patch θ at (e.g. the task's best layer).")
        lm.check_layer(layer)
    patches = [(layer, theta)] if theta is not None else []
    ids = lm.tokenizer(text).input_ids
    generated = generate_greedy(lm, ids, patches=patches, mode=mode, max_new_tokens=max_new_tokens, stop=stop)
    text_out = lm.tokenizer.decode(generated)
    return text_out.split(stop)[0] if stop else text_out


def multi_token_answers(lm: LanguageModel, task: str | Task, layer: int, n_test: int = 20, n_sets: int = 1,
                        max_new_tokens: int = 8, seed: int = 41, fmt: str = "paper") -> pd.DataFrame:
    """Whole-answer exact match for answers of several tokens: ICL, task vector, baseline.

    Test queries are pairs whose answer is **more** than one token for this model (the
    paper's protocol drops them). Demonstrations and dummies come from the other pairs. The
    task vector of each test query is its own set's θ (as in the paper), or the mean of
    ``n_sets`` sets. Returns one row per query and method: query, expected, generated,
    exact (the whole answer), first_word (the generated text starts with the answer's first word).
    """
    from .prompts import answer_token_counts

    n_test, n_sets = count(n_test, "n_test"), count(n_sets, "n_sets")
    max_new_tokens = count(max_new_tokens, "max_new_tokens")
    task = task if isinstance(task, Task) else get_task(task)
    lm.check_layer(layer)
    config = ExperimentConfig(format=fmt, seed=seed)
    fmt_ = prompt_format(lm, config)
    counts = answer_token_counts(lm.tokenizer, fmt_, task.pairs)
    long = [p for p, c in zip(task.pairs, counts) if c > 1]
    if not long:
        raise TaskError(f"every answer of {task.name!r} is one token for {lm.name}: nothing to generate.")
    rng = np.random.default_rng([seed, 9])
    test = [long[i] for i in rng.permutation(len(long))[:n_test]]
    pool = task.with_pairs((p for p in task.pairs if p not in test), note="without the test queries")
    sets = sample_sets(pool, len(test) * n_sets, config.n_demos, seed, "multi-token", config.n_dummies)
    _, thetas = icl_and_task_vectors(lm, sets, fmt_, with_icl=False)
    rows = []
    for i, pair in enumerate(test):
        own = sets[i * n_sets:(i + 1) * n_sets]
        theta = thetas[i * n_sets:(i + 1) * n_sets, layer].mean(0)
        zero = fmt_.render([], pair.input)
        for method, text, vector in (("icl", fmt_.render(own[0].demos, pair.input), None),
                                     ("task_vector", zero, theta), ("baseline", zero, None)):
            out = generate(lm, text, vector, layer if vector is not None else None, max_new_tokens).strip()
            rows.append({"task": task.name, "method": method, "query": pair.input, "expected": pair.output,
                         "generated": out, "exact": out in pair.answers,
                         "first_word": bool(out) and out.split()[0] == pair.output.split()[0]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- portability

def _target_format(lm: LanguageModel, task: Task, target: str) -> PromptFormat:
    if target != "natural":
        return get_format(target).with_prefix(lm.prompt_prefix)
    if task.name not in NATURAL_TEMPLATES:
        raise TaskError(f"no natural sentence for {task.name!r}; add one to tvlab.beyond.NATURAL_TEMPLATES.")
    return PromptFormat("natural", NATURAL_TEMPLATES[task.name] + " {y}", "\n", lm.prompt_prefix)


def _single_token_in_all(lm: LanguageModel, task: Task, formats, need: int) -> Task:
    """The pairs whose answer is one token in every format: a format that puts a space before the
    answer can split an answer that is one token after an arrow, and first-token scoring would then
    count a right answer as wrong."""
    from .prompts import answer_token_counts

    ok = [True] * len(task.pairs)
    for fmt in formats:
        counts = answer_token_counts(lm.tokenizer, fmt, task.pairs)
        ok = [k and (c >= 1 if task.scoring == "prefix" else c == 1) for k, c in zip(ok, counts)]
    kept = [p for p, k in zip(task.pairs, ok) if k]
    if len(kept) < need:
        raise TaskError(f"only {len(kept)} pairs of {task.name!r} have one-token answers in every format "
                        f"({', '.join(f.name for f in formats)}); {need} are needed. Use fewer test queries or formats.")
    return task.with_pairs(kept, "one-token answers in every target format")


def portability(lm: LanguageModel, task: str | Task, layer: int, source: str = "paper",
                targets: Sequence[str] = ("paper", "arrow", "qa", "natural"), n_test: int = 30,
                seed: int = 41) -> pd.DataFrame:
    """θ extracted in one prompt format, patched into zero-shot prompts of other formats.

    ``natural`` is a plain sentence that ends where the answer starts (:data:`NATURAL_TEMPLATES`,
    e.g. "The capital of France is"). For each target: the zero-shot baseline, the task
    vector (each test query gets θ of its own set in the ``source`` format, at ``layer``) and
    ICL in the target format for reference (none for ``natural``). One row per target and method.
    """
    targets, n_test = as_list(targets, "targets"), count(n_test, "n_test")
    config = ExperimentConfig(format=source, seed=seed)
    task, _ = prepare_task(lm, task, config)
    lm.check_layer(layer)
    formats = {target: _target_format(lm, task, target) for target in targets}
    task = _single_token_in_all(lm, task, formats.values(), need=n_test + config.n_demos + 1 + config.n_dummies)
    test, pool = _split(task, n_test, seed)
    src = prompt_format(lm, config)
    sets = sample_sets(pool, len(test), config.n_demos, seed, "portability", config.n_dummies)
    _, thetas = icl_and_task_vectors(lm, sets, src, with_icl=False)
    rows = []
    for target, fmt in formats.items():
        methods = {"baseline": zero_shot_predictions(lm, test, fmt),
                   "task_vector": _patched(lm, test, fmt, thetas[:, layer], layer)}
        if target != "natural":
            prompts = [tokenize(lm.tokenizer, fmt, s.demos, q.input).ids for s, q in zip(sets, test)]
            methods["icl"] = predict_last(lm, prompts).top_ids
        for method, ids in methods.items():
            rows.append({"task": task.name, "target": target, "method": method, "accuracy": _accuracy(lm, task, test, ids),
                         "example": fmt.render([], test[0].input)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- composition

def _shift_letter(c: str) -> str | None:
    if c.isalpha() and c.isascii() and c.lower() != "z":
        return chr(ord(c) + 1)
    return None


def composition(lm: LanguageModel, layer_a: int, layer_b: int, task_a: str = "next_letter", task_b: str = "to_upper",
                n_sets: int = 16, n_test: int = 12, seed: int = 41, fmt: str = "paper") -> pd.DataFrame:
    """Can two task vectors make a composite task? Default: next_letter then to_upper (a -> B).

    Test queries are lower-case letters (a..y). θ_a and θ_b are means over ``n_sets`` sets of
    each task. Methods: ICL with composite demonstrations; θ_a alone at ``layer_a``; θ_b alone
    at ``layer_b``; both, θ_a at ``layer_a`` and θ_b at ``layer_b`` in one pass (when the
    layers differ); their average at ``layer_b``; and their task parts added, z + (θ_a - z) +
    (θ_b - z) at ``layer_b``, with z the mean zero-shot state of the queries there. Every
    prediction is scored as the composite answer, as A's and as B's. One row per method.
    """
    if (task_a, task_b) != ("next_letter", "to_upper"):
        raise ValueError("composition knows the composite answers of next_letter then to_upper only.")
    n_sets, n_test = count(n_sets, "n_sets"), count(n_test, "n_test")
    if n_test > 25:
        raise ValueError(f"composition tests the lower-case letters a-y: n_test can be at most 25, got {n_test}.")
    lm.check_layer(layer_a)
    lm.check_layer(layer_b)
    config = ExperimentConfig(format=fmt, seed=seed)
    fmt_ = prompt_format(lm, config)
    letters = [c for c in "abcdefghijklmnopqrstuvwxy"]
    rng = np.random.default_rng([seed, 10])
    test_letters = [letters[i] for i in rng.permutation(len(letters))[:n_test]]
    composite = Task("next_then_upper", "algorithmic",
                     tuple(Pair(c, _shift_letter(c).upper()) for c in letters))
    test = [p for p in composite.pairs if p.input in test_letters]
    vectors = {}
    for name in (task_a, task_b):
        t, _ = prepare_task(lm, name, config)
        pool = t.with_pairs((p for p in t.pairs if p.input not in test_letters), note="without the test letters")
        _, thetas = icl_and_task_vectors(lm, sample_sets(pool, n_sets, config.n_demos, seed, "composition",
                                                         config.n_dummies), fmt_, with_icl=False)
        vectors[name] = thetas
    th_a, th_b = vectors[task_a], vectors[task_b]
    z = _zero_shot_states(lm, test, fmt_)[:, layer_b].mean(0)
    icl_prompts = []
    for q in test:  # composite demonstrations: any letters but the query
        others = [p for p in composite.pairs if p.input != q.input]
        demos = [others[i] for i in rng.choice(len(others), config.n_demos, replace=False)]
        icl_prompts.append(tokenize(lm.tokenizer, fmt_, demos, q.input).ids)
    icl = predict_last(lm, icl_prompts).top_ids
    methods = {"icl (composite demonstrations)": icl,
               f"θ {task_a} alone (layer {layer_a})": _patched(lm, test, fmt_, th_a[:, layer_a].mean(0), layer_a),
               f"θ {task_b} alone (layer {layer_b})": _patched(lm, test, fmt_, th_b[:, layer_b].mean(0), layer_b)}
    if layer_a != layer_b:
        methods[f"θ {task_a} at {layer_a} + θ {task_b} at {layer_b}"] = _two_layers(
            lm, test, fmt_, [(layer_a, th_a[:, layer_a].mean(0)), (layer_b, th_b[:, layer_b].mean(0))])
    mean_ab = (th_a[:, layer_b].mean(0) + th_b[:, layer_b].mean(0)) / 2
    summed = th_a[:, layer_b].mean(0) + th_b[:, layer_b].mean(0) - z
    methods[f"average of both (layer {layer_b})"] = _patched(lm, test, fmt_, mean_ab, layer_b)
    methods[f"task parts added (layer {layer_b})"] = _patched(lm, test, fmt_, summed, layer_b)
    rows = []
    for method, ids in methods.items():
        guesses = [decode_token(lm, int(t)).strip() for t in ids]
        rows.append({"method": method,
                     "as_composite": float(np.mean([g == p.output for g, p in zip(guesses, test)])),
                     f"as_{task_a}": float(np.mean([g == _shift_letter(p.input) for g, p in zip(guesses, test)])),
                     f"as_{task_b}": float(np.mean([g == p.input.upper() for g, p in zip(guesses, test)])),
                     "n": len(test)})
    return pd.DataFrame(rows)


def _two_layers(lm: LanguageModel, queries: Sequence[Pair], fmt: PromptFormat,
                patches: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Zero-shot predictions with several (layer, vector) patches at the last token of every query."""
    prompts = [tokenize(lm.tokenizer, fmt, (), q.input).ids for q in queries]
    return predict_last(lm, prompts, patches=[list(patches)] * len(prompts)).top_ids


# --------------------------------------------------------------------------- a bank of vectors

@dataclass
class VectorBank:
    """One task vector per task (a mean over many sets, at the task's best layer), with its settings."""

    vectors: dict[str, torch.Tensor]
    layers: dict[str, int]
    settings: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.vectors)

    def save(self, path: str | Path) -> Path:
        """One .safetensors file; layers and settings go in its metadata."""
        from safetensors.torch import save_file

        path = file_to_write(path, "the bank")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({t: v.contiguous().float().cpu() for t, v in self.vectors.items()}, str(tmp),
                  metadata={"layers": json.dumps(self.layers), "settings": json.dumps(self.settings)})
        tmp.replace(path)  # never a half-written bank under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VectorBank":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no vector bank at {path}; build one with tvlab.beyond.build_bank(lm, tasks).")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                vectors = {k: f.get_tensor(k) for k in f.keys()} if "layers" in meta else None
        except Exception as e:  # not a safetensors file at all
            raise ValueError(f"{path} is not a safetensors file of a tvlab vector bank ({e}).") from None
        if vectors is None:
            raise ValueError(f"{path} is not a tvlab vector bank (no layers in its metadata).")
        return cls(vectors, {k: int(v) for k, v in json.loads(meta["layers"]).items()}, json.loads(meta["settings"]))

    def _check(self, lm: LanguageModel, task: str) -> None:
        if task not in self.vectors:
            raise KeyError(f"no vector for {task!r} in this bank; it holds {', '.join(self.tasks)}.")
        made_with = self.settings.get("model")
        if made_with and made_with != lm.name:
            raise ValueError(f"this bank was made with {made_with!r}; a task vector only means something in the model "
                             f"that made it, and this is {lm.name!r}. Build a bank for it with build_bank.")

    def prompt(self, lm: LanguageModel, query: str, fmt: str | None = None) -> str:
        """The zero-shot prompt for ``query`` in the bank's format (or ``fmt``)."""
        stored = self.settings.get("format", "paper")  # a format's name, or a PromptFormat of one's own as a dict
        stored = PromptFormat(**stored) if isinstance(stored, dict) else stored
        return get_format(fmt or stored).with_prefix(lm.prompt_prefix).render([], query)

    def apply(self, lm: LanguageModel, task: str, query: str, max_new_tokens: int = 1, fmt: str | None = None) -> str:
        """The zero-shot prompt for ``query`` with the bank's θ of ``task`` patched in: the answer."""
        self._check(lm, task)
        return generate(lm, self.prompt(lm, query, fmt), self.vectors[task], self.layers[task], max_new_tokens).strip()


def build_bank(lm: LanguageModel, tasks: Sequence[str], n_sets: int = 16, config: ExperimentConfig | None = None) -> VectorBank:
    """θ of each task averaged over ``n_sets`` sets, at its best layer on ``config.n_dev`` dev sets."""
    tasks, n_sets = as_task_list(tasks, distinct=True), count(n_sets, "n_sets")
    config = config or ExperimentConfig(n_dev=16)
    fmt_ = prompt_format(lm, config)
    vectors, layers = {}, {}
    for name in tasks:
        task, _ = prepare_task(lm, name, config)
        layers[task.name] = _best_layer(lm, task, config)
        sets = sample_sets(task, n_sets, config.n_demos, config.seed, "bank", config.n_dummies)
        _, thetas = icl_and_task_vectors(lm, sets, fmt_, with_icl=False)
        vectors[task.name] = thetas[:, layers[task.name]].mean(0)
    settings = {"model": lm.name, "n_sets": n_sets, "n_dev": config.n_dev, "n_demos": config.n_demos,
                "seed": config.seed, "format": config.format if isinstance(config.format, str) else asdict(config.format),
                "dtype": str(lm.dtype).removeprefix("torch.")}
    return VectorBank(vectors, layers, settings)
