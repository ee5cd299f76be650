"""The one place where tvlab runs the model. Everything else calls :func:`predict_last`,
:func:`next_token_logits`, :func:`generate_greedy` or :func:`last_position_attention`; the
rules they keep are written down in ``docs/engine.md``.

>>> lm = tvlab.load_model("tiny-llama")     # 4 layers, d_model 64; tvlab.load_model() loads Gemma 3 270M
>>> texts = ["example:hot->cold\\nexample:big->", "example:hot->cold\\nexample:up->", "example:big->"]
>>> prompts = [lm.tokenizer(t).input_ids for t in texts]   # token ids; the first two share a prefix
>>> theta = predict_last(lm, prompts[:1], read=True).hidden[0, 2]   # prompt 0's last state after block 2
>>> out = predict_last(lm, prompts, groups=[0, 0, 1], patches=[None, None, (2, theta)], read=True)
>>> out.top_ids.shape  # [n_prompts]      the predicted next token of each prompt
torch.Size([3])
>>> out.hidden.shape   # [n_prompts, n_layers, d_model]  each block's output at the last token
torch.Size([3, 4, 64])

Three tricks, each checked against :func:`predict_last_plain` (one prompt per forward,
nothing shared) on tiny models in ``tests/test_engine.py``:

1. Batching with left padding, so the predicting token is the last column of every row;
   explicit position ids keep a padded prompt's positions those of the unpadded one. On a
   CPU, where padding costs as much as tokens, a batch's rows of very different lengths run
   in one pass per range of lengths, where that saves more than the passes cost (:func:`_length_parts`).
2. Logits at the last position only (``logits_to_keep=1``): a 262k-word unembedding at
   every position would cost more than the rest of the model. Rows whose prediction is not
   wanted (``predict``: a dummy prompt is only read) get no logits at all. On a CPU the
   argmax is taken slice by slice of the vocabulary (:func:`top_ids_sliced`), in cache.
3. Shared prefixes: prompts with the same ``groups`` id share their longest common token
   prefix, which runs once; its key/value cache is then copied to each prompt, and only
   the remaining tokens run. A set's ICL prompt and its dummy-query prompts share the
   demonstrations; a layer sweep (the same zero-shot prompt patched at each layer) shares
   everything but the last token, so each extra layer costs one token, not a prompt; and since
   that token's state is overwritten at its layer L, it runs blocks L+1.. only (:func:`_row_skip`).
   The suffixes are left-padded after the prefix, so a batch can hold padding in the middle
   of a row. Attention over all earlier tokens does not care, but a sliding attention window
   (Gemma 2/3, Mistral) counts cache slots, padding included: a batch whose padded width
   exceeds the model's window runs without a shared prefix (padding only at the start).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._checks import whole_number
from .hooks import patch_hidden, read_hidden
from .models import LanguageModel, computes_plain_linear

# (layer, vector [d_model]) written over the last token's hidden state, or (layer, vector, position)
# at another position, counted from the end of the prompt (-1 is the last token, -2 the one before).
Patch = tuple[int, torch.Tensor] | tuple[int, torch.Tensor, int]
RowPatch = Patch | Sequence[Patch] | None  # one prompt's patches: none, one, or several


@dataclass
class ForwardStats:
    """Work done by forward passes, for throughput and model-FLOP-utilisation figures."""

    tokens: int = 0          # prompt tokens run through the blocks (padding excluded)
    logit_rows: int = 0      # positions whose full-vocabulary logits were computed
    forwards: int = 0        # calls of the model's forward
    largest_batch: int = 0   # the most prompts a forward pass was allowed (batch_size, or the prompts of a call)
    skipped: int = 0         # (token, block) pairs not run: a patched token's blocks before its patch (engine._row_skip)

    def flops(self, lm: LanguageModel) -> float:
        """Forward FLOPs: 2 per weight per token in the blocks it ran, plus 2 per unembedding weight per logit
        row. Attention-score FLOPs are left out (they are small for prompts this short)."""
        block_tokens = self.tokens - self.skipped / max(lm.n_layers, 1)
        return 2.0 * block_params(lm) * block_tokens + 2.0 * lm.unembed.weight.numel() * self.logit_rows


def block_params(lm: LanguageModel) -> int:
    """Weights every token passes through: all but the input embedding and the unembedding.

    An untied unembedding (LLaMA) is counted per logit row in :meth:`ForwardStats.flops`, not per token.
    """
    emb, unembed = lm.model.get_input_embeddings().weight, lm.unembed.weight
    untied = unembed.numel() if unembed.data_ptr() != emb.data_ptr() else 0
    return lm.n_params(embeddings=False) - untied


@dataclass
class LastTokenOutput:
    top_ids: torch.Tensor                   # [n_prompts] argmax next token
    hidden: torch.Tensor | None = None      # [n_prompts, n_layers, d_model] if read=True
    stats: ForwardStats = field(default_factory=ForwardStats)
    logits: torch.Tensor | None = None      # [n_prompts, vocab] float32 next-token logits if logits=True


#: On a CPU (and Apple's MPS), when ``batch_size`` is None: at most :data:`CPU_BATCH_TOKENS` prompt
#: tokens per forward pass (padding included), which bounds the memory of a batch; and where the
#: model's own unembedding makes each prompt's logits (on MPS, or with ``logits=True``), at most
#: :data:`CPU_BATCH_SIZE` prompts (Gemma 3's 262,144 words: 1 MiB of float32 logits per prompt).
#: Where the argmax is taken in slices (:func:`slices_unembedding`) a prompt's logits never exist
#: whole, so short prompts fill a batch by tokens alone, up to :data:`MAX_AUTO_BATCH`: a layer
#: sweep's 900 one-token rows run in one pass instead of four, and its matmuls on 900 rows instead
#: of 252 (Gemma 3 270M, float32, 2-core AVX2 machine: the sweep 4.0 s instead of 4.2 s).
CPU_BATCH_SIZE, CPU_BATCH_TOKENS = 256, 6144
#: The largest auto batch on a GPU, and the share of its free memory that auto batches may fill.
MAX_AUTO_BATCH, MEMORY_SHARE = 4096, 0.6


def bytes_per_prompt(lm: LanguageModel, width: int) -> int:
    """Device memory one prompt of ``width`` tokens (padding included) needs during a forward pass, at most.

    Its key/value cache at every layer, twice (the shared prefix's copy and the cache the suffix
    pass extends), one block's largest activations (hidden, attention and MLP inputs and outputs,
    attention scores), and the last position's logits in float32.
    """
    config = lm.model.config
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or lm.d_model // heads
    d_ff = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or getattr(config, "ffn_dim", None) or 4 * lm.d_model)
    act = torch.finfo(lm.dtype).bits // 8
    cache = 2 * 2 * lm.n_layers * kv_heads * head_dim * width * act
    block = width * (4 * lm.d_model + 3 * d_ff + 2 * heads * head_dim) * act + heads * width * width * 4
    logits = lm.unembed.weight.shape[0] * (act + 4)
    return cache + block + logits


def auto_batch_size(lm: LanguageModel, width: int = 64, logits: bool = True) -> int:
    """The batch size ``predict_last`` uses when given None: prompts per forward pass.

    On a CUDA GPU: as many prompts of ``width`` tokens as fit in :data:`MEMORY_SHARE` of the
    memory free right now (:func:`bytes_per_prompt`), at most :data:`MAX_AUTO_BATCH`, at least 1.
    Elsewhere as many as make :data:`CPU_BATCH_TOKENS` tokens in all, at most :data:`CPU_BATCH_SIZE`
    if each prompt's ``logits`` over the whole vocabulary exist during the pass (False: the argmax
    is taken in slices, :func:`top_ids_sliced`), else at most :data:`MAX_AUTO_BATCH`.
    """
    if lm.device.type != "cuda":
        most = CPU_BATCH_SIZE if logits else MAX_AUTO_BATCH
        return max(1, min(most, CPU_BATCH_TOKENS // max(width, 1)))
    free, _ = torch.cuda.mem_get_info(lm.device)
    return max(1, min(MAX_AUTO_BATCH, int(MEMORY_SHARE * free) // bytes_per_prompt(lm, width)))


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    ids[mask.bool()] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, mask


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix all ``seqs`` share.

    That of the lexicographically smallest and largest alone: every other sequence sorts between
    them, so it shares their common prefix (``os.path.commonprefix``'s rule, on tuples of ids).
    """
    seqs = [tuple(s) for s in seqs]  # lists, tuples or tensors of ids compare alike
    low, high = min(seqs), max(seqs)
    n = min(len(low), len(high))
    for i in range(n):
        if low[i] != high[i]:
            return i
    return n


def _row_patches(patch: RowPatch) -> list[tuple[int, torch.Tensor, int]]:
    """A prompt's patches as (layer, vector, position) triples: ``None`` -> [], one patch -> [it]."""
    if patch is None:
        return []
    if isinstance(patch, tuple) and len(patch) in (2, 3) and isinstance(patch[1], torch.Tensor):
        patch = [patch]
    return [(int(p[0]), p[1], int(p[2]) if len(p) == 3 else -1) for p in patch]


def _deepest_position(patches: Sequence[RowPatch]) -> int:
    """The earliest position (most negative) any patch writes to; -1 when all write the last token."""
    return min((pos for patch in patches for _, _, pos in _row_patches(patch)), default=-1)


def _patch_sites(lm: LanguageModel, patches: Sequence[RowPatch]) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The patches by site: (layer, position, vectors [n_rows, d_model], rows), on the model's device.

    Built before any forward pass: a copy from the host inside a hook would make a GPU wait for
    every kernel queued before it, at each patched layer.
    """
    by_site: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for row, patch in enumerate(patches):
        for layer, vector, position in _row_patches(patch):
            by_site.setdefault((lm.check_layer(layer), position), []).append((row, vector))
    sites = []
    for (layer, position), items in by_site.items():
        rows = [r for r, _ in items]
        if len(set(rows)) != len(rows):
            raise ValueError(f"a prompt has two patches at layer {layer}, position {position}; give each one vector.")
        value = torch.stack([v.reshape(-1) for _, v in items]).to(device=lm.device, dtype=lm.dtype)
        sites.append((layer, position, value, torch.tensor(rows, device=lm.device)))
    return sites


@contextlib.contextmanager
def _patches(lm: LanguageModel, sites: list[tuple[int, int, torch.Tensor, torch.Tensor]], mode: str = "replace"):
    """One hook per patched (layer, position) of :func:`_patch_sites`, writing (or adding) its rows' vectors there."""
    with contextlib.ExitStack() as stack:
        for layer, position, value, rows in sites:
            stack.enter_context(patch_hidden(lm, layer, position, value, rows=rows, mode=mode))
        yield


def attention_window(lm: LanguageModel) -> int | None:
    """The model's sliding attention window in tokens, or None when every layer sees the whole prompt."""
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _cache_arg(lm: LanguageModel, cache) -> dict:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x; pass it under the name this model takes."""
    if cache is None:
        return {}
    return {"cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values": cache}


_NO_LOGITS = torch.empty(0, dtype=torch.long)

#: On a CPU, where a forward pass costs about its padded tokens, a batch's suffixes run in one pass per range of
#: lengths (:func:`_length_parts`) when that saves more padded work than the extra passes cost: each is counted as
#: this much block work (its Python and per-layer dispatch, a copy of the prefix cache, smaller matmuls). Gemma 3
#: 270M (100 M block weights): about 40 tokens; a tiny test model: tens of thousands, so it never splits a batch.
PASS_OVERHEAD_FLOP = 8e9


def _length_parts(lengths: Sequence[int], overhead_tokens: float) -> list[list[int]]:
    """Row indices cut into passes by ranges of length, to minimise the sum over passes of
    ``overhead_tokens + rows x longest length``: a dynamic program over the distinct lengths (few here).

    Each part lists its rows in their original order; one part (all rows) when nothing is saved.
    """
    count = collections.Counter(lengths)
    distinct = sorted(count)
    k = len(distinct)
    best, start = [0.0] + [float("inf")] * k, [0] * (k + 1)  # best[j]: the j shortest lengths' cost; start: its last pass
    for j in range(1, k + 1):
        rows = 0
        for i in range(j, 0, -1):  # the last pass runs distinct[i-1 .. j-1], padded to distinct[j-1]
            rows += count[distinct[i - 1]]
            cost = best[i - 1] + overhead_tokens + rows * distinct[j - 1]
            if cost < best[j]:
                best[j], start[j] = cost, i - 1
    bounds, j = [], k
    while j > 0:
        bounds.append((distinct[start[j]], distinct[j - 1]))
        j = start[j]
    return [[r for r, length in enumerate(lengths) if low <= length <= high] for low, high in reversed(bounds)]


def _row_skip(patch: RowPatch, suffix_len: int) -> int:
    """How many leading blocks a suffix need not run: all up to its deepest patch, when that patch replaces
    the state of its only token. Blocks 0..L of a one-token suffix patched at L (``mode="replace"``) compute
    a state the patch overwrites; the key/value cache they would add is read by that token alone, at those
    same blocks. So the row runs blocks L+1.. on the prefix cache, from the patched state (a layer sweep's
    row patched at block L of n: n - L - 1 blocks instead of n). The caller checks the mode and that
    nothing is read.
    """
    triples = _row_patches(patch)
    if suffix_len != 1 or not triples or any(position != -1 for _, _, position in triples):
        return 0
    return 1 + max(layer for layer, _, _ in triples)


def _depth_parts(rows: Sequence[int], skips: Sequence[int], widths: Sequence[int], n_layers: int,
                 overhead_tokens: float) -> list[tuple[list[int], int]]:
    """``rows`` cut into passes by the leading blocks they may skip (:func:`_row_skip`), each with the blocks it
    skips (the fewest of its rows), to minimise the sum over passes of ``overhead_tokens x n_layers + rows x
    width x blocks run``: a dynamic program over the distinct skips, deepest first. One part when nothing is saved.
    """
    by_skip: dict[int, list[int]] = {}
    for r in rows:
        by_skip.setdefault(skips[r], []).append(r)
    distinct = sorted(by_skip, reverse=True)
    k = len(distinct)
    best, start = [0.0] + [float("inf")] * k, [0] * (k + 1)  # best[j]: the j deepest skips' cost; start: its last pass
    for j in range(1, k + 1):
        n_rows, width = 0, 0
        for i in range(j, 0, -1):  # the last pass runs distinct[i-1 .. j-1] and skips distinct[j-1] blocks
            group = by_skip[distinct[i - 1]]
            n_rows += len(group)
            width = max(width, max(widths[r] for r in group))
            cost = best[i - 1] + overhead_tokens * n_layers + n_rows * width * (n_layers - distinct[j - 1])
            if cost < best[j]:
                best[j], start[j] = cost, i - 1
    parts, j = [], k
    while j > 0:
        chosen = set(distinct[start[j]:j])
        parts.append(([r for r in rows if skips[r] in chosen], distinct[j - 1]))
        j = start[j]
    return parts[::-1]


@contextlib.contextmanager
def _skipping(lm: LanguageModel, n_blocks: int):
    """Blocks ``0..n_blocks-1`` hand their input on unchanged (and add nothing to the cache); their hooks still run."""
    blocks = list(lm.blocks)[:n_blocks]
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance forward (accelerate's hooks) comes back
    for block in blocks:
        block.forward = _hand_on
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _hand_on(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class _Pass:
    """One suffix pass's inputs, built on the host and already copied to the device."""
    rows: list[int]                  # its rows among the batch's suffixes
    tokens: int                      # their real (unpadded) tokens
    ids: torch.Tensor                # [rows, width] left-padded suffix tokens
    mask: torch.Tensor               # [rows, prefix width + width]: the owner's prefix mask, then the suffix's
    positions: torch.Tensor          # [rows, width]
    owner: torch.Tensor | None       # [rows] the prefix each row extends (None: no shared prefix)
    sites: list                      # _patch_sites of its rows
    wanted: torch.Tensor             # [rows] bool, on the host: the rows that get the unembedding
    keep: torch.Tensor | None        # the wanted rows' indices on the device, when not all are wanted
    skip: int = 0                    # leading blocks it does not run (:func:`_row_skip`)


def _plan_pass(lm: LanguageModel, rows: list[int], suffixes, owner, prefixes, p_mask, patches, predict,
               skip: int = 0) -> _Pass:
    device = lm.device
    s_ids, s_mask = _left_pad([suffixes[i] for i in rows], lm.tokenizer.pad_token_id)
    owners = [owner[i] for i in rows]
    start = torch.tensor([len(prefixes[o]) for o in owners]).unsqueeze(1)
    s_pos = (start + s_mask.cumsum(-1) - 1).clamp(min=0)
    owner_t = torch.tensor(owners) if p_mask is not None else None
    mask = s_mask if p_mask is None else torch.cat([p_mask[owner_t], s_mask], dim=1)
    wanted = torch.ones(len(rows), dtype=torch.bool) if predict is None else torch.tensor([predict[i] for i in rows],
                                                                                          dtype=torch.bool)
    n_wanted = int(wanted.sum())
    keep = wanted.nonzero().squeeze(1).to(device) if 0 < n_wanted < len(rows) else None
    return _Pass(rows, sum(len(suffixes[i]) for i in rows), s_ids.to(device), mask.to(device), s_pos.to(device),
                 None if owner_t is None else owner_t.to(device), _patch_sites(lm, [patches[i] for i in rows]), wanted, keep,
                 skip)


@torch.inference_mode()
def _run_chunk(lm: LanguageModel, prefixes: list[tuple[int, ...]], suffixes: list[tuple[int, ...]],
               owner: list[int], patches: list[RowPatch], read: bool, stats: ForwardStats, logits: bool = False,
               mode: str = "replace", read_position: int = -1, predict: list[bool] | None = None,
               pending: list | None = None):
    """Run one batch: the distinct ``prefixes`` once, then every suffix on its owner's cache.

    ``predict``: one flag per suffix; the unembedding runs on the flagged rows only (None: all),
    and the others get -1 (and zero logits). ``pending`` (a list): where :func:`top_ids_sliced`
    can run, append ``(row indices, unembedding inputs)`` to it and leave those rows -1 (None: the
    model's own unembedding runs).
    On a CPU the suffixes may run in several passes, one per range of lengths (:data:`PASS_OVERHEAD_FLOP`),
    each on its own copy of the prefix cache; elsewhere in one.
    Every input is built on the host and copied to the device first, so the forward passes
    and their hooks queue on a GPU without waiting for it; the results come back at the end.
    """
    device, pad = lm.device, lm.tokenizer.pad_token_id
    shared = max(len(p) for p in prefixes) > 0
    p_mask = None
    if shared:
        p_ids, p_mask = _left_pad(prefixes, pad)
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        p_ids, p_pos, p_mask_d = (t.to(device) for t in (p_ids, p_pos, p_mask))
    cpu = lm.device.type == "cpu"
    overhead = PASS_OVERHEAD_FLOP / (2.0 * block_params(lm))
    widths = [len(s) for s in suffixes]
    parts = _length_parts(widths, overhead) if cpu else [list(range(len(suffixes)))]
    plans = [(rows, 0) for rows in parts]
    if shared and mode == "replace" and not read:  # one-token suffixes patched at layer L need no blocks 0..L
        skips = [_row_skip(patch, width) for patch, width in zip(patches, widths)]
        if any(skips):  # on a CPU in passes by depth where that saves work; a GPU keeps one pass (rule 7)
            plans = [plan for rows in parts for plan in
                     (_depth_parts(rows, skips, widths, lm.n_layers, overhead) if cpu
                      else [(rows, min(skips[r] for r in rows))])]
    passes = [_plan_pass(lm, rows, suffixes, owner, prefixes, p_mask, patches, predict, skip) for rows, skip in plans]
    sliced = pending is not None and not logits and slices_unembedding(lm)
    cache = None
    if shared:
        # No logits: the prefix only fills the cache (an empty index keeps no position for the unembedding).
        returns = []  # a block may be skipped only where the model's loop takes a bare tensor from it
        probe = lm.blocks[0].register_forward_hook(lambda module, args, output: returns.append(type(output)))
        try:
            out = lm.model(input_ids=p_ids, attention_mask=p_mask_d, position_ids=p_pos, use_cache=True,
                           logits_to_keep=_NO_LOGITS)
        finally:
            probe.remove()
        if returns != [torch.Tensor] and any(p.skip for p in passes):  # every block runs, in the passes by length
            passes = [_plan_pass(lm, rows, suffixes, owner, prefixes, p_mask, patches, predict) for rows in parts]
        cache = _cache_of(out)
        stats.forwards += 1
        stats.tokens += int(sum(len(p) for p in prefixes))
    n = len(suffixes)
    top = torch.full((n,), -1, dtype=torch.long)
    hidden = torch.empty(n, lm.n_layers, lm.d_model) if read else None
    all_logits = torch.zeros(n, lm.unembed.weight.shape[0]) if logits else None
    for k, p in enumerate(passes):
        part_cache = None
        if cache is not None:  # the last pass may take the prefix cache itself; the others take a copy
            part_cache = cache if k == len(passes) - 1 else copy.deepcopy(cache)
            part_cache.batch_select_indices(p.owner)  # one copy of its prefix per suffix
        taken = [] if sliced and bool(p.wanted.any()) else None
        h, last = _run_suffixes(lm, p, part_cache, read, stats, mode, read_position, taken)
        rows = torch.tensor(p.rows)
        if read:
            hidden[rows] = h
        if last is None:
            continue
        wanted_rows = rows[p.wanted]
        if taken is None:
            top[wanted_rows] = last.argmax(-1).cpu()
        else:  # the caller takes the argmax of several batches' rows at once (their top ids stay -1 here)
            pending.append((wanted_rows, last.contiguous()))  # keeps [rows, d_model], nothing more
        if logits:
            all_logits[wanted_rows] = last.float().cpu()
    return top, hidden, all_logits


def _run_suffixes(lm: LanguageModel, p: _Pass, cache, read: bool, stats: ForwardStats, mode: str, read_position: int,
                  taken: list | None):
    """One suffix pass: its rows' hidden states [rows, n_layers, d_model] (None unless ``read``), and the wanted
    rows' last logits [n_wanted, vocab], or with ``taken`` their unembedding inputs [n_wanted, d_model] (None if
    no row is wanted)."""
    n_wanted = int(p.wanted.sum())
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(read_hidden(lm, position=read_position)) if read else None
        stack.enter_context(_patches(lm, p.sites, mode))
        if p.skip:
            stack.enter_context(_skipping(lm, p.skip))
        if p.keep is not None or taken is not None:
            stack.enter_context(_unembed_input(lm, p.keep, taken))
        out = lm.model(input_ids=p.ids, attention_mask=p.mask, position_ids=p.positions, use_cache=cache is not None,
                       logits_to_keep=1 if n_wanted else _NO_LOGITS, **_cache_arg(lm, cache))
    stats.forwards += 1
    stats.tokens += p.tokens
    stats.skipped += p.tokens * p.skip
    stats.logit_rows += n_wanted
    hidden = rec.hidden.float().cpu() if read else None
    if not n_wanted:
        return hidden, None
    if taken is None:
        last = out.logits[:, -1]  # [n_wanted, vocab]: the unembedding saw the wanted rows only
    else:  # [n_wanted, d_model]: what the unembedding was handed, if the model's forward called it
        last = taken[0] if len(taken) == 1 else None
    if last is None or last.shape[0] != n_wanted:
        raise RuntimeError(f"{lm.name} computes its logits without calling {lm.family.unembed}; tvlab.models.FAMILIES "
                           "must name the module the model's forward calls for its logits.")
    return hidden, last


@contextlib.contextmanager
def _unembed_input(lm: LanguageModel, rows: torch.Tensor | None, taken: list | None = None):
    """The unembedding of this forward pass sees only ``rows`` of the batch (a device index tensor; None: all).

    With ``taken`` (a list) it sees none of them: their inputs [rows, d_model] are appended to
    ``taken`` instead, for :func:`top_ids_sliced`.
    """
    def keep(module, args):
        h = args[0] if rows is None else args[0].index_select(0, rows)
        if taken is not None:
            taken.append(h[:, -1])
            h = h[:0]
        return (h, *args[1:])

    handle = lm.unembed.register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


#: Vocabulary slice and row block of :func:`top_ids_sliced`: the logits of a block of rows over one slice of
#: words stay in a CPU's cache, where a 262k-word row block would not. On a 2-core AVX2 machine (Gemma 3's
#: unembedding, float32) 225 rows ran at 108 instead of 78 GFLOP/s in slices of 4,096 words; 900 rows at
#: 130 GFLOP/s in slices of 1,024 against 123 in slices of 4,096, and 50 rows at 92 against 85. Few rows run
#: slower (the weights are read once per block), so :func:`predict_last` takes one argmax for all of a call's
#: batches; benchmarks/bench_reproduce.py measures the whole.
UNEMBED_SLICE = 1024
UNEMBED_ROWS = 2048


def slices_unembedding(lm: LanguageModel) -> bool:
    """Whether :func:`predict_last` takes its argmax from :func:`top_ids_sliced`: on a CPU, for an
    unembedding that is a plain linear map in a float dtype (a GPU keeps the one large matmul, which it runs
    well; a forward hook on the unembedding keeps the logits it expects to see)."""
    w = lm.unembed.weight
    return (lm.device.type == "cpu" and w.device.type == "cpu" and w.is_floating_point()
            and computes_plain_linear(lm.unembed) and not hasattr(lm.unembed, "_hf_hook"))


@torch.inference_mode()
def top_ids_sliced(lm: LanguageModel, h: torch.Tensor) -> torch.Tensor:
    """The argmax over the vocabulary of the unembedding of ``h`` [n, d_model], one slice of
    :data:`UNEMBED_SLICE` words and one block of :data:`UNEMBED_ROWS` rows at a time, so that the
    [n, vocab] logits never exist at once.

    Equal to ``logits.argmax(-1)`` of the model's own logits: the same matmul (and bias) per slice in
    ``h``'s dtype (weights stored narrower are converted slice by slice, as the model converts them), the
    family's final logit soft-capping (Gemma 2) applied as the model applies it, and on ties the first
    word, as ``argmax`` picks it.
    """
    w_all, b_all = lm.unembed.weight, lm.unembed.bias
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    n, vocab, dtype = h.shape[0], w_all.shape[0], h.dtype
    top = torch.zeros(n, dtype=torch.long)
    for r in range(0, n, UNEMBED_ROWS):
        rows = h[r:r + UNEMBED_ROWS]
        best = torch.full((rows.shape[0],), float("-inf"), dtype=dtype)
        block = top[r:r + UNEMBED_ROWS]
        buf = torch.empty(rows.shape[0], min(UNEMBED_SLICE, vocab), dtype=dtype)
        for start in range(0, vocab, UNEMBED_SLICE):
            part = slice(start, start + UNEMBED_SLICE)
            w = w_all[part].to(dtype)
            out = buf[:, :w.shape[0]]
            if b_all is None:
                torch.mm(rows, w.t(), out=out)
            else:
                torch.addmm(b_all[part].to(dtype), rows, w.t(), out=out)
            if cap is not None:
                out.div_(cap).tanh_().mul_(cap)
            i = out.argmax(-1)
            m = out.gather(1, i.unsqueeze(1)).squeeze(1)
            better = m > best  # strict: an equal value in a later slice keeps the earlier word
            best = torch.where(better, m, best)
            block.copy_(torch.where(better, i + start, block))
    return top


def _check_prompts(lm: LanguageModel, prompts) -> int:
    """The number of prompts, after checking they are non-empty lists of whole token ids inside the
    vocabulary (a float id would be truncated to another word without a word of warning)."""
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to run.")
    if isinstance(prompts, str) or any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts are lists of token ids, not text: tokenize first, e.g. [lm.tokenizer(text).input_ids].")
    if whole_number(prompts[0]) is not None:
        raise ValueError("prompts is a list of prompts, each a list of token ids: wrap one prompt as [ids].")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens.")
    floats = next((p for p in prompts if isinstance(p, torch.Tensor) and (p.dtype.is_floating_point or p.dtype.is_complex)), None)
    if floats is not None:
        raise ValueError(f"token ids must be whole numbers, got a tensor of {floats.dtype}: tokenize with lm.tokenizer.")
    lists = [p for p in prompts if not isinstance(p, torch.Tensor)]
    if not set(map(type, itertools.chain.from_iterable(lists))) <= {int}:  # Python ints, the common case: one fast pass
        bad = next((t for p in lists for t in p if whole_number(t) is None), None)
        if bad is not None:
            raise ValueError(f"token ids must be whole numbers, got {bad!r}: tokenize with lm.tokenizer.")
    vocab = getattr(lm.model.get_input_embeddings(), "num_embeddings", None) if lm.backend is None else None
    low, high = min(min(p) for p in prompts), max(max(p) for p in prompts)
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"token ids must be from 0 to {vocab - 1 if vocab else 'the vocabulary size - 1'} "
                         f"({lm.name}'s vocabulary), got {low if low < 0 else high}: tokenize with lm.tokenizer.")
    return n


def predict_last(lm: LanguageModel, prompts: Sequence[Sequence[int]], *, groups: Sequence[int] | None = None,
                 patches: Sequence[RowPatch] | None = None, mode: str = "replace", read: bool | Sequence[bool] = False,
                 read_position: int = -1, logits: bool = False, predict: bool | Sequence[bool] = True,
                 batch_size: int | None = None, stats: ForwardStats | None = None) -> LastTokenOutput:
    """Next-token argmax at the last position of each prompt, with optional patches and reads.

    ``groups``: prompts with equal ids share their common token prefix (run once).
    ``patches[i]``: ``(layer, vector)`` written over prompt i's last-token hidden state at
    that layer, or a list of such pairs at different layers (``mode="add"`` adds them instead). ``read``: also return every
    block's output at the last token, as it was before any patch of that row at that block
    (or one flag per prompt: the rows not read are zeros, and a backend does not send them back).
    ``read_position``: read there instead (counted from the end, like a patch's position).
    ``logits``: also return the last position's logits. ``predict``: one flag per prompt; the
    rows not flagged get no unembedding, top id -1 and zero logits (a prompt that is only read).
    ``batch_size`` counts prompts per
    forward pass (a group is never split); None picks it from the device's free memory
    (:func:`auto_batch_size`). Prompts whose reads or patches reach before their
    last token share no prefix: those positions must run in the same pass.
    """
    n = _check_prompts(lm, prompts)
    if batch_size is not None:
        number = whole_number(batch_size)
        if number is None or number < 1:
            raise ValueError(f"batch_size must be a whole number >= 1 or None (chosen from free memory), got {batch_size!r}.")
        batch_size = number
    groups = list(range(n)) if groups is None else list(groups)
    patches = [None] * n if patches is None else list(patches)
    if len(groups) != n or len(patches) != n:
        raise ValueError("groups and patches need one entry per prompt.")
    stats = stats if stats is not None else ForwardStats()
    if not isinstance(read, bool):
        read = _row_flags(read, n, "read")
    predict = _row_flags(predict, n, "predict")
    if batch_size is None:
        batch_size = auto_batch_size(lm, width=max(len(p) for p in prompts), logits=logits or not slices_unembedding(lm))
    stats.largest_batch = max(stats.largest_batch, min(batch_size, n))
    if lm.backend is not None:
        out = lm.backend.predict_last(lm, prompts, groups=groups, patches=patches, mode=mode, read=read,
                                      read_position=read_position, logits=logits, batch_size=batch_size, stats=stats)
        return _unpredicted(out, predict)
    unread = None
    if isinstance(read, list):
        unread = ~torch.tensor(read)
        read = not bool(unread.all())

    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    top = torch.empty(n, dtype=torch.long)
    hidden = torch.empty(n, lm.n_layers, lm.d_model) if read else None
    all_logits = torch.empty(n, lm.unembed.weight.shape[0]) if logits else None

    chunk: list[list[int]] = []
    unembed_rows: list[int] = []  # rows whose argmax waits for the end (top_ids_sliced), and their inputs
    unembed_in: list[torch.Tensor] = []

    window = attention_window(lm)
    deep = read_position != -1 or _deepest_position(patches) != -1

    def flush():
        cuts = []
        for idx in chunk:
            seqs = [prompts[i] for i in idx]
            # A lone prompt keeps no prefix: splitting it would only add a forward pass.
            cuts.append(min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1) if len(idx) > 1 else 0)
        width = max(cuts) + max(len(prompts[i]) - cut for idx, cut in zip(chunk, cuts) for i in idx)
        if window is not None and width > window:
            cuts = [0] * len(chunk)  # padding between prefix and suffix would shift the window: share nothing
        if deep:
            cuts = [0] * len(chunk)  # a read or patch before the last token needs that token in this pass
        prefixes, suffixes, owner, rows = [], [], [], []
        for k, (idx, cut) in enumerate(zip(chunk, cuts)):
            prefixes.append(tuple(prompts[idx[0]][:cut]))
            for i in idx:
                suffixes.append(tuple(prompts[i][cut:]))
                owner.append(k)
                rows.append(i)
        pending: list = []
        t, h, lg = _run_chunk(lm, prefixes, suffixes, owner, [patches[i] for i in rows], read, stats, logits, mode,
                              read_position, [predict[i] for i in rows], pending)
        top[rows] = t
        for j, last in pending:
            unembed_rows.extend(rows[k] for k in j.tolist())
            unembed_in.append(last)
        if read:
            hidden[rows] = h
        if logits:
            all_logits[rows] = lg
        chunk.clear()

    # Groups of similar length share a batch, so little of it is padding; prompts that share no prefix with
    # another run in batches of their own, which need no prefix pass (results do not depend on the order).
    in_chunk, lone = 0, False
    for idx in sorted(members.values(), key=lambda idx: (len(idx) == 1, len(prompts[idx[0]]))):
        if chunk and (in_chunk + len(idx) > batch_size or (len(idx) == 1) != lone):
            flush()
            in_chunk = 0
        chunk.append(idx)
        in_chunk += len(idx)
        lone = len(idx) == 1
    if chunk:
        flush()
    if unembed_in:  # one sliced argmax for all batches: many rows per slice of the vocabulary run faster
        top[unembed_rows] = top_ids_sliced(lm, torch.cat(unembed_in))
    if read and unread is not None:
        hidden[unread] = 0.0
    return LastTokenOutput(top, hidden, stats, logits=all_logits)


@torch.inference_mode()
def predict_last_plain(lm: LanguageModel, prompts: Sequence[Sequence[int]], *,
                       patches: Sequence[RowPatch] | None = None, mode: str = "replace", read: bool | Sequence[bool] = False,
                       read_position: int = -1, predict: bool | Sequence[bool] = True,
                       stats: ForwardStats | None = None) -> LastTokenOutput:
    """The reference path: one prompt per forward, full logits, nothing shared or padded.

    ``predict`` as in :func:`predict_last`: the rows not flagged report -1 (their logits are computed all the same).
    """
    stats = stats if stats is not None else ForwardStats()
    predict = _row_flags(predict, _check_prompts(lm, prompts), "predict")
    if lm.backend is not None:
        out = lm.backend.predict_last(lm, prompts, groups=None, patches=patches, mode=mode, read=read,
                                      read_position=read_position, logits=False, batch_size=1, stats=stats)
        return _unpredicted(out, predict)
    patches = [None] * len(prompts) if patches is None else list(patches)
    wanted = _row_flags(read, len(prompts), "read")
    read = any(wanted)
    tops, hiddens = [], []
    for ids, patch in zip(prompts, patches):
        x = torch.tensor([list(ids)], device=lm.device)
        with contextlib.ExitStack() as stack:
            rec = stack.enter_context(read_hidden(lm, position=read_position)) if read else None
            for layer, vector, position in _row_patches(patch):
                stack.enter_context(patch_hidden(lm, layer, position, vector, mode=mode))
            logits = lm.model(input_ids=x).logits  # [1, pos, vocab]
        stats.forwards += 1
        stats.tokens += len(ids)
        stats.logit_rows += len(ids)
        tops.append(int(logits[0, -1].argmax()))
        if read:
            hiddens.append(rec.hidden[0].float().cpu())
    hidden = None
    if read:  # the rows not read are zeros, as in predict_last
        hidden = torch.stack(hiddens)
        hidden[~torch.tensor(wanted)] = 0.0
    return _unpredicted(LastTokenOutput(torch.tensor(tops), hidden, stats), predict)


def _row_flags(flags: bool | Sequence[bool], n: int, name: str) -> list[bool]:
    if isinstance(flags, bool):
        return [flags] * n
    flags = [bool(f) for f in flags]
    if len(flags) != n:
        raise ValueError(f"{name} needs one flag per prompt (or one bool for all).")
    return flags


def _unpredicted(out: LastTokenOutput, predict: list[bool]) -> LastTokenOutput:
    """The rows not in ``predict`` report -1 and zero logits, whoever ran them (the engine's convention)."""
    if all(predict):
        return out
    skip = ~torch.tensor(predict)
    out.top_ids[skip] = -1
    if out.logits is not None:
        out.logits[skip] = 0.0
    return out


def next_token_logits(lm: LanguageModel, prompts: Sequence[Sequence[int]], *, patches: Sequence[RowPatch] | None = None,
                      mode: str = "replace", batch_size: int | None = None) -> torch.Tensor:
    """The last position's next-token logits of each prompt: ``[n_prompts, vocab]``, float32, on the CPU."""
    return predict_last(lm, prompts, patches=patches, mode=mode, logits=True, batch_size=batch_size).logits


@torch.inference_mode()
def last_position_attention(lm: LanguageModel, prompt: Sequence[int]) -> torch.Tensor:
    """What the last position attends to in every block: ``[n_layers, n_positions]``, float32, on the CPU.

    Row ``L`` holds block L's attention weights from the last position over every position
    (the mean of its heads; each row sums to 1): what it reads of the layer L-1 states (of the
    embeddings for block 0). The model runs once with eager attention, the only kind that
    returns its weights, and gets its own attention back afterwards.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt has no tokens.")
    if lm.backend is not None:
        raise ValueError(f"attention weights are read from the model's own modules; {lm.name} runs through a "
                         f"{type(lm.backend).__name__}: load it without a backend to read them.")
    ids = torch.tensor([list(prompt)], device=lm.device)
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        out = lm.model(input_ids=ids, output_attentions=True, logits_to_keep=1)
    finally:
        lm.model.set_attn_implementation(before)
    return torch.stack([a[0, :, -1].float().mean(0) for a in out.attentions]).cpu()


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


@torch.inference_mode()
def generate_greedy(lm: LanguageModel, prompt: Sequence[int], *, patches: Sequence[Patch] = (), mode: str = "replace",
                    max_new_tokens: int = 8, stop: str | None = "\n") -> list[int]:
    """Greedy continuation of one prompt; ``patches`` act on the prompt's last token only.

    The prompt runs once (with the patches) and fills the key/value cache; each new token then
    runs alone on that cache, unpatched, so it sees the patch only through the cache. Stops at
    the end-of-sequence token, after ``max_new_tokens``, or once the decoded text holds ``stop``.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt has no tokens.")
    if lm.backend is not None:
        return lm.backend.generate_greedy(lm, prompt, patches=patches, mode=mode, max_new_tokens=max_new_tokens, stop=stop)
    ids = torch.tensor([list(prompt)], device=lm.device)
    with contextlib.ExitStack() as stack:
        for layer, vector, position in _row_patches(list(patches)):
            stack.enter_context(patch_hidden(lm, layer, position, vector, mode=mode))
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == lm.tokenizer.eos_token_id:
            break
        generated.append(token)
        if stop and stop in lm.tokenizer.decode(generated):
            break
        out = lm.model(input_ids=torch.tensor([[token]], device=lm.device), use_cache=True, logits_to_keep=1,
                       **_cache_arg(lm, _cache_of(out)))
    return generated
