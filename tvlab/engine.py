"""The one place where forward passes are made fast. Everything else calls :func:`predict_last`.

>>> out = predict_last(lm, prompts, groups=[0, 0, 1], patches=[None, (9, theta), None], read=True)
>>> out.top_ids        # [n_prompts]      the predicted next token of each prompt
>>> out.hidden         # [n_prompts, n_layers, d_model]  each block's output at the last token

Three tricks, each checked against :func:`predict_last_plain` (one prompt per forward,
nothing shared) on tiny models in ``tests/test_engine.py``:

1. Batching with left padding, so the predicting token is the last column of every row;
   explicit position ids keep a padded prompt's positions those of the unpadded one.
2. Logits at the last position only (``logits_to_keep=1``): a 262k-word unembedding at
   every position would cost more than the rest of the model.
3. Shared prefixes: prompts with the same ``groups`` id share their longest common token
   prefix, which runs once; its key/value cache is then copied to each prompt, and only
   the remaining tokens run. A set's ICL prompt and its dummy-query prompts share the
   demonstrations; a layer sweep (the same zero-shot prompt patched at each layer) shares
   everything but the last token, so each extra layer costs one token, not a prompt.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .hooks import patch_hidden, read_hidden
from .models import LanguageModel

Patch = tuple[int, torch.Tensor]  # (layer, vector [d_model]) written over the last token's hidden state


@dataclass
class ForwardStats:
    """Work done by forward passes, for throughput and model-FLOP-utilisation figures."""

    tokens: int = 0          # prompt tokens run through the blocks (padding excluded)
    logit_rows: int = 0      # positions whose full-vocabulary logits were computed
    forwards: int = 0        # calls of the model's forward

    def flops(self, lm: LanguageModel) -> float:
        """Forward FLOPs: 2 per weight per token in the blocks, plus the unembedding rows.
        Attention-score FLOPs are left out (they are small for prompts this short)."""
        return 2.0 * lm.n_params(embeddings=False) * self.tokens + 2.0 * lm.d_model * lm.unembed.out_features * self.logit_rows


@dataclass
class LastTokenOutput:
    top_ids: torch.Tensor                   # [n_prompts] argmax next token
    hidden: torch.Tensor | None = None      # [n_prompts, n_layers, d_model] if read=True
    stats: ForwardStats = field(default_factory=ForwardStats)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@contextlib.contextmanager
def _patches(lm: LanguageModel, patches: Sequence[Patch | None]):
    """One hook per patched layer, each writing its rows' vectors at the last position."""
    by_layer: dict[int, list[int]] = {}
    for row, p in enumerate(patches):
        if p is not None:
            by_layer.setdefault(lm.check_layer(int(p[0])), []).append(row)
    with contextlib.ExitStack() as stack:
        for layer, rows in by_layer.items():
            value = torch.stack([patches[r][1] for r in rows])
            stack.enter_context(patch_hidden(lm, layer, -1, value, rows=rows))
        yield


def _cache_arg(lm: LanguageModel, cache) -> dict:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x; pass it under the name this model takes."""
    if cache is None:
        return {}
    return {"cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values": cache}


@torch.inference_mode()
def _run_chunk(lm: LanguageModel, prefixes: list[tuple[int, ...]], suffixes: list[tuple[int, ...]],
               owner: list[int], patches: list[Patch | None], read: bool, stats: ForwardStats):
    """Run one batch: the distinct ``prefixes`` once, then every suffix on its owner's cache."""
    device, pad = lm.device, lm.tokenizer.pad_token_id
    cache, p_mask = None, None
    if max(len(p) for p in prefixes) > 0:
        p_ids, p_mask = _left_pad(prefixes, pad)
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        out = lm.model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), position_ids=p_pos.to(device),
                       use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.batch_select_indices(torch.tensor(owner, device=device))  # one copy of its prefix per suffix
        p_mask = p_mask[owner]
        stats.forwards += 1
        stats.tokens += int(sum(len(p) for p in prefixes))
        stats.logit_rows += len(prefixes)
    s_ids, s_mask = _left_pad(suffixes, pad)
    start = torch.tensor([len(prefixes[o]) for o in owner]).unsqueeze(1)
    s_pos = (start + s_mask.cumsum(-1) - 1).clamp(min=0)
    mask = s_mask if p_mask is None else torch.cat([p_mask, s_mask], dim=1)
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(read_hidden(lm, position=-1)) if read else None
        stack.enter_context(_patches(lm, patches))
        out = lm.model(input_ids=s_ids.to(device), attention_mask=mask.to(device), position_ids=s_pos.to(device),
                       use_cache=cache is not None, logits_to_keep=1, **_cache_arg(lm, cache))
    stats.forwards += 1
    stats.tokens += int(sum(len(s) for s in suffixes))
    stats.logit_rows += len(suffixes)
    top = out.logits[:, -1].argmax(-1).cpu()
    hidden = rec.hidden.float().cpu() if read else None
    return top, hidden


def predict_last(lm: LanguageModel, prompts: Sequence[Sequence[int]], *, groups: Sequence[int] | None = None,
                 patches: Sequence[Patch | None] | None = None, read: bool = False,
                 batch_size: int = 64, stats: ForwardStats | None = None) -> LastTokenOutput:
    """Next-token argmax at the last position of each prompt, with optional patches and reads.

    ``groups``: prompts with equal ids share their common token prefix (run once).
    ``patches[i]``: ``(layer, vector)`` written over prompt i's last-token hidden state at
    that layer. ``read``: also return every block's output at the last token.
    ``batch_size`` counts prompts per forward pass (a group is never split).
    """
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to run.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    groups = list(range(n)) if groups is None else list(groups)
    patches = [None] * n if patches is None else list(patches)
    if len(groups) != n or len(patches) != n:
        raise ValueError("groups and patches need one entry per prompt.")
    stats = stats if stats is not None else ForwardStats()

    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    top = torch.empty(n, dtype=torch.long)
    hidden = torch.empty(n, lm.n_layers, lm.d_model) if read else None

    chunk: list[list[int]] = []

    def flush():
        prefixes, suffixes, owner, rows = [], [], [], []
        for k, idx in enumerate(chunk):
            seqs = [prompts[i] for i in idx]
            # A lone prompt keeps no prefix: splitting it would only add a forward pass.
            cut = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1) if len(idx) > 1 else 0
            prefixes.append(tuple(seqs[0][:cut]))
            for i in idx:
                suffixes.append(tuple(prompts[i][cut:]))
                owner.append(k)
                rows.append(i)
        t, h = _run_chunk(lm, prefixes, suffixes, owner, [patches[i] for i in rows], read, stats)
        top[rows] = t
        if read:
            hidden[rows] = h
        chunk.clear()

    in_chunk = 0
    for g, idx in members.items():
        if chunk and in_chunk + len(idx) > batch_size:
            flush()
            in_chunk = 0
        chunk.append(idx)
        in_chunk += len(idx)
    if chunk:
        flush()
    return LastTokenOutput(top, hidden, stats)


@torch.inference_mode()
def predict_last_plain(lm: LanguageModel, prompts: Sequence[Sequence[int]], *,
                       patches: Sequence[Patch | None] | None = None, read: bool = False,
                       stats: ForwardStats | None = None) -> LastTokenOutput:
    """The reference path: one prompt per forward, full logits, nothing shared or padded."""
    stats = stats if stats is not None else ForwardStats()
    patches = [None] * len(prompts) if patches is None else list(patches)
    tops, hiddens = [], []
    for ids, patch in zip(prompts, patches):
        x = torch.tensor([list(ids)], device=lm.device)
        with contextlib.ExitStack() as stack:
            rec = stack.enter_context(read_hidden(lm, position=-1)) if read else None
            if patch is not None:
                stack.enter_context(patch_hidden(lm, int(patch[0]), -1, patch[1]))
            logits = lm.model(input_ids=x).logits  # [1, pos, vocab]
        stats.forwards += 1
        stats.tokens += len(ids)
        stats.logit_rows += len(ids)
        tops.append(int(logits[0, -1].argmax()))
        if read:
            hiddens.append(rec.hidden[0].float().cpu())
    return LastTokenOutput(torch.tensor(tops), torch.stack(hiddens) if read else None, stats)
