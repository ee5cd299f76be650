"""Read a task vector as words: pass θ through the final norm and the unembedding.

>>> lm = tvlab.load_model("tiny-llama")      # tvlab.load_model() loads the real Gemma 3 270M
>>> bank = tvlab.geometry.collect_task_vectors(lm, ["antonyms", "country_capital"], n_per_task=5)
>>> theta = bank.mean("antonyms", layer=2)     # a task's mean θ at layer 2: [d_model]
>>> tvlab.inspect_vectors.top_tokens(lm, theta, k=10).columns.tolist()
['rank', 'token', 'logit']
>>> tvlab.inspect_vectors.top_tokens_by_task(lm, bank, layer=2)["task"].tolist()   # one row per task
['antonyms', 'country_capital']

The paper found, e.g., words ending in -ing for present_simple_gerund and capital names
for country_capital. This "logit lens" view shows what a vector would say if the model
stopped at that layer; it is a hint about the content of θ, not a full account of it.

In a small model the middle-layer residual stream has a large component that every
prompt shares; read raw, every task's vector then shows the same odd tokens. With
``center=True`` the mean vector over all tasks is subtracted first, leaving what is
specific to each task (on Gemma 3 270M at layers 10-13: -ing verbs for the gerund task,
capitals for country_capital, languages for person_language).
"""

from __future__ import annotations

import pandas as pd
import torch

from ._checks import count
from .engine import next_token_logits
from .models import LanguageModel, decode_token


@torch.inference_mode()
def vocab_logits(lm: LanguageModel, vector: torch.Tensor) -> torch.Tensor:
    """Logits over the vocabulary of one hidden state ``[d_model]``: unembed(final_norm(vector))."""
    if not isinstance(vector, torch.Tensor):
        try:
            vector = torch.as_tensor(vector, dtype=torch.float32)  # a NumPy array or a list of numbers
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"vector must be one hidden state [{lm.d_model}] (a tensor), got {type(vector).__name__}; "
                            "a bank's mean vector of a task at a layer is bank.mean(task, layer).") from None
    if vector.dim() != 1 or vector.shape[0] != lm.d_model:
        raise ValueError(f"vector must be one hidden state of {lm.d_model} numbers ({lm.name}'s hidden size), got "
                         f"shape {list(vector.shape)}: take one layer's row, e.g. bank.vectors[i, layer] or "
                         "bank.mean(task, layer).")
    if lm.backend is not None:
        # The weights may be elsewhere (NDIF): write the vector over the last block's output of a one-token
        # prompt; the model's own final norm and unembedding then give these logits (after its final
        # logit soft-cap, if it has one: the same order of tokens).
        return next_token_logits(lm, [[lm.tokenizer.pad_token_id]], patches=[(lm.n_layers - 1, vector)])[0]
    h = vector.to(device=lm.device, dtype=lm.dtype).reshape(1, 1, -1)
    return lm.unembed(lm.final_norm(h))[0, 0].float().cpu()


def top_tokens(lm: LanguageModel, vector: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """The ``k`` tokens with the highest logit for ``vector``: rank, token, logit (``k`` beyond the vocabulary: all)."""
    k = count(k, "k")
    logits = vocab_logits(lm, vector)
    k = min(k, logits.shape[0])
    top = logits.topk(k)
    return pd.DataFrame({"rank": range(1, k + 1), "token": [decode_token(lm, i).strip() or repr(decode_token(lm, i))
                                                             for i in top.indices.tolist()],
                         "logit": top.values.numpy().round(2)})


def top_tokens_by_task(lm: LanguageModel, bank, layer: int, k: int = 8, center: bool = True) -> pd.DataFrame:
    """Top tokens of each task's mean vector at ``layer`` (``bank``: :class:`tvlab.geometry.TaskVectors`).

    ``center``: subtract the mean over all the bank's vectors at that layer first (see above).
    """
    layer = bank.layer_index(layer)  # an out-of-range or non-integer layer is named here, before any decoding
    offset = bank.vectors[:, layer].mean(0) if center else 0.0
    rows = []
    for task in bank.tasks:
        category = bank.labels.loc[bank.labels["task"] == task, "category"].iloc[0]
        tokens = top_tokens(lm, bank.mean(task, layer) - offset, k)["token"]
        rows.append({"task": task, "category": category, "top_tokens": ", ".join(tokens)})
    return pd.DataFrame(rows)
