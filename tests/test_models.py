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
    with pytest.raises(ValueError, match="unknown dtype"):
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
    assert not models._cache_is_complete(folder)


def test_cache_root_follows_tvlab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
