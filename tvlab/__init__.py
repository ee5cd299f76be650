"""tvlab: learn and explore how in-context learning creates task vectors.

>>> import tvlab
>>> lm = tvlab.load_model("tiny-llama")   # a tiny random model; tvlab.load_model() loads Gemma 3 270M, offline
>>> run = tvlab.run_task(lm, "antonyms", tvlab.ExperimentConfig(n_test=20, n_dev=20))
>>> run.summary.columns.tolist()          # one row per task (run.summary shows the numbers)
['task', 'category', 'baseline', 'icl', 'task_vector', 'best_layer', 'tv_over_icl']

Built on Hendel, Geva & Globerson (2023), "In-Context Learning Creates Task Vectors".
"""

from . import beyond, conflicts, explore, geometry, inspect_vectors, paper, plots, remote, reproduce
from .engine import ForwardStats, predict_last, predict_last_plain
from .experiments import (ExperimentConfig, TaskRun, category_means, extract_task_vector, icl_and_task_vectors,
                          layer_accuracy, layer_sweep, prepare_task, run_task, summarize, zero_shot_predictions)
from .hooks import patch_hidden, read_hidden
from .models import DEFAULT_MODEL, FAMILIES, Family, LanguageModel, ModelError, load_model, tiny_model
from .prompts import FORMATS, PREDICT, QUERY, PromptFormat, PromptSet, sample_sets, single_token_filter, tokenize
from .tasks import CATEGORIES, Pair, Task, TaskError, get_task, list_tasks, load_task

__version__ = "0.1.0"

__all__ = [
    "CATEGORIES", "DEFAULT_MODEL", "FAMILIES", "FORMATS", "PREDICT", "QUERY",
    "ExperimentConfig", "Family", "ForwardStats", "LanguageModel", "ModelError", "Pair", "PromptFormat",
    "PromptSet", "Task", "TaskError", "TaskRun",
    "category_means", "extract_task_vector", "get_task", "icl_and_task_vectors", "layer_accuracy", "layer_sweep", "list_tasks",
    "load_model", "load_task", "patch_hidden", "predict_last", "predict_last_plain", "prepare_task", "read_hidden",
    "run_task", "sample_sets", "single_token_filter", "summarize", "tiny_model", "tokenize", "zero_shot_predictions",
    "beyond", "conflicts", "explore", "geometry", "inspect_vectors", "paper", "plots", "remote", "reproduce",
]


def __getattr__(name):
    # The notebook helpers load on first use: widgets needs ipywidgets, which plain library use does not.
    if name in ("exercises", "widgets"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tvlab' has no attribute {name!r}")
