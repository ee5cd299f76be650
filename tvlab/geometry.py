"""The geometry of task vectors: many θ(S) per task, their clusters and distances.

>>> lm = tvlab.load_model("tiny-llama")         # tvlab.load_model() loads the real Gemma 3 270M
>>> bank = tvlab.geometry.collect_task_vectors(lm, tvlab.list_tasks(include_extra=False), n_per_task=10)
>>> bank.vectors.shape                            # [18 tasks x 10 sets, n_layers, d_model]
torch.Size([180, 4, 64])
>>> path = bank.save("task_vectors.safetensors"); bank = tvlab.geometry.TaskVectors.load(path)
>>> tvlab.geometry.embed_2d(bank, layer=2, method="tsne").columns.tolist()
['task', 'category', 'x', 'y']
>>> tvlab.geometry.distance_summary(bank, layer=2).keys()   # within vs between cosine distance
dict_keys(['layer', 'within', 'between', 'ratio'])
>>> tvlab.geometry.by_layer(bank).columns.tolist()          # those numbers at every layer
['layer', 'within', 'between', 'ratio', 'nearest_centroid_accuracy', 'chance', 'silhouette']

Each vector comes from its own demonstration set S (4 demonstrations and 2 dummy queries
by default, as in the paper's geometry runs), read at every layer, so one collection
serves every layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ._checks import count, counts, file_to_write, whole_number
from .experiments import ExperimentConfig, icl_and_task_vectors, prepare_task, prompt_format
from .models import LanguageModel
from .prompts import sample_sets
from .tasks import as_task_list


@dataclass(frozen=True)
class TaskVectors:
    """θ(S) for many sets: ``vectors[i, layer]`` with ``labels.iloc[i]`` = task, category, set."""

    vectors: torch.Tensor       # [n, n_layers, d_model], float32
    labels: pd.DataFrame        # columns task, category, set
    settings: dict

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.labels):
            raise ValueError(f"{len(self.vectors)} vectors but {len(self.labels)} labels.")

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[1]

    def layer_index(self, layer) -> int:
        """``layer`` as an index into these vectors' layers, or a ValueError saying which layers there are."""
        index = whole_number(layer)
        if index is None or not 0 <= index < self.n_layers:
            what = "is out of range" if index is not None else "must be a whole number"
            raise ValueError(f"layer {layer!r} {what}: these vectors have layers 0 to {self.n_layers - 1}.")
        return index

    def at(self, layer: int) -> np.ndarray:
        """The vectors at one layer: ``[n, d_model]``."""
        return self.vectors[:, self.layer_index(layer)].numpy()

    def mean(self, task: str, layer: int) -> torch.Tensor:
        """The mean task vector of one task at one layer: ``[d_model]``."""
        layer = self.layer_index(layer)
        rows = np.flatnonzero(self.labels["task"].to_numpy() == task)
        if len(rows) == 0:
            raise KeyError(f"no vectors for task {task!r}; these vectors hold {', '.join(self.tasks)}.")
        return self.vectors[rows, layer].mean(0)

    def check_comparable(self, what: str, min_tasks: int = 2) -> None:
        """ValueError unless these vectors hold ``min_tasks`` tasks and two vectors of each (``what`` needs them)."""
        counts = self.labels["task"].value_counts()
        if len(counts) < min_tasks:
            raise ValueError(f"{what} compares tasks, and these vectors hold {len(counts)} "
                             f"({', '.join(self.tasks) or 'none'}): collect them for two tasks or more.")
        single = [t for t in self.tasks if counts[t] < 2]
        if single:
            raise ValueError(f"{what} needs two vectors of each task or more, and {', '.join(single)} "
                             "has one: collect them with n_per_task=2 or more (notebook 04 uses 20).")

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(self.labels["task"]))

    def save(self, path: str | Path) -> Path:
        """Write to a .safetensors file; labels and settings go in its metadata."""
        from safetensors.torch import save_file

        path = file_to_write(path, "the task vectors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"vectors": self.vectors.contiguous()}, str(tmp),
                  metadata={"labels": self.labels.to_json(orient="records"), "settings": json.dumps(self.settings)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskVectors":
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"no task vectors at {str(path)!r}: give the path that TaskVectors.save returned.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vectors = f.get_tensor("vectors") if "labels" in meta else None
        except Exception as e:  # not a safetensors file at all
            raise ValueError(f"{str(path)!r} is not a safetensors file of task vectors ({e}).") from None
        if vectors is None:
            raise ValueError(f"{str(path)!r} holds no tvlab task vectors (a vector bank loads with "
                             "tvlab.beyond.VectorBank.load).")
        return cls(vectors, pd.DataFrame(json.loads(meta["labels"])), json.loads(meta["settings"]))


def collect_task_vectors(lm: LanguageModel, tasks: Sequence[str], n_per_task: int = 50, n_demos: int = 4,
                         seed: int = 41, fmt: str = "paper", batch_size: int | None = None) -> TaskVectors:
    """``n_per_task`` task vectors per task, each from its own independently sampled S."""
    tasks, n_per_task = as_task_list(tasks, distinct=True), count(n_per_task, "n_per_task")
    config = ExperimentConfig(n_demos=n_demos, seed=seed, format=fmt, batch_size=batch_size)
    vectors, labels = [], []
    for name in tasks:
        task, _ = prepare_task(lm, name, config)
        sets = sample_sets(task, n_per_task, n_demos, seed, "geometry", config.n_dummies)
        _, thetas = icl_and_task_vectors(lm, sets, prompt_format(lm, config), with_icl=False, batch_size=batch_size)
        vectors.append(thetas)
        labels += [{"task": task.name, "category": task.category, "set": k} for k in range(n_per_task)]
    settings = {"model": lm.name, "n_per_task": n_per_task, "n_demos": n_demos, "seed": seed, "format": fmt,
                "n_dummies": config.n_dummies}
    return TaskVectors(torch.cat(vectors), pd.DataFrame(labels), settings)


def embed_2d(bank: TaskVectors, layer: int, method: str = "tsne", seed: int = 0) -> pd.DataFrame:
    """2-D embedding of the vectors at ``layer`` (t-SNE on cosine distance, or PCA): x, y, task, category."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = bank.at(layer)
    if method == "tsne" and len(x) <= 5:
        raise ValueError(f"t-SNE needs more than 5 vectors, this bank has {len(x)}: collect more (n_per_task) "
                         "or use method='pca'.")
    distinct = len(np.unique(x, axis=0))
    if distinct == 1:  # scikit-learn's t-SNE of identical points can crash the kernel (a segmentation fault)
        raise ValueError(f"every vector at layer {layer} is the same, so there is nothing to lay out: choose another layer.")
    if method == "pca":
        xy = PCA(n_components=2, random_state=seed).fit_transform(x - x.mean(0))
    elif method == "tsne":
        perplexity = min(30.0, max(5.0, (len(x) - 1) / 4))
        xy = TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}.")
    return bank.labels[["task", "category"]].assign(x=xy[:, 0], y=xy[:, 1])


def _cosine_distance_matrix(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return 1.0 - unit @ unit.T


def pairwise_distances(bank: TaskVectors, layer: int) -> pd.DataFrame:
    """Cosine distance of every pair of vectors at ``layer``: columns kind (within/between), distance."""
    d = _cosine_distance_matrix(bank.at(layer))
    tasks = bank.labels["task"].to_numpy()
    i, j = np.triu_indices(len(d), k=1)
    same = tasks[i] == tasks[j]
    return pd.DataFrame({"kind": np.where(same, "within task", "between tasks"), "distance": d[i, j]})


def distance_summary(bank: TaskVectors, layer: int) -> dict:
    """Mean within-task and between-task cosine distance at ``layer``, and their ratio."""
    bank.check_comparable("distance_summary")
    pairs = pairwise_distances(bank, layer)
    means = pairs.groupby("kind")["distance"].mean()
    within, between = float(means["within task"]), float(means["between tasks"])
    return {"layer": layer, "within": within, "between": between, "ratio": within / between if between else float("nan")}


def variability(bank: TaskVectors, layer: int) -> pd.DataFrame:
    """Per task: the mean cosine distance between its vectors (lower = a more consistent θ)."""
    bank.check_comparable("variability", min_tasks=1)
    x = bank.at(layer)
    rows = []
    for task in bank.tasks:
        idx = np.flatnonzero(bank.labels["task"].to_numpy() == task)
        d = _cosine_distance_matrix(x[idx])
        i, j = np.triu_indices(len(idx), k=1)
        rows.append({"task": task, "category": bank.labels["category"].iloc[idx[0]], "variability": float(d[i, j].mean())})
    return pd.DataFrame(rows)


def separability(bank: TaskVectors, layer: int, seed: int = 0) -> dict:
    """How well the task can be read off θ: nearest-centroid accuracy on held-out vectors, and silhouette.

    Centroids come from a random half of each task's vectors; the other half is classified
    by the nearest centroid in cosine distance. Chance is 1 / number of tasks.
    """
    from sklearn.metrics import silhouette_score

    bank.check_comparable("separability")
    x = bank.at(layer)
    tasks = bank.labels["task"].to_numpy()
    rng = np.random.default_rng(seed)
    train = np.zeros(len(x), dtype=bool)
    for task in bank.tasks:
        idx = np.flatnonzero(tasks == task)
        train[rng.choice(idx, size=len(idx) // 2, replace=False)] = True
    names = bank.tasks
    centroids = np.stack([x[train & (tasks == t)].mean(0) for t in names])
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)  # noqa: E731
    guess = np.array(names)[(unit(x[~train]) @ unit(centroids).T).argmax(1)]
    return {"layer": layer, "nearest_centroid_accuracy": float((guess == tasks[~train]).mean()),
            "chance": 1 / len(names), "silhouette": float(silhouette_score(x, tasks, metric="cosine"))}


def by_layer(bank: TaskVectors, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Within/between distances and separability at every layer: one row per layer."""
    layers = range(bank.n_layers) if layers is None else counts(layers, "layers", minimum=-bank.n_layers)
    rows = []
    for layer in layers:
        rows.append({**distance_summary(bank, layer), **separability(bank, layer)})
    return pd.DataFrame(rows)
