"""Every speed trick of tvlab.engine gives the same answers as the plain path."""

import dataclasses

import pandas as pd
import pytest
import torch

import tvlab
from tvlab import engine
from tvlab.engine import UNEMBED_SLICE, ForwardStats, predict_last, predict_last_plain, slices_unembedding, top_ids_sliced
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
    assert stats.skipped == tiny.n_layers  # one pass on a tiny model: each row skips block 0 (the row patched there)
    assert stats.logit_rows == tiny.n_layers  # the prefix pass only fills the cache: no logits


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


def test_groups_of_different_prefix_lengths_mixed_in_one_batch(tiny):
    """Several groups, with different demonstration counts, share one forward pass (and one padded batch)."""
    task, fmt = tvlab.get_task("antonyms"), FORMATS["paper"]
    prompts, groups = [], []
    for k, n_demos in enumerate([1, 5, 3, 0, 2]):
        s = tvlab.sample_sets(task, 1, n_demos, seed=k, n_dummies=2)[0]
        for q in (s.query, *s.dummies):
            prompts.append(tokenize(tiny.tokenizer, fmt, s.demos, q.input).ids)
            groups.append(k)
    g = torch.Generator().manual_seed(1)
    patches = [None if i % 2 else (i % tiny.n_layers, torch.randn(tiny.d_model, generator=g)) for i in range(len(prompts))]
    stats = ForwardStats()
    fast = predict_last(tiny, prompts, groups=groups, patches=patches, read=True, batch_size=len(prompts), stats=stats)
    plain = predict_last_plain(tiny, prompts, patches=patches, read=True)
    assert stats.forwards == 2  # every group in one batch: the prefixes once, then every suffix
    assert torch.equal(fast.top_ids, plain.top_ids)
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


def test_common_prefix_len_is_the_longest_prefix_all_prompts_share():
    """The shortcut (only the smallest and largest prompt are compared) against the definition."""
    from tvlab.engine import _common_prefix_len

    def shared(seqs):  # the definition: the longest n such that every prompt starts with the same n ids
        return max(n for n in range(min(map(len, seqs)) + 1) if len({tuple(s[:n]) for s in seqs}) == 1)

    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        stem = torch.randint(0, 3, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
        seqs = [stem[:int(torch.randint(0, len(stem) + 1, (1,), generator=g))]
                + torch.randint(0, 3, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
                for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
        assert _common_prefix_len(seqs) == shared(seqs), seqs
    assert _common_prefix_len([[5, 1, 2], (5, 1, 3), torch.tensor([5, 1])]) == 2  # lists, tuples and tensors alike


def _long_prompts(lm, n_demos=15):
    task, fmt = tvlab.get_task("country_capital"), FORMATS["paper"]
    sets = tvlab.sample_sets(task, 3, n_demos, seed=3, n_dummies=2)
    prompts, groups = [], []
    for k, s in enumerate(sets):
        for q in (s.query, *s.dummies):
            prompts.append(tokenize(lm.tokenizer, fmt, s.demos, q.input).ids)
            groups.append(k)
    return prompts, groups


def test_prompts_longer_than_a_sliding_window_stay_exact(monkeypatch):
    lm = tvlab.tiny_model("gemma3_text")  # sliding window of 64 tokens on some layers
    window = tvlab.engine.attention_window(lm)
    prompts, groups = _long_prompts(lm)
    assert window == 64 and min(len(p) for p in prompts) > window
    plain = predict_last_plain(lm, prompts, read=True)
    fast = predict_last(lm, prompts, groups=groups, read=True, batch_size=64)
    assert torch.equal(fast.top_ids, plain.top_ids)
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
    # The reason for the rule: sharing the prefix anyway puts padding inside the window and changes the states.
    monkeypatch.setattr(tvlab.engine, "attention_window", lambda lm: None)
    shared = predict_last(lm, prompts, groups=groups, read=True, batch_size=64)
    assert not torch.allclose(shared.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


def test_attention_window_of_families(tiny):
    assert tvlab.engine.attention_window(tiny) is None
    assert tvlab.engine.attention_window(tvlab.tiny_model("qwen2")) is None  # has a window size, but it is off


def test_bfloat16_fast_path_agrees_with_plain_path():
    lm = tvlab.tiny_model("llama")
    lm.model.to(torch.bfloat16)
    prompts, groups = _prompt_groups(lm, n_sets=8)
    g = torch.Generator().manual_seed(2)
    patches = [(i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    fast = predict_last(lm, prompts, groups=groups, patches=patches, read=True, batch_size=64)
    plain = predict_last_plain(lm, prompts, patches=patches, read=True)
    assert fast.hidden.dtype == torch.float32 and plain.hidden.dtype == torch.float32
    # One bfloat16 rounding step of the largest state apart at most; nearly all predictions identical.
    step = plain.hidden.abs().amax() * 2 ** -7
    assert (fast.hidden - plain.hidden).abs().max() <= 4 * step
    assert (fast.top_ids == plain.top_ids).float().mean() >= 0.9


def test_flops_count_an_untied_unembedding_once_per_logit_row(tiny):
    emb, unembed = tiny.model.get_input_embeddings().weight, tiny.unembed.weight
    assert emb.data_ptr() != unembed.data_ptr()  # the tiny models are untied, as LLaMA is
    blocks = sum(p.numel() for p in tiny.blocks.parameters()) + sum(p.numel() for p in tiny.final_norm.parameters())
    stats = ForwardStats(tokens=10, logit_rows=3)
    assert stats.flops(tiny) == 2 * blocks * 10 + 2 * unembed.numel() * 3


def test_several_patches_per_prompt_and_logits(tiny):
    ids = tokenize(tiny.tokenizer, FORMATS["paper"], (), "big").ids
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(tiny.d_model, generator=g) * 4, torch.randn(tiny.d_model, generator=g) * 4
    both = [[(1, a), (2, b)]]
    fast = predict_last(tiny, [ids, ids], groups=[0, 0], patches=both + [None], logits=True)
    plain = predict_last_plain(tiny, [ids], patches=both)
    assert fast.top_ids[0] == plain.top_ids[0]
    assert fast.logits.shape == (2, tiny.unembed.weight.shape[0]) and torch.equal(fast.logits.argmax(-1), fast.top_ids)
    torch.testing.assert_close(tvlab.engine.next_token_logits(tiny, [ids]), fast.logits[1:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="two patches at layer 1"):
        predict_last(tiny, [ids], patches=[[(1, a), (1, b)]])


def test_reads_see_the_state_before_that_blocks_patch(tiny):
    ids = tokenize(tiny.tokenizer, FORMATS["paper"], (), "big").ids
    theta = torch.full((tiny.d_model,), 7.0)
    clean = predict_last(tiny, [ids], read=True).hidden
    patched = predict_last(tiny, [ids], patches=[(1, theta)], read=True).hidden
    torch.testing.assert_close(patched[:, :2], clean[:, :2])   # blocks 0 and 1: as before the patch
    assert not torch.allclose(patched[:, 2:], clean[:, 2:])     # later blocks read the patched state


def test_patches_and_reads_before_the_last_token_equal_the_plain_path(tiny):
    fmt = FORMATS["paper"]
    prompts = [tokenize(tiny.tokenizer, fmt, (), q).ids for q in ("big", "hot", "up")]
    g = torch.Generator().manual_seed(4)
    patches = [[(1, torch.randn(tiny.d_model, generator=g) * 5, -2), (2, torch.randn(tiny.d_model, generator=g))]
               for _ in prompts]
    fast = predict_last(tiny, prompts, groups=[0, 0, 0], patches=patches, read=True, read_position=-2)
    plain = predict_last_plain(tiny, prompts, patches=patches, read=True, read_position=-2)
    assert torch.equal(fast.top_ids, plain.top_ids)
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
    clean = predict_last_plain(tiny, prompts, read=True, read_position=-2)
    torch.testing.assert_close(plain.hidden[:, :2], clean.hidden[:, :2])  # reads come before that block's patch
    assert not torch.allclose(plain.hidden[:, 2:], clean.hidden[:, 2:])


def test_query_swap_frame(tiny):
    frame = tvlab.explore.query_swap(tiny, "antonyms", theta_layer=2, n_queries=5)
    assert list(frame["layer"]) == list(range(tiny.n_layers)) and (frame["n"] == 5).all()
    assert frame[["follows_x", "follows_x_swapped"]].stack().between(0, 1).all()


def test_the_prefix_pass_computes_no_logits(tiny):
    prompts, groups = _prompt_groups(tiny, n_sets=2)
    rows = []  # a forward hook on the unembedding sees the model compute its logits (no slicing: see below)
    handle = tiny.unembed.register_forward_hook(lambda module, args, out: rows.append(out.shape[:2]))
    try:
        predict_last(tiny, prompts, groups=groups)
    finally:
        handle.remove()
    assert rows == [(2, 0), (len(prompts), 1)]  # prefixes: no position kept; suffixes: the last one


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3", "phi3",
                                        "olmo", "olmo2", "phi", "gpt_neox", "gptj", "gpt2", "opt"])
def test_the_sliced_argmax_on_a_cpu_equals_the_models_own_logits(model_type, monkeypatch):
    """Without logits, a CPU takes the argmax slice by slice (tvlab.engine.top_ids_sliced), and the model's own
    unembedding computes nothing; the predictions are those of its full logits (Gemma 2: soft-capped; phi, gptj: a bias)."""
    lm = tvlab.tiny_model(model_type)
    assert slices_unembedding(lm) and lm.unembed.weight.shape[0] > 2 * UNEMBED_SLICE  # three slices, the last one short
    sliced_rows, inputs = [], []
    monkeypatch.setattr(engine, "top_ids_sliced", lambda lm, h: sliced_rows.append(len(h)) or top_ids_sliced(lm, h))
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (
        inputs.append(tuple(x.shape[:2])) if w is lm.unembed.weight else None) or linear(x, w, b))
    prompts, groups = _prompt_groups(lm, n_sets=3, per_set=3)
    predict = [i % 3 != 1 for i in range(len(prompts))]
    g = torch.Generator().manual_seed(8)
    patches = [(i % lm.n_layers, 3 * torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    stats = ForwardStats()
    sliced = predict_last(lm, prompts, groups=groups, patches=patches, predict=predict, stats=stats, batch_size=5)
    monkeypatch.undo()
    full = predict_last(lm, prompts, groups=groups, patches=patches, predict=predict, logits=True, batch_size=5)
    plain = predict_last_plain(lm, prompts, patches=patches, predict=predict)
    assert sum(sliced_rows) == stats.logit_rows == sum(predict)  # the same rows, the same FLOP count
    assert len(sliced_rows) == 1 and stats.forwards > 2  # one argmax for all of the call's batches
    assert (0, 1) in inputs and all(rows * positions == 0 for rows, positions in inputs)  # the model's unembedding computed nothing
    assert torch.equal(sliced.top_ids, full.top_ids) and torch.equal(sliced.top_ids, plain.top_ids)


def test_a_cpu_fills_a_batch_of_short_prompts_by_tokens_when_the_argmax_is_sliced(tiny):
    """A layer sweep's rows (one zero-shot prompt patched at every layer): with the argmax in slices no prompt's
    logits exist whole, so the auto batch holds all of them; with logits kept, at most CPU_BATCH_SIZE."""
    queries = [tiny.tokenizer(f"Q: word{i} A:").input_ids for i in range(80)]
    prompts = [q for q in queries for _ in range(tiny.n_layers)]
    groups = [i for i in range(len(queries)) for _ in range(tiny.n_layers)]
    g = torch.Generator().manual_seed(11)
    patches = [(layer, 3 * torch.randn(tiny.d_model, generator=g)) for _ in queries for layer in range(tiny.n_layers)]
    assert len(prompts) > engine.CPU_BATCH_SIZE and slices_unembedding(tiny)
    sliced, full = ForwardStats(), ForwardStats()
    top = predict_last(tiny, prompts, groups=groups, patches=patches, stats=sliced).top_ids
    kept = predict_last(tiny, prompts, groups=groups, patches=patches, logits=True, stats=full).top_ids
    assert sliced.largest_batch == len(prompts) and sliced.forwards == 2  # the prefixes, then every row's last token
    assert full.largest_batch == engine.CPU_BATCH_SIZE and full.forwards > 2
    assert torch.equal(top, kept)


@pytest.mark.parametrize("logits", [False, True])
def test_an_unembedding_the_forward_never_calls_is_an_error_not_wrong_answers(logits):
    lm = tvlab.tiny_model("llama")
    lm.model.unused_head = torch.nn.Linear(lm.d_model, lm.unembed.weight.shape[0], bias=False)
    lm.family = dataclasses.replace(lm.family, unembed="unused_head")
    prompts, groups = _prompt_groups(lm, n_sets=2)
    with pytest.raises(RuntimeError, match="must name the module the model's forward calls"):
        predict_last(lm, prompts, groups=groups, logits=logits, predict=[i % 3 == 0 for i in range(len(prompts))])


def test_top_ids_sliced_keeps_the_first_of_tied_words_as_argmax_does():
    lm = tvlab.tiny_model("llama")
    w = lm.unembed.weight
    h = torch.randn(4, lm.d_model, generator=torch.Generator().manual_seed(9))
    last = w.shape[0] - 1
    tied = {0: (5, 2 * UNEMBED_SLICE + 7), 1: (UNEMBED_SLICE + 3, UNEMBED_SLICE + 4), 2: (last - 1, last)}
    with torch.no_grad():
        w.mul_(0.01)
        for row, words in tied.items():  # in different slices, in one slice, at the end of the short last slice
            w[list(words)] = h[row] / h[row].norm()
    logits = h @ w.t()
    assert all(logits[row, a] == logits[row, b] == logits[row].max() for row, (a, b) in tied.items())
    top = top_ids_sliced(lm, h)
    assert torch.equal(top, logits.argmax(-1)) and top[:3].tolist() == [5, UNEMBED_SLICE + 3, last - 1]


def test_top_ids_sliced_in_blocks_of_rows_equals_argmax(monkeypatch):
    """More rows than one block (engine.UNEMBED_ROWS): each block gets its own argmax, in order."""
    lm = tvlab.tiny_model("llama")
    h = 3 * torch.randn(11, lm.d_model, generator=torch.Generator().manual_seed(10))
    expected = lm.unembed(h).argmax(-1)
    assert torch.equal(top_ids_sliced(lm, h), expected)
    monkeypatch.setattr(engine, "UNEMBED_ROWS", 4)  # blocks of 4, 4 and 3 rows
    assert torch.equal(top_ids_sliced(lm, h), expected)


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])
def test_top_ids_sliced_converts_weights_stored_narrower_as_the_model_does(model_type):
    """Weights stored in bfloat16 and products in float32 (Binder's setting): the slices are converted likewise."""
    lm = tvlab.load_model(f"tiny-{model_type}", dtype="float32", weights_dtype="bfloat16", device="cpu")
    assert (lm.weights_dtype, lm.dtype) == (torch.bfloat16, torch.float32) and slices_unembedding(lm)
    prompts, groups = _prompt_groups(lm, n_sets=2)
    sliced = predict_last(lm, prompts, groups=groups)
    assert torch.equal(sliced.top_ids, predict_last(lm, prompts, groups=groups, logits=True).top_ids)


def test_a_hooked_or_unusual_unembedding_keeps_the_models_own_argmax(tiny):
    assert slices_unembedding(tiny)
    handle = tiny.unembed.register_forward_hook(lambda module, args, out: None)
    assert not slices_unembedding(tiny)  # a forward hook on it sees the logits it expects
    handle.remove()
    tiny.unembed.forward = lambda x: torch.nn.functional.linear(x, tiny.unembed.weight)
    assert not slices_unembedding(tiny)  # a forward of its own: it may compute something else
    del tiny.unembed.forward
    assert slices_unembedding(tiny)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_lone_prompts_and_groups_in_one_call_equal_the_plain_path(model_type):
    """A task's first pass: sets of 2 and 3 prompts sharing demonstrations, and zero-shot prompts alone."""
    lm = tvlab.tiny_model(model_type)
    prompts, groups = _prompt_groups(lm, n_sets=3, per_set=3)
    more, more_groups = _prompt_groups(lm, n_sets=3, per_set=2)
    zero_shot = [tokenize(lm.tokenizer, FORMATS["paper"], (), w).ids for w in ("big", "hot", "up", "slow")]
    prompts = prompts + more + zero_shot
    groups = groups + [10 + g for g in more_groups] + [20, 21, 22, 23]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(3)).tolist()  # interleaved
    prompts, groups = [prompts[i] for i in order], [groups[i] for i in order]
    g = torch.Generator().manual_seed(4)
    patches = [None if i % 4 == 0 else (i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    plain = predict_last_plain(lm, prompts, patches=patches, read=True)
    for batch_size in (4, 7, None):
        fast = predict_last(lm, prompts, groups=groups, patches=patches, read=True, logits=True, batch_size=batch_size)
        assert torch.equal(fast.top_ids, plain.top_ids)
        torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
        assert torch.equal(fast.logits.argmax(-1), plain.top_ids)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3", "phi3",
                                        "olmo", "olmo2", "phi", "gpt_neox", "gptj", "gpt2", "opt"])
def test_rows_not_predicted_skip_the_unembedding_and_the_rest_is_unchanged(model_type):
    """A task's first pass: dummy prompts are read and not predicted; ICL and zero-shot prompts are predicted."""
    lm = tvlab.tiny_model(model_type)
    prompts, groups = _prompt_groups(lm, n_sets=3, per_set=3)
    zero_shot = [tokenize(lm.tokenizer, FORMATS["paper"], (), w).ids for w in ("big", "hot", "up")]
    prompts, groups = prompts + zero_shot, groups + [10, 11, 12]
    predict = [i % 3 == 0 or i >= 9 for i in range(len(prompts))]  # each set's first prompt and the zero-shot ones
    g = torch.Generator().manual_seed(6)
    patches = [None if i % 2 else (i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    rows = []
    handle = lm.unembed.register_forward_hook(lambda module, args, out: rows.append(out.shape[0] * out.shape[1]))
    try:
        stats = ForwardStats()
        fast = predict_last(lm, prompts, groups=groups, patches=patches, read=True, logits=True, predict=predict,
                            batch_size=7, stats=stats)
    finally:
        handle.remove()
    everything = predict_last(lm, prompts, groups=groups, patches=patches, read=True, logits=True, batch_size=7)
    plain = predict_last_plain(lm, prompts, patches=patches, read=True, predict=predict)
    wanted = torch.tensor(predict)
    assert sum(rows) == stats.logit_rows == int(wanted.sum())  # the unembedding saw the predicted rows only
    assert torch.equal(fast.top_ids, plain.top_ids) and (fast.top_ids[~wanted] == -1).all()
    assert torch.equal(fast.top_ids[wanted], everything.top_ids[wanted])
    torch.testing.assert_close(fast.logits[wanted], everything.logits[wanted], atol=1e-5, rtol=1e-5)
    assert (fast.logits[~wanted] == 0).all()
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


def test_length_parts_minimise_the_cost_of_every_cut():
    """The dynamic program against every way of cutting the sorted distinct lengths into ranges."""
    import itertools

    from tvlab.engine import _length_parts

    def cost(parts, lengths, overhead):
        return sum(overhead + len(rows) * max(lengths[r] for r in rows) for rows in parts)

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        lengths = torch.randint(1, 9, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        overhead = [0.0, 3.0, 10.0, 40.0, 1e9][trial % 5]
        parts = _length_parts(lengths, overhead)
        assert sorted(r for rows in parts for r in rows) == list(range(len(lengths)))  # every row once
        assert all(rows == sorted(rows) for rows in parts)
        distinct = sorted(set(lengths))
        best = float("inf")
        for m in range(len(distinct)):
            for cuts in itertools.combinations(range(1, len(distinct)), m):
                edges = [0, *cuts, len(distinct)]
                ranges = [distinct[a:b] for a, b in zip(edges, edges[1:])]
                best = min(best, cost([[r for r, n in enumerate(lengths) if n in span] for span in ranges], lengths, overhead))
        assert cost(parts, lengths, overhead) == pytest.approx(best)
    assert _length_parts([2, 2, 3, 9], 1e9) == [[0, 1, 2, 3]]  # passes dearer than any padding: one pass
    assert _length_parts([3, 1, 3, 2], 0.0) == [[1], [3], [0, 2]]  # free passes: one per length


def test_depth_parts_minimise_the_cost_of_every_cut():
    """The dynamic program against every way of cutting the sorted distinct skips into ranges."""
    import itertools

    from tvlab.engine import _depth_parts

    def cost(parts, widths, n_layers, overhead):
        return sum(overhead * n_layers + len(rows) * max(widths[r] for r in rows) * (n_layers - skip)
                   for rows, skip in parts)

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 30, (1,), generator=g))
        skips = torch.randint(0, 7, (n,), generator=g).tolist()
        widths = [1 if s else int(torch.randint(1, 4, (1,), generator=g)) for s in skips]
        rows = sorted(torch.randperm(n, generator=g)[:max(1, n - 3)].tolist())
        overhead = [0.0, 0.5, 2.0, 10.0, 1e9][trial % 5]
        parts = _depth_parts(rows, skips, widths, 6, overhead)
        assert sorted(r for part, _ in parts for r in part) == rows  # every row once
        assert all(part == sorted(part) and skip == min(skips[r] for r in part) for part, skip in parts)
        distinct = sorted({skips[r] for r in rows}, reverse=True)
        best = float("inf")
        for m in range(len(distinct)):
            for cuts in itertools.combinations(range(1, len(distinct)), m):
                edges = [0, *cuts, len(distinct)]
                spans = [distinct[a:b] for a, b in zip(edges, edges[1:])]
                cut = [([r for r in rows if skips[r] in span], min(span)) for span in spans]
                best = min(best, cost(cut, widths, 6, overhead))
        assert cost(parts, widths, 6, overhead) == pytest.approx(best)
    assert _depth_parts([0, 1, 2], [3, 1, 0], [1, 1, 2], 4, 1e9) == [([0, 1, 2], 0)]  # dear passes: one
    assert _depth_parts([0, 1, 2], [3, 1, 3], [1, 1, 1], 4, 0.0) == [([0, 2], 3), ([1], 1)]  # free: one per depth


def _sweep_prompts(lm, n_queries=3, seed=0):
    """Zero-shot prompts, each once per layer patched there (a layer sweep), plus per query one copy patched at two
    layers (its deepest patch decides) and one copy two tokens longer (which skips nothing)."""
    g = torch.Generator().manual_seed(seed)
    prompts, groups, patches = [], [], []
    for k, q in enumerate(tvlab.get_task("antonyms").pairs[:n_queries]):
        ids = tokenize(lm.tokenizer, FORMATS["paper"], (), q.input).ids
        for layer in range(lm.n_layers):
            prompts.append(ids)
            patches.append((layer, torch.randn(lm.d_model, generator=g) * 3))
        prompts.append(ids)
        patches.append([(lm.n_layers - 1, torch.randn(lm.d_model, generator=g)), (0, torch.randn(lm.d_model, generator=g))])
        prompts.append(ids + ids[-2:])
        patches.append((1, torch.randn(lm.d_model, generator=g) * 3))
        groups += [k] * (lm.n_layers + 2)
    return prompts, groups, patches


@pytest.mark.parametrize("model_type", [f for f in tvlab.models.FAMILIES if f != "gemma3"])
def test_a_sweep_skipping_the_blocks_before_each_patch_equals_the_plain_path(model_type, monkeypatch):
    """A one-token suffix replaced at layer L runs blocks L+1.. only: one pass per depth when passes are free,
    the same predictions and logits as the plain path, and every family's blocks handed back afterwards."""
    lm = tvlab.tiny_model(model_type)
    prompts, groups, patches = _sweep_prompts(lm)
    predict = [i % 7 != 3 for i in range(len(prompts))]
    plain = predict_last_plain(lm, prompts, patches=patches, predict=predict)
    plain_logits = torch.stack([engine.next_token_logits(lm, [p], patches=[q])[0] for p, q in zip(prompts, patches)])
    monkeypatch.setattr(engine, "PASS_OVERHEAD_FLOP", 0.0)
    for logits in (False, True):
        stats = ForwardStats()
        fast = predict_last(lm, prompts, groups=groups, patches=patches, predict=predict, logits=logits, stats=stats)
        assert torch.equal(fast.top_ids, plain.top_ids)
        if logits:
            wanted = torch.tensor(predict)
            torch.testing.assert_close(fast.logits[wanted], plain_logits[wanted], atol=1e-4, rtol=1e-4)
        # each sweep row skips its layer + 1 blocks, the row patched at two layers all n; the longer prompt none
        n = lm.n_layers
        assert stats.skipped == 3 * (n * (n + 1) // 2 + n)
        assert stats.forwards == 1 + n + 1  # the prefixes, one pass per depth 1..n, the two-token suffixes
        assert stats.flops(lm) == pytest.approx(2.0 * engine.block_params(lm) * (stats.tokens - stats.skipped / n)
                                                + 2.0 * lm.unembed.weight.numel() * stats.logit_rows)
    assert all("forward" not in block.__dict__ for block in lm.blocks)


def test_nothing_is_skipped_where_the_states_before_a_patch_are_needed(tiny, monkeypatch):
    """Adding to a state needs it, reading needs every layer, and a block whose output is not a bare tensor
    (older transformers returned tuples) cannot be handed on: the same answers, every block run."""
    prompts, groups, patches = _sweep_prompts(tiny)
    monkeypatch.setattr(engine, "PASS_OVERHEAD_FLOP", 0.0)
    for kwargs in ({"mode": "add"}, {"read": True}):
        stats = ForwardStats()
        fast = predict_last(tiny, prompts, groups=groups, patches=patches, stats=stats, **kwargs)
        plain = predict_last_plain(tiny, prompts, patches=patches, **kwargs)
        assert torch.equal(fast.top_ids, plain.top_ids) and stats.skipped == 0
        if kwargs.get("read"):
            torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)

    class Marked(torch.Tensor):
        pass

    # Prompts of one length, passes free: skipping cuts the rows by depth, a Marked block 0 leaves them in one pass
    # (a prefix cache of Marked tensors could not be copied for a second).
    sweep = [i for i, p in enumerate(prompts) if len(p) == len(prompts[0])]
    prompts, groups, patches = ([x[i] for i in sweep] for x in (prompts, groups, patches))
    plain = predict_last_plain(tiny, prompts, patches=patches)
    for marked in (False, True):
        wrapped = tiny.blocks[0].register_forward_hook(lambda module, args, output: output.as_subclass(Marked)
                                                       if marked else output)
        try:
            stats = ForwardStats()
            fast = predict_last(tiny, prompts, groups=groups, patches=patches, stats=stats)
        finally:
            wrapped.remove()
        assert torch.equal(fast.top_ids, plain.top_ids)
        skips = sum(engine._row_skip(patch, 1) for patch in patches)  # each row's blocks before its patch
        assert stats.skipped == (0 if marked else skips) and (stats.forwards == 2) == marked


def test_a_blocks_own_instance_forward_comes_back_after_skipping(tiny, monkeypatch):
    """accelerate (device_map, offloading) wraps a block's forward on the instance: skipping restores that wrapper."""
    monkeypatch.setattr(engine, "PASS_OVERHEAD_FLOP", 0.0)
    block = tiny.blocks[0]
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return type(block).forward(block, *args, **kwargs)

    block.forward = wrapper
    try:
        prompts, groups, patches = _sweep_prompts(tiny, n_queries=1)
        stats = ForwardStats()
        fast = predict_last(tiny, prompts, groups=groups, patches=patches, stats=stats)
        assert stats.skipped > 0 and block.__dict__["forward"] is wrapper and calls
        assert torch.equal(fast.top_ids, predict_last_plain(tiny, prompts, patches=patches).top_ids)
    finally:
        del block.forward


def _mixed_length_prompts(lm, seed=0):
    """Groups whose suffixes (after a shared prefix) are 1 to 5 tokens, and lone prompts of 2 to 9 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, lm.tokenizer.vocab_size, (n,), generator=g).tolist()

    prompts, groups = [], []
    for k, prefix_len in enumerate([6, 11, 8]):
        prefix = ids(prefix_len)
        for n in (1, 2, 2, 5, 3, 1, 4):
            prompts.append(prefix + ids(n))
            groups.append(k)
    for k, n in enumerate((2, 9, 3, 3, 7, 2, 8)):
        prompts.append(ids(n))
        groups.append(100 + k)
    return prompts, groups


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_suffixes_split_by_length_into_several_passes_equal_the_plain_path(model_type, monkeypatch):
    """With passes made free, every suffix length runs in a pass of its own, each on its copy of the prefix
    cache: reads, patches (at the last token and before it), unpredicted rows and logits as the plain path has them."""
    lm = tvlab.tiny_model(model_type)
    prompts, groups = _mixed_length_prompts(lm)
    g = torch.Generator().manual_seed(1)
    patches = [None if i % 3 == 0 else (i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    predict = [i % 4 != 1 for i in range(len(prompts))]
    read = [i % 5 != 2 for i in range(len(prompts))]
    plain = predict_last_plain(lm, prompts, patches=patches, read=read, predict=predict)
    whole = predict_last(lm, prompts, groups=groups, patches=patches, read=read, predict=predict)
    monkeypatch.setattr(engine, "PASS_OVERHEAD_FLOP", 0.0)
    for logits in (False, True):
        fast = predict_last(lm, prompts, groups=groups, patches=patches, read=read, predict=predict, logits=logits)
        assert torch.equal(fast.top_ids, plain.top_ids)
        torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
        if logits:
            wanted = torch.tensor(predict)
            assert torch.equal(fast.logits[wanted].argmax(-1), plain.top_ids[wanted]) and (fast.logits[~wanted] == 0).all()
    # the same work in more passes: the prefixes, one pass per suffix length (5), one per lone prompts' length (5)
    assert whole.stats.forwards == 3 and fast.stats.forwards == 1 + 5 + 5
    assert (fast.stats.tokens, fast.stats.logit_rows) == (whole.stats.tokens, whole.stats.logit_rows)
    assert torch.equal(whole.top_ids, plain.top_ids)
    early = [(1, torch.randn(lm.d_model, generator=g), -2) if i % 2 else None for i in range(len(prompts))]
    fast = predict_last(lm, prompts, groups=groups, patches=early, read=True, read_position=-2)
    plain = predict_last_plain(lm, prompts, patches=early, read=True, read_position=-2)
    assert torch.equal(fast.top_ids, plain.top_ids) and fast.stats.forwards > 2
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


def test_no_row_predicted_runs_no_unembedding(tiny):
    prompts, groups = _prompt_groups(tiny, n_sets=2)
    stats = ForwardStats()
    out = predict_last(tiny, prompts, groups=groups, read=True, predict=False, stats=stats)
    assert (out.top_ids == -1).all() and stats.logit_rows == 0
    torch.testing.assert_close(out.hidden, predict_last(tiny, prompts, groups=groups, read=True).hidden)
    with pytest.raises(ValueError, match="predict needs one flag per prompt"):
        predict_last(tiny, prompts, predict=[True])


def test_run_task_fast_path_equals_the_plain_path(tiny):
    config = tvlab.ExperimentConfig(n_test=4, n_dev=4, n_baseline=6)
    fast = tvlab.run_task(tiny, "antonyms", config)
    plain = tvlab.run_task(tiny, "antonyms", tvlab.ExperimentConfig(n_test=4, n_dev=4, n_baseline=6, fast_path=False))
    assert fast.predictions.equals(plain.predictions)
    # dev and test sets (prefixes, then suffixes) and the zero-shot baseline prompts (alone), the sweep (prefix,
    # then one token per layer), and the test queries at the best layer (alone): 3 + 2 + 1
    assert fast.stats.forwards == 6
    assert plain.stats.forwards == len(plain.predictions) + 2 * 4 * 2  # one per prompt; the dev and test sets' 2 dummies too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_a_gpu_equals_the_plain_path():
    lm = tvlab.tiny_model("llama")
    lm.model.to("cuda")
    prompts, groups = _prompt_groups(lm, n_sets=6)
    g = torch.Generator().manual_seed(5)
    patches = [(i % lm.n_layers, torch.randn(lm.d_model, generator=g)) for i in range(len(prompts))]
    fast = predict_last(lm, prompts, groups=groups, patches=patches, read=True)
    plain = predict_last_plain(lm, prompts, patches=patches, read=True)
    assert torch.equal(fast.top_ids, plain.top_ids)
    torch.testing.assert_close(fast.hidden, plain.hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocks_of_tasks_on_a_gpu_give_the_cpus_predictions(tiny):
    tasks, config = ["antonyms", "next_letter", "country_capital"], tvlab.ExperimentConfig(n_test=6, n_dev=4, n_baseline=6)
    on_cpu = tvlab.reproduce.run_main(tiny, tasks, config, progress=False)
    gpu = tvlab.tiny_model("llama")
    gpu.model.to("cuda")
    assert tvlab.experiments.tasks_per_call(gpu, config) >= 3
    on_gpu = tvlab.reproduce.run_main(gpu, tasks, config, progress=False)
    assert on_gpu.stats.forwards < on_cpu.stats.forwards
    pd.testing.assert_frame_equal(on_gpu.predictions, on_cpu.predictions)


def test_auto_batch_size_fills_a_share_of_free_gpu_memory(tiny, monkeypatch):
    assert tvlab.engine.auto_batch_size(tiny, 8) == tvlab.engine.CPU_BATCH_SIZE  # on a CPU: short prompts, 256
    assert tvlab.engine.auto_batch_size(tiny, 48) == tvlab.engine.CPU_BATCH_TOKENS // 48  # long ones: a token budget
    # No whole logits per prompt (the argmax in slices): the token budget alone, up to MAX_AUTO_BATCH.
    assert tvlab.engine.auto_batch_size(tiny, 8, logits=False) == tvlab.engine.CPU_BATCH_TOKENS // 8
    assert tvlab.engine.auto_batch_size(tiny, 1, logits=False) == tvlab.engine.MAX_AUTO_BATCH
    per_prompt = tvlab.engine.bytes_per_prompt(tiny, 64)
    monkeypatch.setattr(type(tiny), "device", property(lambda self: torch.device("cuda", 0)))
    for free, want in ((100 * per_prompt, 60), (per_prompt // 2, 1), (10**9 * per_prompt, tvlab.engine.MAX_AUTO_BATCH)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        assert tvlab.engine.auto_batch_size(tiny, 64) == want


def test_bytes_per_prompt_of_llama_7b_leaves_a_16_gb_gpu_room():
    """LLaMA-7B's shapes on the meta device: the auto batch plus the weights fit in 16 GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        lm = tvlab.LanguageModel(LlamaForCausalLM(config).to(torch.bfloat16), tvlab.models.tiny_tokenizer(), "7b")
    per_prompt = tvlab.engine.bytes_per_prompt(lm, 64)
    # its key/value cache alone: 2 (keys, values) x 32 layers x 4096 x 64 tokens x 2 bytes, twice
    assert per_prompt > 2 * 2 * 32 * 4096 * 64 * 2
    weights = lm.n_params(embeddings=True) * 2
    free = 16 * 2**30 - weights - 2**30  # a 16 GB GPU with the weights and 1 GiB of CUDA context in it
    batch = int(tvlab.engine.MEMORY_SHARE * free) // per_prompt
    assert 4 <= batch <= 32 and weights + batch * per_prompt < 16 * 2**30


def test_tasks_per_call_is_one_on_a_cpu_and_bounded_by_the_reads_on_a_gpu(tiny, monkeypatch):
    config = tvlab.ExperimentConfig()
    assert tvlab.experiments.tasks_per_call(tiny, config) == 1
    monkeypatch.setattr(type(tiny), "device", property(lambda self: torch.device("cuda", 0)))
    per_task = 350 * tiny.n_layers * tiny.d_model * 4  # 50 dev x 2 dummies, 50 test x 3 prompts, 100 baseline
    assert tvlab.experiments.tasks_per_call(tiny, config) == tvlab.experiments.READ_BUDGET // per_task
    assert tvlab.experiments.tasks_per_call(tiny, dataclasses.replace(config, fast_path=False)) == 1  # plain path
    monkeypatch.setattr(tvlab.experiments, "READ_BUDGET", per_task - 1)
    assert tvlab.experiments.tasks_per_call(tiny, config) == 1  # one task per call even when it alone is over


def test_rows_not_read_are_zeros_and_the_rest_unchanged(tiny):
    prompts, groups = _prompt_groups(tiny, n_sets=2)
    want = [i % 2 == 0 for i in range(len(prompts))]
    some = predict_last(tiny, prompts, groups=groups, read=want)
    every = predict_last(tiny, prompts, groups=groups, read=True)
    plain = predict_last_plain(tiny, prompts, read=want)
    assert torch.equal(some.top_ids, every.top_ids)
    for i, wanted in enumerate(want):
        assert torch.equal(some.hidden[i], every.hidden[i]) if wanted else not some.hidden[i].any()
    torch.testing.assert_close(plain.hidden, some.hidden, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one flag per prompt"):
        predict_last(tiny, prompts, read=[True])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_last_position_attention_rows_are_each_blocks_weights(family):
    lm = tvlab.tiny_model(family)
    ids = lm.tokenizer("example:hot->cold\nexample:big->").input_ids
    before = lm.model.config._attn_implementation
    attention = tvlab.engine.last_position_attention(lm, ids)
    assert attention.shape == (lm.n_layers, len(ids)) and attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(lm.n_layers))
    assert lm.model.config._attn_implementation == before  # the model's own attention is back
    # the weights come from this prompt: another prompt of the same length reads differently
    other = lm.tokenizer("example:up->down\nexample:low->").input_ids
    assert len(other) == len(ids) and not torch.equal(tvlab.engine.last_position_attention(lm, other), attention)
    with pytest.raises(ValueError, match="no tokens"):
        tvlab.engine.last_position_attention(lm, [])
