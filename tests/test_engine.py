"""Every speed trick of tvlab.engine gives the same answers as the plain path."""

import pytest
import torch

import tvlab
from tvlab.engine import ForwardStats, predict_last, predict_last_plain
from tvlab.prompts import FORMATS, tokenize


def _prompt_groups(lm, n_sets=4, per_set=3):
    task, fmt = tvlab.get_task("antonyms"), FORMATS["paper"]
    sets = tvlab.sample_sets(task, n_sets, 5, seed=1, n_dummies=per_set - 1)
    prompts, groups = [], []
    for k, s in enumerate(sets):
        for q in (s.query, *s.dummies):
            prompts.append(tokenize(lm.tokenizer, fmt, s.demos, q.input).ids)
            groups.append(k)
    return prompts, groups


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "gpt_neox", "gptj", "qwen2"])
def test_shared_prefix_batching_equals_plain_path(model_type):
    lm = tvlab.tiny_model(model_type)
    prompts, groups = _prompt_groups(lm)
    g = torch.Generator().manual_seed(0)
    patches = [None if i % 3 == 0 else (i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    fast = predict_last(lm, prompts, groups=groups, patches=patches, read=True, batch_size=5)
    plain = predict_last_plain(lm, prompts, patches=patches, read=True)
    assert torch.equal(fast.top_ids, plain.top_ids)
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


def test_batch_size_does_not_change_predictions(tiny):
    prompts, groups = _prompt_groups(tiny, n_sets=6)
    runs = [predict_last(tiny, prompts, groups=groups, batch_size=b).top_ids for b in (1, 4, 64)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_layer_sweep_shares_all_but_the_last_token(tiny):
    ids = tokenize(tiny.tokenizer, FORMATS["paper"], (), "big").ids
    thetas = torch.randn(tiny.n_layers, tiny.d_model) * 5
    patches = [(layer, thetas[layer]) for layer in range(tiny.n_layers)]
    stats = ForwardStats()
    fast = predict_last(tiny, [ids] * tiny.n_layers, groups=[0] * tiny.n_layers, patches=patches, stats=stats)
    plain = predict_last_plain(tiny, [ids] * tiny.n_layers, patches=patches)
    assert torch.equal(fast.top_ids, plain.top_ids)
    assert stats.tokens == len(ids) - 1 + tiny.n_layers  # the prefix once, then one token per layer
    assert stats.logit_rows == 1 + tiny.n_layers


def test_sweep_predictions_equal_one_forward_per_layer(tiny):
    fmt = FORMATS["paper"]
    queries = tvlab.get_task("antonyms").pairs[:5]
    thetas = torch.randn(len(queries), tiny.n_layers, tiny.d_model) * 3
    fast = tvlab.zero_shot_predictions(tiny, queries, fmt, thetas=thetas)
    for i, q in enumerate(queries):
        ids = tokenize(tiny.tokenizer, fmt, (), q.input).ids
        for layer in range(tiny.n_layers):
            plain = predict_last_plain(tiny, [ids], patches=[(layer, thetas[i, layer])]).top_ids[0]
            assert fast[i, layer] == plain


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="no prompts"):
        predict_last(tiny, [])
    with pytest.raises(ValueError, match="batch_size"):
        predict_last(tiny, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="layers run from"):
        predict_last(tiny, [[1, 2]], patches=[(99, torch.zeros(tiny.d_model))])
