import pytest
import torch

import tvlab
from tvlab.hooks import patch_hidden, read_hidden


def _batch(lm, texts):
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def _n_hooks(lm):
    return sum(len(b._forward_hooks) for b in lm.blocks)


def test_patching_in_the_value_just_read_changes_nothing(tiny):
    batch = _batch(tiny, ["example:hot->cold\nexample:big->"])
    with torch.no_grad():
        with read_hidden(tiny) as rec:
            clean = tiny.model(**batch).logits
        for layer in range(tiny.n_layers):
            with patch_hidden(tiny, layer, -1, rec.hidden[0, layer]):
                patched = tiny.model(**batch).logits
            torch.testing.assert_close(patched, clean)


def test_patching_another_value_changes_the_output(tiny):
    batch = _batch(tiny, ["example:hot->cold\nexample:big->"])
    with torch.no_grad():
        clean = tiny.model(**batch).logits
        with patch_hidden(tiny, 1, -1, torch.randn(tiny.d_model) * 10):
            patched = tiny.model(**batch).logits
    assert torch.equal(patched[:, :-1], clean[:, :-1])  # causal: earlier positions untouched
    assert not torch.allclose(patched[:, -1], clean[:, -1])


def test_add_mode_adds(tiny):
    batch = _batch(tiny, ["example:up->"])
    v = torch.randn(tiny.d_model)
    with torch.no_grad():
        with read_hidden(tiny, layers=[2]) as before:
            tiny.model(**batch)
        with patch_hidden(tiny, 1, -1, torch.zeros(tiny.d_model), mode="add"), read_hidden(tiny, layers=[1]) as after:
            tiny.model(**batch)
        with read_hidden(tiny, layers=[1]) as plain:
            tiny.model(**batch)
    torch.testing.assert_close(after.hidden, plain.hidden)
    with torch.no_grad(), patch_hidden(tiny, 1, -1, v, mode="add"), read_hidden(tiny, layers=[1]) as added:
        tiny.model(**batch)
    torch.testing.assert_close(added.hidden[0, 0], plain.hidden[0, 0] + v)
    assert before.hidden.shape == (1, 1, tiny.d_model)
    # What the later blocks see: adding v is the same as replacing the state with state + v.
    with torch.no_grad():
        with patch_hidden(tiny, 1, -1, v, mode="add"):
            add_logits = tiny.model(**batch).logits
        with patch_hidden(tiny, 1, -1, plain.hidden[0, 0] + v):
            replace_logits = tiny.model(**batch).logits
        clean_logits = tiny.model(**batch).logits
    torch.testing.assert_close(add_logits, replace_logits)
    assert not torch.allclose(add_logits[:, -1], clean_logits[:, -1])


def test_hooks_are_removed_even_after_an_exception(tiny):
    before = _n_hooks(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with read_hidden(tiny), patch_hidden(tiny, 0, -1, torch.zeros(tiny.d_model)):
            assert _n_hooks(tiny) == before + tiny.n_layers + 1
            raise RuntimeError("boom")
    assert _n_hooks(tiny) == before


class _TupleBlock(torch.nn.Module):
    def forward(self, x):
        return (x * 2, "extra")


class _DictBlock(torch.nn.Module):
    def forward(self, x):
        return {"hidden": x}


def _fake_lm(block):
    lm = tvlab.tiny_model("llama", n_layers=1)
    lm.blocks[0] = block  # stand-in block; the hook code is what is tested
    return lm


def test_tuple_output_blocks_are_patched():
    lm = _fake_lm(_TupleBlock())
    x = torch.zeros(1, 3, lm.d_model)
    with patch_hidden(lm, 0, -1, torch.ones(lm.d_model)):
        out = lm.blocks[0](x)
    assert out[1] == "extra" and out[0][0, -1].sum() == lm.d_model and out[0][0, 0].sum() == 0


def test_unexpected_block_output_raises_instead_of_patching_nothing():
    lm = _fake_lm(_DictBlock())
    with pytest.raises(TypeError, match="returned dict"):
        with patch_hidden(lm, 0, -1, torch.ones(lm.d_model)):
            lm.blocks[0](torch.zeros(1, 3, lm.d_model))


def test_bad_layer_and_position_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="layers run from 0 to 3"):
        with patch_hidden(tiny, 4, -1, torch.zeros(tiny.d_model)):
            pass
    with pytest.raises(IndexError, match="not in the prompt"):
        with torch.no_grad(), read_hidden(tiny, position=50):
            tiny.model(**_batch(tiny, ["example:up->"]))
    with pytest.raises(ValueError, match="hidden size"):
        with patch_hidden(tiny, 0, -1, torch.zeros(3)):
            pass
