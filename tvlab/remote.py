"""The nnsight backend: tvlab's experiments run as nnsight traces, locally or on NDIF's hosted models.

>>> lm = tvlab.remote.load_remote_model("tiny-llama")   # local nnsight on a tiny random model
>>> prompts = [lm.tokenizer("example:hot->cold\\nexample:big->").input_ids, lm.tokenizer("example:big->").input_ids]
>>> out = tvlab.engine.predict_last(lm, prompts, read=True)   # one request: every prompt in one trace
>>> out.hidden.shape          # [n_prompts, n_layers, d_model]: each block's output at the last token
torch.Size([2, 4, 64])
>>> lm.backend.log.requests   # load_remote_model("meta-llama/Llama-3.1-70B", remote=True) runs on NDIF
1

Nothing else in tvlab changes: :func:`tvlab.load_model` (``backend="nnsight"``), ``run_task``,
``tvlab reproduce --backend nnsight [--remote]`` and the notebooks' library calls reach the model
only through :mod:`tvlab.engine`, which hands every call to ``lm.backend`` when a model has one.

Each engine call is one *request*: one nnsight session holding one trace per ``batch_size``
prompts. A remote request costs seconds of latency, so the number of requests per task is small
and does not grow with the number of sets (``run_task``: three). The rules of ``docs/engine.md``
hold: layer L is the output of block L; a patch replaces (or adds to) one row's state at one
position; reads see the state before that row's patch at that block. Prompts are left-padded
with position ids counted from each row's first token, so a padded row computes what it would
alone. Prefixes are not shared (a trace runs every prompt whole): the results are the engine's,
the work is larger (``stats.tokens`` counts it).

This is the only module that imports nnsight, and only when a backend is made.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .engine import ForwardStats, LastTokenOutput, Patch, RowPatch, _left_pad, _row_patches
from .hooks import _check_position
from .models import LanguageModel, ModelError

INSTALL = 'pip install "tvlab[remote]"'
NDIF_KEYS = "https://login.ndif.us"


def _import_nnsight():
    """nnsight, or a ModelError saying how to install it."""
    try:
        import nnsight
    except ImportError as e:
        raise ModelError(f"the nnsight backend needs the nnsight package, which is not installed: {INSTALL} "
                         "(or pip install nnsight), then try again. Without it, leave out backend='nnsight' "
                         "(--backend) and tvlab runs the model with its own engine.") from e
    return nnsight


@dataclass
class RequestLog:
    """What the backend sent and got back, over its lifetime."""

    requests: int = 0       # sessions run (each a request to NDIF when remote)
    traces: int = 0         # forward passes inside them
    bytes_sent: int = 0     # tensors in the requests: token ids, masks, positions, patch vectors
    bytes_saved: int = 0    # tensors saved in the traces and returned: predictions, hidden states, logits

    def __str__(self) -> str:
        return (f"{self.requests} nnsight requests ({self.traces} traces): {self.bytes_sent / 1e6:.2f} MB of "
                f"tensors sent, {self.bytes_saved / 1e6:.2f} MB saved and returned")


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# One chunk's patches at one block, grouped by position: (position, rows [n], vectors [n, d_model]).
_Site = tuple[int, torch.Tensor, torch.Tensor]


class NNsightBackend:
    """Runs :func:`tvlab.engine.predict_last` and :func:`~tvlab.engine.generate_greedy` through nnsight.

    ``model``: an ``nnsight.TransformersModel`` (real weights for local runs, a meta model for
    NDIF). ``remote``: False (run here), True (each request on NDIF), or ``"local"`` (nnsight's dry
    run of the remote path: each request is serialized, then run here with tvlab's modules hidden,
    as on the server). ``progress``: a tqdm bar that ticks once per request.
    """

    def __init__(self, model, *, remote: bool | str = False, progress: bool = False):
        self.model = model
        self.remote = remote
        self.progress = progress
        self.log = RequestLog()
        self._bar = None

    def __repr__(self) -> str:
        where = {False: "local", True: "NDIF"}.get(self.remote, self.remote)
        return f"NNsightBackend({where}, {self.log})"

    # ------------------------------------------------------------------ one request

    @contextlib.contextmanager
    def _request(self):
        """Around one ``with model.session(...)`` block (nnsight reads that block's own source, so it
        is written out where it runs): no autograd graph locally, and failures of NDIF as ModelErrors."""
        try:
            with contextlib.ExitStack() as stack:
                if not self.remote:  # the server decides how it runs
                    stack.enter_context(torch.inference_mode())
                yield
        except ModelError:
            raise
        except Exception as e:
            if self.remote and _is_remote_failure(e):
                raise ModelError(f"the NDIF request failed: {e}. Check your network connection and the model's "
                                 "status (print(nnsight.status())), then run again; finished tasks of tvlab "
                                 "reproduce are kept.") from e
            raise

    def _done(self, traces: int, sent: int, saved: int) -> None:
        """Count a finished request (its traces, the bytes of tensors it sent and saved); tick the progress bar."""
        self.log.requests += 1
        self.log.traces += traces
        self.log.bytes_sent += sent
        self.log.bytes_saved += saved
        if self.progress:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(desc="nnsight requests", unit="request")
            self._bar.set_postfix_str(f"sent {self.log.bytes_sent / 1e6:.1f} MB, saved {self.log.bytes_saved / 1e6:.1f} MB")
            self._bar.update(1)

    def _blocks(self, lm: LanguageModel):
        """The nnsight envoys of the decoder blocks (the attribute path of ``lm.blocks``)."""
        envoy = self.model
        for part in lm.family.blocks.split("."):
            envoy = getattr(envoy, part)
        return envoy

    # ------------------------------------------------------------------ the engine's calls

    def predict_last(self, lm: LanguageModel, prompts: Sequence[Sequence[int]], *, groups: Sequence[int] | None,
                     patches: Sequence[RowPatch] | None, mode: str, read: bool | Sequence[bool], read_position: int,
                     logits: bool,
                     batch_size: int, stats: ForwardStats) -> LastTokenOutput:
        """Every prompt's next-token argmax (and reads, logits), ``batch_size`` prompts per trace, one request.

        ``groups`` is accepted and not used: a trace runs each prompt whole.
        """
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}.")
        n = len(prompts)
        patches = [None] * n if patches is None else list(patches)
        wanted = [read] * n if isinstance(read, bool) else list(read)  # rows whose states come back
        read = any(wanted)
        chunks, sent = [], 0
        for start in range(0, n, batch_size):
            rows = list(range(start, min(start + batch_size, n)))
            ids, mask = _left_pad([prompts[i] for i in rows], lm.tokenizer.pad_token_id)
            width = ids.shape[1]
            _check_position(read_position, width)
            sites = self._sites(lm, [patches[i] for i in rows], width)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            read_rows = torch.tensor([k for k, i in enumerate(rows) if wanted[i]], dtype=torch.long)
            chunks.append((ids, mask, positions, sites, read_rows))
            sent += _nbytes(ids, mask, positions, *(v for s in sites.values() for _, _, v in s))
        results = self._run(lm, chunks, read, read_position, logits, add=mode == "add")

        top = torch.cat([r[0] for r in results]).cpu()
        hidden = None
        if read:  # the rows not read stay zeros, as in the engine
            hidden = torch.zeros(n, lm.n_layers, lm.d_model)
            hidden[torch.tensor(wanted)] = torch.cat([r[1] for r in results]).float().cpu()
        all_logits = torch.cat([r[2] for r in results]).float().cpu() if logits else None
        self._done(len(chunks), sent, _nbytes(*(t for r in results for t in r)))
        stats.forwards += len(chunks)
        stats.tokens += int(sum(len(p) for p in prompts))
        stats.logit_rows += n
        return LastTokenOutput(top, hidden, stats, logits=all_logits)

    def _sites(self, lm: LanguageModel, patches: Sequence[RowPatch], width: int) -> dict[int, list[_Site]]:
        """A chunk's patches by block, then by position: the rows and their vectors (in the model's dtype)."""
        by_site: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for row, patch in enumerate(patches):
            for layer, vector, position in _row_patches(patch):
                if vector.shape[-1] != lm.d_model:
                    raise ValueError(f"the patch has size {vector.shape[-1]} but the model's hidden size is {lm.d_model}.")
                by_site.setdefault((lm.check_layer(layer), _check_position(position, width)), []).append((row, vector))
        sites: dict[int, list[_Site]] = {}
        for (layer, position), items in by_site.items():
            rows = [r for r, _ in items]
            if len(set(rows)) != len(rows):
                raise ValueError(f"a prompt has two patches at layer {layer}, position {position}; give each one vector.")
            vectors = torch.stack([v.detach().reshape(-1).cpu() for _, v in items]).to(lm.dtype)
            sites.setdefault(layer, []).append((position, torch.tensor(rows), vectors))
        return sites

    def _run(self, lm: LanguageModel, chunks, read: bool, read_position: int, logits: bool, add: bool) -> list[tuple]:
        """The request: one trace per chunk, blocks visited in order (read, then patch), then the logits.

        The body uses torch and builtins only: on NDIF it runs on the server, where tvlab is not installed.
        """
        model, blocks, n_layers = self.model, self._blocks(lm), lm.n_layers
        with self._request(), model.session(remote=self.remote):
            saved = list().save()
            for ids, mask, positions, sites, read_rows in chunks:
                with model.trace(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1):
                    reads = []
                    for layer in range(n_layers):
                        out = blocks[layer].output
                        h = out if isinstance(out, torch.Tensor) else out[0]  # [batch, pos, d_model]
                        if read:
                            reads.append(h[read_rows.to(h.device), read_position].detach().clone())
                        for position, rows, vectors in sites.get(layer, ()):
                            v = vectors.to(device=h.device, dtype=h.dtype)
                            rows = rows.to(h.device)
                            h[rows, position] = h[rows, position] + v if add else v
                    last = model.output.logits[:, -1]  # [batch, vocab]
                    saved.append((last.argmax(-1), torch.stack(reads, 1) if read else None,
                                  last.detach() if logits else None))
        return list(saved)

    def generate_greedy(self, lm: LanguageModel, prompt: Sequence[int], *, patches: Sequence[Patch], mode: str,
                        max_new_tokens: int, stop: str | None) -> list[int]:
        """The engine's greedy continuation, as one request of ``max_new_tokens`` traces.

        Each trace runs the prompt and the tokens so far, with the patches on the prompt's
        positions only: the same numbers as the engine's key/value cache, which holds the prompt's
        patched states. The stop rules (end of sequence, ``stop`` in the text) apply afterwards.
        """
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}.")
        n = len(prompt)
        sites = self._sites(lm, [list(patches)], n)
        # A position counted from the prompt's end, as a column counted from the start: new tokens do not move it.
        sites = {layer: [(n + position if position < 0 else position, rows, v) for position, rows, v in items]
                 for layer, items in sites.items()}
        model, blocks, n_layers, add = self.model, self._blocks(lm), lm.n_layers, mode == "add"
        ids = torch.tensor([list(prompt)])
        with self._request(), model.session(remote=self.remote):
            for _ in range(max_new_tokens):
                with model.trace(input_ids=ids, logits_to_keep=1):
                    for layer in range(n_layers):
                        if layer in sites:
                            out = blocks[layer].output
                            h = out if isinstance(out, torch.Tensor) else out[0]  # [1, pos, d_model]
                            for position, rows, vectors in sites[layer]:
                                v = vectors.to(device=h.device, dtype=h.dtype)
                                h[:, position] = h[:, position] + v if add else v
                    token = model.output.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                ids = torch.cat([ids, token.to(ids.device)], dim=1)
            ids.save()
        tokens = ids[0, n:].tolist()
        self._done(max_new_tokens, _nbytes(torch.tensor([list(prompt)]), *(v for s in sites.values() for _, _, v in s)),
                   _nbytes(ids))
        generated: list[int] = []
        for token in tokens:
            if token == lm.tokenizer.eos_token_id:
                break
            generated.append(token)
            if stop and stop in lm.tokenizer.decode(generated):
                break
        return generated


def _is_remote_failure(error: Exception) -> bool:
    """A failure of the request itself (network, server), rather than of tvlab's code in it."""
    from nnsight.intervention.backends.remote import RemoteError

    return (isinstance(error, (RemoteError, ConnectionError, TimeoutError))
            or type(error).__module__.split(".")[0] in ("httpx", "httpcore", "websocket", "websockets",
                                                        "huggingface_hub"))  # nnsight names the model via the Hub


# ---------------------------------------------------------------------------- loading

def _api_key(nnsight) -> str:
    """The NDIF API key (``$NDIF_API_KEY``, else nnsight's config), or a ModelError saying how to get one."""
    key = os.environ.get("NDIF_API_KEY") or nnsight.CONFIG.API.APIKEY
    if key and key != nnsight.CONFIG.API.APIKEY:
        # nnsight read $NDIF_API_KEY when it was imported; a key exported since then wins, as it would have then.
        nnsight.CONFIG.API.APIKEY = key
    if not key:
        raise ModelError(
            "running on NDIF needs an API key, and none is set. Get one (free, for research) at "
            f"{NDIF_KEYS}, then export NDIF_API_KEY=<your key> (or once, in Python: "
            "nnsight.CONFIG.set_default_api_key('<your key>'), which saves it in nnsight's config file). "
            "Without --remote (remote=False) the nnsight backend runs the model on this machine instead.")
    return key


def _hosted_models(nnsight) -> dict[str, dict]:
    """NDIF's deployed models by repo id (the only network call before a request), or a ModelError."""
    status = nnsight.status(raw=True)  # {} when the service cannot be reached (nnsight prints why)
    if not status:
        raise ModelError(
            f"cannot reach NDIF at {nnsight.CONFIG.API.HOST}: no network, or the service is down. Check your "
            "connection (and NDIF_HOST if you set it) and NDIF's status at https://nnsight.net/status/, then try "
            "again; or run on this machine without --remote (remote=False).")
    return {d.get("repo_id", name): d for name, d in status.get("deployments", {}).items()
            if d.get("deployment_level") in ("HOT", "WARM")}


def with_nnsight(lm: LanguageModel, *, progress: bool = False) -> LanguageModel:
    """``lm``'s model and tokenizer, run locally through nnsight: a new LanguageModel sharing the weights.

    nnsight routes the modules' forwards through its own wrappers; ``lm`` itself keeps tvlab's engine
    and its results (tests/test_remote.py checks both).
    """
    nnsight = _import_nnsight()
    traced = nnsight.TransformersModel(lm.model, tokenizer=lm.tokenizer, task="text-generation")
    return LanguageModel(lm.model, lm.tokenizer, lm.name, backend=NNsightBackend(traced, progress=progress))


def load_remote_model(name: str | os.PathLike | None = None, *, remote: bool = False, progress: bool | None = None,
                      **load_kwargs) -> LanguageModel:
    """A :class:`~tvlab.models.LanguageModel` whose forward passes run through nnsight.

    ``remote=False``: the model is loaded here by :func:`tvlab.load_model` (``name`` and
    ``load_kwargs``: dtype, device, device_map, weights_dtype, as there) and traced locally.
    ``remote=True``: ``name`` is a Hugging Face id that NDIF hosts; nnsight builds it on the meta
    device (config and tokenizer, no weights) and every request runs on NDIF. The API key, the
    service and the model are checked here, before any long work. ``progress``: a bar ticking once
    per request (default: on for remote).
    """
    nnsight = _import_nnsight()
    if not remote:
        from .models import load_model

        return with_nnsight(load_model(name, **load_kwargs), progress=bool(progress))
    if load_kwargs:
        raise ValueError(f"{', '.join(load_kwargs)}: NDIF decides where and in which dtype its models run; "
                         "leave these out with remote=True.")
    if name is None or str(name).startswith("tiny-") or os.path.isdir(str(name)):
        raise ModelError(f"NDIF runs only the models it hosts, named by their Hugging Face id (e.g. "
                         f"'meta-llama/Llama-3.1-70B'), not {str(name) if name else 'the bundled default model'!r}. "
                         "Run that one without --remote (remote=False).")
    name = str(name)
    _api_key(nnsight)
    hosted = _hosted_models(nnsight)
    if name not in hosted:
        listing = ", ".join(sorted(hosted)) or "none at the moment"
        raise ModelError(f"NDIF does not host {name!r} right now. Hosted now: {listing}. Pick one of these (the "
                         "list changes: print(nnsight.status())), or run a model you can load without --remote.")
    try:
        traced = nnsight.TransformersModel(name, task="text-generation")  # meta device: config and tokenizer only
    except OSError as e:
        raise ModelError(f"cannot fetch the config and tokenizer of {name!r} from the Hugging Face hub: {e}. "
                         "Check your network (and HF_HUB_OFFLINE), and for a gated model accept its licence on "
                         "huggingface.co and log in (hf auth login).") from e
    return LanguageModel(traced._module, traced.tokenizer, name,  # _module: the torch model nnsight wraps
                         backend=NNsightBackend(traced, remote=True, progress=True if progress is None else progress))
