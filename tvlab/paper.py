"""The paper's published numbers, to compare against.

Hendel, Geva, Globerson. "In-Context Learning Creates Task Vectors." Findings of EMNLP
2023, arXiv:2310.15916: its main result per task and model (zero-shot baseline,
task vector, ICL accuracy). ``paper_main_results.csv`` holds that table as published.

>>> tvlab.paper.results().head(3)
      model     category         task  baseline   icl  task_vector
0  GPT-J 6B  algorithmic   list_first      0.30  0.98         0.74
1  GPT-J 6B  algorithmic    list_last      0.24  1.00         0.64
2  GPT-J 6B  algorithmic  next_letter      0.16  0.86         1.00
>>> tvlab.paper.model_means().round(2)        # the paper's main-result averages, per model
         model  baseline   icl  task_vector  tv_over_icl
0     GPT-J 6B      0.12  0.81         0.68         0.83
1    LLaMA 13B      0.15  0.87         0.79         0.91
2    LLaMA 30B      0.16  0.90         0.78         0.87
3     LLaMA 7B      0.13  0.86         0.78         0.90
4   Pythia 12B      0.11  0.82         0.73         0.89
5  Pythia 2.8B      0.13  0.83         0.72         0.86
6  Pythia 6.9B      0.11  0.82         0.71         0.87
7   all models      0.13  0.84         0.74         0.88
"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

CITATION = "Hendel, Geva & Globerson (2023), In-Context Learning Creates Task Vectors, Findings of EMNLP, main results"


def results() -> pd.DataFrame:
    """The paper's per-task, per-model table with tvlab's task names: model, category, task, baseline, icl, task_vector."""
    path = files("tvlab").joinpath("paper_main_results.csv")
    with path.open(encoding="utf-8") as f:
        df = pd.read_csv(f)
    df["task"] = df["task"].str.lower().str.replace(" ", "_")
    df["category"] = df["category"].str.lower()
    return df[["model", "category", "task", "baseline", "icl", "task_vector"]]


def _with_ratio(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(tv_over_icl=df["task_vector"] / df["icl"])


def model_means() -> pd.DataFrame:
    """Means over the 18 tasks for each model, and over all 126 cells ("all models")."""
    df = results()
    cols = ["baseline", "icl", "task_vector"]
    means = df.groupby("model", sort=False)[cols].mean()
    means.loc["all models"] = df[cols].mean()
    return _with_ratio(means).reset_index()


def category_means() -> pd.DataFrame:
    """Means over all models and tasks of each category."""
    df = results()
    return _with_ratio(df.groupby("category", sort=False)[["baseline", "icl", "task_vector"]].mean()).reset_index()


def layer_peaks() -> pd.DataFrame:
    """Where the paper's dev accuracy by layer peaks (its layer figure): model, peak layer, layers, accuracy.

    ``relative_depth`` = peak layer / number of layers, to compare models of different depth.
    Values as read off the paper's figure (approximate where the paper gives "~").
    """
    df = pd.DataFrame([("LLaMA 7B", 14, 32, .86), ("LLaMA 13B", 15, 40, .80), ("LLaMA 30B", 18, 60, .77),
                       ("GPT-J 6B", 12, 28, .64), ("Pythia 6.9B", 13, 32, .78)],
                      columns=["model", "peak_layer", "n_layers", "peak_accuracy"])
    return df.assign(relative_depth=(df["peak_layer"] / df["n_layers"]).round(3))
