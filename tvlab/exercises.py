"""Checks for the notebooks' exercises: each tests a student's function against the library.

>>> from tvlab import exercises
>>> def my_build_prompt(demos, query):
...     return "\\n".join([f"example:{p.input}->{p.output}" for p in demos] + [f"example:{query}->"])
>>> exercises.check_build_prompt(my_build_prompt)
PASS: build_prompt writes the paper's prompt format.
True
>>> exercises.check_build_prompt(lambda demos, query: query)   # doctest: +ELLIPSIS
FAIL: for 2 demonstrations and query 'big' you returned 'big'; expected 'example:hot->cold...
  Hint: one line 'example:{input}->{output}' per demonstration, ...
False

Every check prints PASS or FAIL with a hint, and returns True or False, so a course can
grade a notebook by running it. The reference solutions live only in the
source notebooks (nbgrader solution cells); ``tvlab course release`` turns them into stubs.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from .experiments import extract_task_vector, layer_accuracy
from .models import LanguageModel
from .prompts import FORMATS
from .tasks import Pair, get_task


def _report(ok: bool, passed: str, failed: str, hint: str) -> bool:
    print(f"PASS: {passed}" if ok else f"FAIL: {failed}\n  Hint: {hint}")
    return ok


def _shown(got, err: str | None) -> str:
    """What the student's function gave, for a FAIL line: its value, and the error if it raised."""
    return f"{got!r} ({err})" if err else f"{got!r}"


def _call(fn: Callable, *args):
    try:
        return fn(*args), None
    except Exception as e:  # a student's bug: report it, don't crash the notebook
        return None, f"{type(e).__name__}: {e}"


def check_top_token(fn: Callable, lm: LanguageModel, texts: list[str] | None = None) -> bool:
    """00: ``fn(lm, text) -> str`` returns the most likely next token, decoded (spaces kept).

    The expected token comes from the student's own code path (one plain forward of ``text`` as the
    tokenizer encodes it, argmax at the last position), so the check holds in float32 and bfloat16.
    """
    from .engine import predict_last_plain
    from .models import decode_token

    texts = texts or ["example:hot->cold\nexample:big->", "The capital of France is"]
    for text in texts:
        got, err = _call(fn, lm, text)
        with torch.no_grad():
            top = predict_last_plain(lm, [lm.tokenizer(text).input_ids]).top_ids[0]
        want = decode_token(lm, top)
        if err or not isinstance(got, str) or got != want:
            return _report(False, "", f"for {text!r} you returned {_shown(got, err)}, "
                           f"the model's top token is {want!r}.",
                           "run lm.model on the token ids, take logits[0, -1] (the last position), argmax, "
                           "and decode that one id with lm.tokenizer.decode([id]) (keep its spaces).")
    return _report(True, "top_token finds the model's most likely next token.", "", "")


def check_build_prompt(fn: Callable) -> bool:
    """01: ``fn(demos, query) -> str`` writes the paper's format."""
    cases = [([Pair("hot", "cold"), Pair("up", "down")], "big"), ([], "dog"), ([Pair("a", "b")], "c")]
    for demos, query in cases:
        got, err = _call(fn, demos, query)
        want = FORMATS["paper"].render(demos, query)
        if got != want:
            return _report(False, "", f"for {len(demos)} demonstrations and query {query!r} you returned "
                           f"{_shown(got, err)}; expected {want!r}.",
                           "one line 'example:{input}->{output}' per demonstration, joined by '\\n', then "
                           "'example:{query}->' with nothing after the arrow.")
    return _report(True, "build_prompt writes the paper's prompt format.", "", "")


def _plain_theta(lm: LanguageModel, demos, dummies, layer: int) -> torch.Tensor:
    """θ(S) the way a student computes it: one plain forward per dummy prompt, no batching or cache."""
    from .engine import predict_last_plain
    from .prompts import get_format, tokenize

    fmt = get_format("paper").with_prefix(lm.prompt_prefix)
    prompts = [tokenize(lm.tokenizer, fmt, demos, d.input).ids for d in dummies]
    return predict_last_plain(lm, prompts, read=True).hidden[:, layer].mean(0)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to a few rounding steps of the model's dtype (float32, bfloat16, float16), relative to |want|."""
    tol = max(1e-4, 4 * torch.finfo(dtype).eps)
    return bool((got.float().cpu() - want).abs().max() <= tol * max(1.0, float(want.abs().max())))


def check_extract_theta(fn: Callable, lm: LanguageModel, layer: int | None = None, *, task: str = "antonyms",
                        n_demos: int = 5, n_dummies: int = 2) -> bool:
    """02: ``fn(lm, demos, dummies, layer) -> tensor [d_model]`` equals θ(S) as :func:`tvlab.extract_task_vector` defines it.

    The set: the first ``n_demos`` pairs of ``task`` as demonstrations, the next ``n_dummies`` as dummy queries.
    Compared with one plain forward per dummy prompt (the student's own path), up to a few rounding steps of the
    model's dtype, so the check holds in float32 and bfloat16 alike.
    """
    pairs = get_task(task).pairs
    demos, dummies = list(pairs[:n_demos]), list(pairs[n_demos:n_demos + n_dummies])
    layer = lm.n_layers // 2 if layer is None else layer
    where = (f"at layer {layer} ({task}, {len(demos)} demonstration{'s' * (len(demos) != 1)}, "
             f"{len(dummies)} dumm{'y' if len(dummies) == 1 else 'ies'})")
    got, err = _call(fn, lm, demos, dummies, layer)
    want = _plain_theta(lm, demos, dummies, layer)
    if err or not isinstance(got, torch.Tensor):
        return _report(False, "", f"{where} your function did not return a tensor ({err or type(got).__name__}).",
                       "return a 1-D tensor of size lm.d_model: the mean over dummy prompts of the hidden state.")
    if got.shape != want.shape:
        return _report(False, "", f"{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}.",
                       "read one position (the last, -1) at one layer, and average over the dummies (dim 0).")
    if not _close(got, want, lm.dtype):
        cos = torch.nn.functional.cosine_similarity(got.float().cpu(), want, dim=0).item()
        return _report(False, "", f"{where} the vector differs from tvlab's (cosine similarity {cos:.3f}).",
                       "use the prompt S + x' (demonstrations, then a dummy query, not the test query), read "
                       "the output of block `layer` at the last token, and average over all dummies. "
                       "Remember lm.prompt_prefix.")
    return _report(True, f"extract_theta matches tvlab's θ(S) {where}.", "", "")


def check_patched_prediction(fn: Callable, lm: LanguageModel, layer: int | None = None, *, task: str = "antonyms",
                             queries: int = 3) -> bool:
    """02: ``fn(lm, query, theta, layer) -> str`` equals the library's patched prediction.

    θ comes from the first 5 pairs of ``task`` (dummies: the next 2); ``queries`` inputs after those are
    predicted. The expected token comes from one plain forward pass per prompt (the student's own path), so
    the check holds in float32 and bfloat16 alike.
    """
    from .engine import predict_last_plain
    from .models import decode_token
    from .prompts import get_format, tokenize

    pairs = get_task(task).pairs
    layer = lm.n_layers // 2 if layer is None else layer
    theta = extract_task_vector(lm, pairs[:5], pairs[5:7], layer)
    fmt = get_format("paper").with_prefix(lm.prompt_prefix)
    for pair in pairs[10:10 + queries]:
        ids = tokenize(lm.tokenizer, fmt, (), pair.input).ids
        want = decode_token(lm, int(predict_last_plain(lm, [ids], patches=[(layer, theta)]).top_ids[0]))
        got, err = _call(fn, lm, pair.input, theta, layer)
        if err or got is None or str(got).strip() != want.strip():
            return _report(False, "", f"for {pair.input!r} ({task}, θ at layer {layer}) you predicted "
                           f"{_shown(got, err)}; patching gives {want!r}.",
                           "build the zero-shot prompt lm.prompt_prefix + 'example:{query}->', run it inside "
                           "tvlab.patch_hidden(lm, layer, position=-1, value=theta), and decode the argmax "
                           "of the last position's logits.")
    return _report(True, f"patched_prediction reproduces the task-vector prediction at layer {layer} ({task}).", "", "")


def check_best_layers(fn: Callable, by_layer: pd.DataFrame | None = None) -> bool:
    """03: ``fn(by_layer) -> {task: layer}`` picks the best dev layer per task (earliest on ties)."""
    if by_layer is None:
        rows = []
        for task, accs in {"a": [0.1, 0.5, 0.9, 0.2], "b": [0.3, 0.7, 0.7, 0.1], "c": [0.0, 0.0, 0.0, 0.0]}.items():
            rows += [{"task": task, "category": "custom", "split": "dev", "method": "task_vector", "layer": layer,
                      "correct": acc} for layer, acc in enumerate(accs)]
        by_layer = layer_accuracy(pd.DataFrame(rows))
    got, err = _call(fn, by_layer)
    want = {t: int(r.sort_values("layer").set_index("layer")["accuracy"].idxmax())
            for t, r in by_layer.groupby("task", sort=False)}
    try:
        same = isinstance(got, dict) and {k: int(v) for k, v in got.items()} == want
    except (TypeError, ValueError):  # a value that is no layer number
        same = False
    if err or not same:
        return _report(False, "", f"you returned {_shown(got, err)}; expected {want}.",
                       "group by task and take the layer of the highest accuracy; on a tie the earliest layer "
                       "wins (idxmax after sorting by layer does exactly that).")
    return _report(True, "best_layers picks each task's best dev layer.", "", "")


def check_mean_within_task_distance(fn: Callable, bank, layers: tuple[int, ...] = (0, 10)) -> bool:
    """04: ``fn(bank, layer) -> float`` equals ``geometry.distance_summary(bank, layer)["within"]``.

    The reference is computed in float64: the distances of a small model's raw vectors are tiny (1 - a cosine
    close to 1), so a float32 computation is off by about 1e-6; a float32 or float64 answer passes.
    """
    import math

    import numpy as np

    from .geometry import _cosine_distance_matrix

    tasks = bank.labels["task"].to_numpy()
    same = (tasks[:, None] == tasks[None, :]) & ~np.eye(len(tasks), dtype=bool)
    for layer in layers:
        want = float(_cosine_distance_matrix(bank.at(layer).astype(np.float64))[same].mean())
        got, err = _call(fn, bank, layer)
        try:
            ok = err is None and got is not None and math.isclose(float(got), want, rel_tol=1e-3, abs_tol=2e-6)
        except (TypeError, ValueError, RuntimeError):
            ok = False
        if not ok:
            return _report(False, "", f"at layer {layer} you returned {_shown(got, err)}; "
                           f"expected about {want:.3f}.",
                           "cosine distance = 1 - (unit rows) @ (unit rows).T; average the entries with equal "
                           "tasks, diagonal excluded.")
    return _report(True, "mean_within_task_distance matches geometry.distance_summary.", "", "")


def check_winner(fn: Callable) -> bool:
    """05: ``fn(frame) -> 'A' | 'B' | 'neither'``, judged on the task_vector row of a conflicts frame."""
    cases = [((.9, .0), (.1, .8), "B"), ((.9, .0), (.7, .2), "A"), ((.9, .0), (.3, .4), "neither"),
             ((.9, .0), (.5, .5), "neither"), ((.1, .9), (.8, .1), "A"), ((.9, .1), (.45, .3), "neither")]
    for icl, tv, want in cases:
        frame = pd.DataFrame({"method": ["icl", "task_vector"], "as_a": [icl[0], tv[0]], "as_b": [icl[1], tv[1]]})
        got, err = _call(fn, frame)
        if got != want:
            return _report(False, "", f"for task_vector as_a={tv[0]}, as_b={tv[1]} (ICL row as_a={icl[0]}, "
                           f"as_b={icl[1]}) you returned {_shown(got, err)}; expected {want!r}.",
                           "look only at the task_vector row; the winner must be strictly ahead AND reach 0.5.")
    return _report(True, "winner applies the rule on the task_vector row.", "", "")


def _top_tokens_match(lm: LanguageModel, vector: torch.Tensor, got: list[str], k: int) -> bool:
    """``got`` are the k best tokens of ``vector`` in order; tokens whose logits tie (within a rounding step of
    the model's dtype: bfloat16 ties are common among 262k logits) may come in either order."""
    from .inspect_vectors import vocab_logits
    from .models import decode_token

    logits = vocab_logits(lm, vector)  # [vocab], float32 copies of the model dtype's values
    best = logits.topk(k).values
    if len(got) != k:
        return False
    for token, value in zip(got, best.tolist()):
        tol = 2 * torch.finfo(lm.dtype).eps * max(1.0, abs(value))
        tied = torch.nonzero((logits - value).abs() <= tol).flatten().tolist()
        if token not in {decode_token(lm, i).strip() or repr(decode_token(lm, i)) for i in tied}:
            return False
    return True


def check_top_k_tokens(fn: Callable, lm: LanguageModel, bank, layer: int | None = None,
                       cases: list[tuple[torch.Tensor, int]] | None = None) -> bool:
    """06: ``fn(lm, vector, k) -> [str]`` gives the logit-lens top tokens of :func:`inspect_vectors.top_tokens`.

    ``cases``: ``[(vector, k), ...]`` to check on; by default a raw mean θ (k=5) and a centered one (k=8) at ``layer``.
    """
    from .inspect_vectors import top_tokens

    layer = min(11, bank.n_layers - 1) if layer is None else layer
    tasks = bank.tasks
    if cases is None:
        cases = [(bank.mean(tasks[0], layer), 5), (bank.mean(tasks[-1], layer) - bank.vectors[:, layer].mean(0), 8)]
    for vector, k in cases:
        got, err = _call(fn, lm, vector, k)
        if err is None and isinstance(got, (list, tuple)):
            got = [str(t).strip() or repr(t) for t in got]
        if err is not None or not isinstance(got, list) or not _top_tokens_match(lm, vector, got, k):
            want = top_tokens(lm, vector, k)["token"].tolist()
            return _report(False, "", f"for k={k} you returned {_shown(got, err)};\n"
                           f"  expected {want!r}.",
                           "logits = lm.unembed(lm.final_norm(vector.reshape(1, 1, -1)))[0, 0]; then topk(k) "
                           "and decode each id.")
    return _report(True, "top_k_tokens reads vectors like inspect_vectors.top_tokens.", "", "")


def check_peak_relative_depth(fn: Callable, curves: dict[str, tuple[pd.DataFrame, int]] | None = None) -> bool:
    """07: ``fn(by_layer, n_layers) -> float``: layer of the task-averaged peak / number of layers.

    ``curves``: ``{model: (by_layer, n_layers)}`` to check on; a small made-up pair of models otherwise.
    """
    if curves is None:
        def frame(accs):  # two tasks, one accuracy list each
            return pd.DataFrame([{"task": t, "layer": layer, "accuracy": acc}
                                 for t, row in zip("ab", accs) for layer, acc in enumerate(row)])
        curves = {"made-up 4 layers": (frame([[0.1, 0.8, 0.3, 0.0], [0.2, 0.2, 0.9, 0.0]]), 4),
                  "made-up 5 layers": (frame([[0.0, 0.0, 0.6, 0.6, 0.1], [0.0, 0.1, 0.6, 0.6, 0.0]]), 5)}
    for name, (by_layer, n_layers) in curves.items():
        want = int(by_layer.groupby("layer")["accuracy"].mean().idxmax()) / n_layers
        got, err = _call(fn, by_layer, n_layers)
        if err or not isinstance(got, (int, float)) or abs(got - want) > 1e-9:
            return _report(False, "", f"for {name} you returned {_shown(got, err)}, "
                           f"expected {want:.3f}.",
                           "average the accuracy over tasks per layer (groupby('layer')), take idxmax() of that "
                           "mean (the earliest layer on a tie), and divide by n_layers.")
    return _report(True, f"peak_relative_depth finds the peak of {len(curves)} mean curves.", "", "")


def check_add_patch(fn: Callable, lm: LanguageModel, layer: int | None = None) -> bool:
    """08: ``fn(lm, text, vector, layer, scale) -> str``: the next token with ``scale * vector`` ADDED at the last token."""
    from .engine import predict_last_plain
    from .models import decode_token

    layer = lm.n_layers // 2 if layer is None else layer
    task = get_task("antonyms")
    vector = extract_task_vector(lm, task.pairs[:5], task.pairs[5:7], layer)
    for text, scale in [("example:fast->", 1.0), ("example:hot->", 0.5), ("example:young->", 2.0)]:
        ids = lm.tokenizer(lm.prompt_prefix + text).input_ids
        # The plain path (one prompt, one forward) is the student's path too: the same numbers in any dtype.
        want = decode_token(lm, int(predict_last_plain(lm, [ids], patches=[(layer, scale * vector)], mode="add").top_ids[0]))
        got, err = _call(fn, lm, lm.prompt_prefix + text, vector, layer, scale)
        if err or got is None or str(got).strip() != want.strip():
            return _report(False, "", f"for {text!r} with scale {scale} you returned "
                           f"{_shown(got, err)}; adding gives {want!r}.",
                           "inside tvlab.patch_hidden(lm, layer, -1, scale * vector, mode='add') run lm.model on the "
                           "token ids and decode the argmax of the last position's logits. 'add' keeps the prompt's "
                           "own state and adds the vector; 'replace' would throw the state away.")
    return _report(True, f"add_patch adds a scaled vector at layer {layer}.", "", "")
