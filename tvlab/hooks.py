"""Read and patch the residual stream after a decoder block, at one token position.

>>> lm = tvlab.load_model("tiny-llama")           # tvlab.load_model() loads the real Gemma 3 270M
>>> batch = lm.tokenizer(["example:hot->cold\\nexample:big->"], return_tensors="pt").to(lm.device)
>>> with tvlab.read_hidden(lm, position=-1) as rec:
...     _ = lm.model(**batch)
>>> theta = rec.hidden[:, 2]                      # [batch, d_model], output of block 2
>>> theta.shape
torch.Size([1, 64])
>>> zero_shot_batch = lm.tokenizer(["example:big->"], return_tensors="pt").to(lm.device)
>>> with tvlab.patch_hidden(lm, layer=2, position=-1, value=theta):
...     logits = lm.model(**zero_shot_batch).logits   # [batch, positions, vocab]: θ replaced the last state

"Layer L" is the output of decoder block L (0-based; the embeddings are not a layer),
the residual stream the paper reads θ(S) from and overwrites. Both context managers
register forward hooks on entry and remove them on exit, even when the forward pass
raises. A block may return a bare tensor or a tuple whose first item is the hidden
state; anything else raises instead of silently patching nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ._checks import whole_number
from .models import LanguageModel


def _hidden_of(output, layer: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"block {layer} returned {type(output).__name__}; tvlab expects a tensor or a tuple whose first "
                    "item is the hidden state [batch, pos, d_model]. This family needs its own hook.")


def _with_hidden(output, hidden: torch.Tensor):
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def _whole_position(position) -> int:
    number = whole_number(position)
    if number is None:
        raise ValueError(f"position must be a whole number, counted from the start (0, 1, ...) or from the end of the "
                         f"prompt (-1: the last token), got {position!r}.")
    return number


def _patched_rows(rows) -> list[int] | torch.Tensor | None:
    """``rows`` of a patch as a list of ints (one row may be given alone), or None for every row. A tensor
    of integer rows stays one, on its device (the engine's: read back it would make a GPU wait)."""
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise ValueError(f"rows must be batch row numbers (whole numbers, e.g. [0, 2]), got a tensor of {rows.dtype}.")
        return rows.reshape(-1)
    if whole_number(rows) is not None:
        rows = [rows]
    numbers = [whole_number(r) for r in rows] if hasattr(rows, "__iter__") and not isinstance(rows, str) else [None]
    if not numbers or None in numbers:
        raise ValueError(f"rows must be batch row numbers (whole numbers, e.g. [0, 2]) or None for every row, got {rows!r}.")
    return numbers


def _check_position(position: int, seq_len: int) -> int:
    if not -seq_len <= position < seq_len:
        raise IndexError(f"position {position} is not in the prompt: this forward pass has {seq_len} tokens "
                         f"(valid positions {-seq_len}..{seq_len - 1}; -1 is the predicting token).")
    return position


class HiddenRecorder:
    """What :func:`read_hidden` captured: ``hidden`` is ``[batch, n_layers_read, d_model]``."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._captured: dict[int, torch.Tensor] = {}

    def _store(self, layer: int, value: torch.Tensor) -> None:
        self._captured[layer] = value

    @property
    def hidden(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._captured]
        if missing:
            raise RuntimeError(f"no hidden state was recorded for layers {missing}: run a forward pass inside the `with` block.")
        return torch.stack([self._captured[layer] for layer in self.layers], dim=1)


@contextlib.contextmanager
def read_hidden(lm: LanguageModel, layers: Sequence[int] | None = None, position: int = -1) -> Iterator[HiddenRecorder]:
    """Record the output of blocks ``layers`` (default: all) at ``position``, detached."""
    position = _whole_position(position)
    if layers is None:
        layers = range(lm.n_layers)
    elif whole_number(layers) is not None:
        layers = [layers]  # one layer
    layers = [lm.check_layer(layer) for layer in layers]
    if not layers:
        raise ValueError(f"layers is empty: give the blocks to read (0..{lm.n_layers - 1}), or None for all of them.")
    rec = HiddenRecorder(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            h = _hidden_of(output, layer)  # [batch, pos, d_model]
            rec._store(layer, h[:, _check_position(position, h.shape[1])].detach())
        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(lm.blocks[layer].register_forward_hook(make_hook(layer)))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def patch_hidden(lm: LanguageModel, layer: int, position: int, value: torch.Tensor,
                 rows: Sequence[int] | torch.Tensor | None = None, mode: str = "replace") -> Iterator[None]:
    """Overwrite (``mode="replace"``) or add to (``"add"``) the output of block ``layer`` at ``position``.

    ``value`` is ``[d_model]`` (the same vector for every row) or ``[n_rows, d_model]``;
    ``rows`` restricts the patch to those batch rows (default: all). The value is cast to
    the activation's dtype and device.
    """
    layer = lm.check_layer(layer)
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}.")
    position = _whole_position(position)
    rows = _patched_rows(rows)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)  # a NumPy array or a list of numbers
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"the patch value must be a tensor of size {lm.d_model} (or [n_rows, {lm.d_model}]), "
                             f"got {type(value).__name__}.") from None
    n_rows = None if rows is None else len(rows)
    if value.ndim not in (1, 2) or value.shape[-1] != lm.d_model or (value.ndim == 2 and n_rows not in (None, value.shape[0])):
        raise ValueError(f"the patch has shape {list(value.shape)} but must be [{lm.d_model}] (the model's hidden size) "
                         f"or [n_rows, {lm.d_model}] with one vector per patched row; for one layer of a task vector "
                         "bank take that layer's row.")

    def hook(module, args, output):
        h = _hidden_of(output, layer)  # [batch, pos, d_model]
        pos = _check_position(position, h.shape[1])
        if isinstance(rows, list) and not all(-h.shape[0] <= r < h.shape[0] for r in rows):
            raise IndexError(f"patch rows {rows} are not all in this batch of {h.shape[0]} prompt(s) "
                             f"(valid rows {-h.shape[0]}..{h.shape[0] - 1}).")
        idx = torch.arange(h.shape[0], device=h.device) if rows is None else torch.as_tensor(rows, device=h.device)
        if value.ndim == 2 and value.shape[0] != len(idx):
            raise ValueError(f"the patch has {value.shape[0]} vectors but {len(idx)} row(s) are patched: give one vector "
                             f"[{lm.d_model}] for all of them, or one per row (a task vector of every layer is "
                             "[n_layers, d_model]: take one layer's row).")
        v = value.to(device=h.device, dtype=h.dtype)
        h = h.clone()
        h[idx, pos] = v if mode == "replace" else h[idx, pos] + v
        return _with_hidden(output, h)

    handle = lm.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
