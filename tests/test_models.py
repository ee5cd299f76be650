import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import tvlab
from tvlab import models
from tvlab.models import FAMILIES, ModelError

# Families whose configs build a tiny model offline in this transformers version.
TINY_FAMILIES = ["gemma3_text", "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2",
                 "phi", "gpt_neox", "gptj", "gpt2", "opt"]


def test_required_families_are_in_the_table():
    assert {"gemma3_text", "llama", "gpt_neox", "gptj", "gpt2", "qwen2", "mistral", "phi3", "olmo"} <= set(FAMILIES)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_every_family_entry_resolves_on_a_tiny_model(model_type):
    lm = tvlab.tiny_model(model_type, n_layers=2)
    assert lm.n_layers == 2 and isinstance(lm.blocks, torch.nn.ModuleList)
    assert isinstance(lm.final_norm, torch.nn.Module)
    assert lm.unembed.out_features == len(lm.tokenizer)


def test_unknown_family_says_where_to_add_it():
    lm = tvlab.tiny_model("llama", n_layers=1)
    lm.model.config.model_type = "martian"
    with pytest.raises(ModelError, match="Add it to tvlab.models.FAMILIES"):
        models.family_of(lm.model)


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        tvlab.load_model("no-such-org/no-such-model-xyz")


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of float32, bfloat16, float16, auto"):
        tvlab.load_model("tiny-llama", dtype="float8")


def test_dtype_from_the_environment(monkeypatch):
    monkeypatch.setenv("TVLAB_DTYPE", "bfloat16")  # what Binder sets
    assert tvlab.load_model("tiny-llama").dtype == torch.bfloat16
    assert tvlab.load_model("tiny-llama", dtype="float32").dtype == torch.float32  # an explicit dtype wins
    monkeypatch.setenv("TVLAB_DTYPE", "fp8")
    with pytest.raises(ValueError, match="TVLAB_DTYPE='fp8'.*unset it"):
        tvlab.load_model("tiny-llama")
    monkeypatch.delenv("TVLAB_DTYPE")
    assert tvlab.load_model("tiny-llama").dtype == torch.float32


def test_tiny_model_by_name_and_dtype():
    lm = tvlab.load_model("tiny-gpt2", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and lm.model.config.model_type == "gpt2"


def test_prompt_prefix_follows_the_bos_token(tiny):
    assert tiny.prompt_prefix == ""  # the tiny tokenizer adds <bos>

    class NoBos:
        bos_token_id = None

        def __call__(self, text):
            return type("E", (), {"input_ids": [5]})()

    assert not models.adds_bos(NoBos())


def test_cache_manifest_detects_partial_and_corrupt_folders(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert not models._cache_is_complete(folder)  # no manifest: an interrupted conversion
    models._write_manifest(folder, "test")
    assert models._cache_is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"y" * 100)  # same size, other bytes
    assert not models._cache_is_complete(folder, verify=True)


def test_cache_root_follows_tvlab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path


# --------------------------------------------------------------------------- dtype "auto"

@pytest.mark.parametrize("fast, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_the_cpu_check(monkeypatch, fast, expected):
    monkeypatch.setattr(models, "cpu_bfloat16_is_fast", lambda: fast)
    assert models.fast_dtype("cpu") == expected
    assert tvlab.load_model("tiny-llama", dtype="auto", device="cpu").dtype == expected
    monkeypatch.setenv("TVLAB_DTYPE", "auto")  # what binder/start sets
    assert tvlab.load_model("tiny-llama", device="cpu").dtype == expected


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_on_cuda_wants_native_bfloat16(monkeypatch, capability, expected):
    monkeypatch.setattr(models, "_resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(models, "cpu_bfloat16_is_fast", lambda: pytest.fail("the CPU check is not for a GPU"))
    assert models.fast_dtype("cuda:0") == expected
    assert models.fast_dtype("mps") == torch.float32


def test_the_cpu_check_is_quick_and_leaves_the_threads_alone():
    models.cpu_bfloat16_is_fast.cache_clear()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    fast = models.cpu_bfloat16_is_fast()
    assert time.perf_counter() - start < 0.5 and isinstance(fast, bool)
    assert torch.get_num_threads() == threads
    start = time.perf_counter()
    assert models.cpu_bfloat16_is_fast() is fast and time.perf_counter() - start < 0.01  # measured once per process


_FAST_DTYPE = "import torch; from tvlab import models; print(models.fast_dtype('cpu'), torch.backends.cpu.get_cpu_capability())"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def test_auto_picks_float32_on_a_cpu_without_native_bfloat16():
    """oneDNN capped at AVX2 computes bfloat16 as an AVX2-only CPU does: about 50x slower than float32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", _FAST_DTYPE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "torch.float32"
    plain = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    native = subprocess.run([sys.executable, "-c", _FAST_DTYPE], env=plain, capture_output=True, text=True,
                            check=True).stdout.split()[0]
    flags = _cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16"} or not torch.backends.mkldnn.is_available():
        assert native == "torch.float32"
    elif platform.machine() in ("x86_64", "AMD64"):
        assert native == "torch.bfloat16"


# --------------------------------------------------------------------------- local folders

def test_a_folder_without_a_model_says_what_a_model_folder_holds(tmp_path):
    with pytest.raises(ModelError, match=r"lacks config.json, weights .*, tokenizer files.*save_pretrained"):
        tvlab.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"lacks weights \(model.safetensors or pytorch_model.bin\)\. A model folder"):
        tvlab.load_model(str(tmp_path))


def test_a_folder_without_a_tokenizer_is_refused_before_transformers(tmp_path, monkeypatch):
    tiny = tvlab.tiny_model("llama", n_layers=1)
    tiny.model.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a: pytest.fail("transformers was called"))
    with pytest.raises(ModelError, match=r"lacks tokenizer files"):
        tvlab.load_model(tmp_path)


def test_a_saved_model_folder_loads(tmp_path):
    tiny = tvlab.tiny_model("llama", n_layers=2)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = tvlab.load_model(tmp_path, device="cpu")
    assert lm.n_layers == 2 and lm.name == str(tmp_path)


# --------------------------------------------------------------------------- weights stored narrower than computed

def _rounded(model_type: str) -> tvlab.LanguageModel:
    """A float32 model whose weights went through bfloat16 once: what bfloat16 storage must compute exactly."""
    lm = tvlab.tiny_model(model_type)
    lm.model.to(torch.bfloat16).to(torch.float32)
    return lm


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "gpt_neox"])
def test_bfloat16_weights_compute_exactly_as_float32(model_type):
    lm = tvlab.load_model(f"tiny-{model_type}", dtype="float32", weights_dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.float32 and lm.weights_dtype == torch.bfloat16
    assert "float32 (weights stored in bfloat16)" in repr(lm)
    ref = _rounded(model_type)
    batch = lm.tokenizer(["hot -> cold\nbig ->", "up ->"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want = lm.model(**batch, output_hidden_states=True), ref.model(**batch, output_hidden_states=True)
    assert got.logits.dtype == torch.float32 and all(h.dtype == torch.float32 for h in got.hidden_states)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


def test_large_weights_are_converted_in_slices(monkeypatch):
    monkeypatch.setattr(models, "_UPCAST_SLICE", 64 * 7)  # the unembedding (vocab x 64) in slices of 7 rows
    lm = tvlab.load_model("tiny-llama", dtype="float32", weights_dtype="bfloat16", device="cpu")
    batch = lm.tokenizer(["hot -> cold\nbig ->"], return_tensors="pt")
    with torch.no_grad():
        # the same products, grouped differently by the matrix kernels: equal up to float32 rounding
        torch.testing.assert_close(lm.model(**batch).logits, _rounded("llama").model(**batch).logits, rtol=0, atol=1e-5)


def test_task_vectors_on_bfloat16_weights_match_the_rounded_float32_model():
    config = tvlab.ExperimentConfig(n_test=4, n_dev=3, n_baseline=4)
    lm = tvlab.load_model("tiny-llama", dtype="float32", weights_dtype="bfloat16", device="cpu")
    got, want = tvlab.run_task(lm, "antonyms", config), tvlab.run_task(_rounded("llama"), "antonyms", config)
    pd.testing.assert_frame_equal(got.predictions, want.predictions)
    theta = tvlab.extract_task_vector(lm, demos=tvlab.get_task("antonyms").pairs[:3],
                                      dummies=tvlab.get_task("antonyms").pairs[3:4], layer=1)
    assert theta.dtype == torch.float32


def test_weights_dtype_from_the_environment(monkeypatch):
    monkeypatch.setattr(models, "cpu_bfloat16_is_fast", lambda: False)
    monkeypatch.setenv("TVLAB_DTYPE", "auto")  # what binder/start sets
    monkeypatch.setenv("TVLAB_WEIGHTS_DTYPE", "bfloat16")
    lm = tvlab.load_model("tiny-llama", device="cpu")
    assert (lm.dtype, lm.weights_dtype) == (torch.float32, torch.bfloat16)  # AVX2 only: float32 products, small weights
    monkeypatch.setattr(models, "cpu_bfloat16_is_fast", lambda: True)
    lm = tvlab.load_model("tiny-llama", device="cpu")
    assert (lm.dtype, lm.weights_dtype) == (torch.bfloat16, torch.bfloat16)  # native bfloat16: plain bfloat16
    lm = tvlab.load_model("tiny-llama", dtype="float32", weights_dtype="float32", device="cpu")
    assert lm.weights_dtype == torch.float32  # explicit arguments win
    monkeypatch.setenv("TVLAB_WEIGHTS_DTYPE", "auto")
    with pytest.raises(ValueError, match="TVLAB_WEIGHTS_DTYPE='auto'.*unset it"):
        tvlab.load_model("tiny-llama")


def test_bfloat16_weights_still_train(monkeypatch):
    """Outside no_grad the converted weights are fresh tensors (a reused buffer would be overwritten before backward)."""
    monkeypatch.setattr(models, "_UPCAST_SLICE", 64 * 7)
    lm = tvlab.load_model("tiny-llama", dtype="float32", weights_dtype="bfloat16", device="cpu")
    batch = lm.tokenizer(["hot -> cold"], return_tensors="pt")
    lm.model(**batch).logits.sum().backward()
    assert lm.unembed.weight.grad is not None and lm.unembed.weight.grad.dtype == torch.bfloat16


def test_bfloat16_weights_in_and_out_of_inference_mode():
    lm = tvlab.load_model("tiny-llama", dtype="float32", weights_dtype="bfloat16", device="cpu")
    models._scratch.buf = None
    batch = lm.tokenizer(["hot -> cold"], return_tensors="pt")
    with torch.inference_mode():
        first = lm.model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**batch).logits, first, rtol=0, atol=0)
