"""Reference solutions to the notebooks' exercises. Try them yourself first!

Each function is written out plainly, with the hooks, so it reads as an explanation.
``tvlab.exercises`` checks a student's version against the library.
"""

from __future__ import annotations

import pandas as pd
import torch

from .hooks import patch_hidden, read_hidden
from .models import LanguageModel
from .tasks import Pair


def top_token(lm: LanguageModel, text: str) -> str:
    """00: the single most likely next token after ``text``, decoded."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits  # [1, pos, vocab]
    return lm.tokenizer.decode([int(logits[0, -1].argmax())])


def build_prompt(demos: list[Pair], query: str) -> str:
    """01: the paper's prompt: one ``example:{x}->{y}`` line per demonstration, then ``example:{query}->``."""
    lines = [f"example:{p.input}->{p.output}" for p in demos]
    return "\n".join(lines + [f"example:{query}->"])


def extract_theta(lm: LanguageModel, demos: list[Pair], dummies: list[Pair], layer: int) -> torch.Tensor:
    """02: θ(S) at ``layer``: the last-token hidden state of S + x', averaged over the dummy queries x'."""
    states = []
    for dummy in dummies:
        ids = lm.tokenizer(lm.prompt_prefix + build_prompt(demos, dummy.input), return_tensors="pt").input_ids
        with torch.no_grad(), read_hidden(lm, layers=[layer], position=-1) as rec:
            lm.model(input_ids=ids.to(lm.device))
        states.append(rec.hidden[0, 0])  # [d_model]
    return torch.stack(states).mean(0)


def patched_prediction(lm: LanguageModel, query: str, theta: torch.Tensor, layer: int) -> str:
    """02: the zero-shot prompt for ``query`` with θ written over the last token at ``layer``."""
    ids = lm.tokenizer(lm.prompt_prefix + build_prompt([], query), return_tensors="pt").input_ids
    with torch.no_grad(), patch_hidden(lm, layer, position=-1, value=theta):
        logits = lm.model(input_ids=ids.to(lm.device)).logits
    return lm.tokenizer.decode([int(logits[0, -1].argmax())])


def best_layers(by_layer: pd.DataFrame) -> dict[str, int]:
    """03: for each task, the layer with the highest dev accuracy (the earliest one on a tie)."""
    best = {}
    for task, rows in by_layer.groupby("task", sort=False):
        rows = rows.sort_values("layer")
        best[task] = int(rows.loc[rows["accuracy"].idxmax(), "layer"])
    return best


def mean_within_task_distance(bank, layer: int) -> float:
    """04: the mean cosine distance between two different vectors of the same task, at ``layer``."""
    x = torch.as_tensor(bank.at(layer), dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T
    tasks = bank.labels["task"].to_numpy()
    same = torch.as_tensor(tasks[:, None] == tasks[None, :]) & ~torch.eye(len(x), dtype=torch.bool)
    return float(distance[same].mean())


def winner(frame: pd.DataFrame) -> str:
    """05: 'B' if the patched vector wins (strictly ahead, at least 0.5), 'A' if the prompt does, else 'neither'."""
    tv = frame.set_index("method").loc["task_vector"]
    if tv.as_b > tv.as_a and tv.as_b >= 0.5:
        return "B"
    if tv.as_a > tv.as_b and tv.as_a >= 0.5:
        return "A"
    return "neither"


def top_k_tokens(lm: LanguageModel, vector: torch.Tensor, k: int) -> list[str]:
    """06: the logit lens: final norm, unembedding, then the ``k`` best tokens, decoded."""
    with torch.no_grad():
        h = vector.to(device=lm.device, dtype=lm.dtype).reshape(1, 1, -1)
        logits = lm.unembed(lm.final_norm(h))[0, 0]
    return [lm.tokenizer.decode([i]) for i in logits.topk(k).indices.tolist()]


def peak_relative_depth(by_layer: pd.DataFrame, n_layers: int) -> float:
    """07: where the task-averaged accuracy curve peaks, as a fraction of the model's depth."""
    mean = by_layer.groupby("layer")["accuracy"].mean()
    return float(mean.idxmax() / n_layers)


def add_patch(lm: LanguageModel, text: str, vector: torch.Tensor, layer: int, scale: float) -> str:
    """08: the next token of ``text`` with ``scale * vector`` added to the last token's state at ``layer``."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad(), patch_hidden(lm, layer, position=-1, value=scale * vector, mode="add"):
        logits = lm.model(input_ids=ids).logits
    return lm.tokenizer.decode([int(logits[0, -1].argmax())])
