import pytest

import tvlab
from tvlab.prompts import FORMATS, PREDICT, QUERY, PromptFormat, answer_token_counts, sample_sets, tokenize
from tvlab.tasks import Pair, TaskError


def test_paper_format_renders_like_the_original_code():
    text = FORMATS["paper"].render([Pair("hot", "cold"), Pair("up", "down")], "big")
    assert text == "example:hot->cold\nexample:up->down\nexample:big->"
    assert FORMATS["arrow"].render([Pair("a", "b")], "c") == "a -> b\nc ->"
    assert FORMATS["qa"].render([Pair("a", "b")], "c") == "Q: a\nA: b\n\nQ: c\nA:"


def test_bad_template_is_refused():
    with pytest.raises(ValueError, match="must contain"):
        PromptFormat("bad", "{y} <- {x}")


def test_sampling_is_seeded_distinct_and_split():
    task = tvlab.get_task("antonyms")
    a = sample_sets(task, 20, 5, seed=41, split="test", n_dummies=2)
    assert a == sample_sets(task, 20, 5, seed=41, split="test", n_dummies=2)
    assert a != sample_sets(task, 20, 5, seed=42, split="test", n_dummies=2)
    assert a != sample_sets(task, 20, 5, seed=41, split="dev", n_dummies=2)
    for s in a:
        inputs = [p.input for p in (*s.demos, s.query, *s.dummies)]
        assert len(inputs) == len(set(inputs)) == 8


def test_too_few_pairs_is_a_clear_error():
    task = tvlab.Task("tiny", "custom", tuple(Pair(str(i), str(i + 1)) for i in range(5)))
    with pytest.raises(TaskError, match="needs 8 distinct"):
        sample_sets(task, 1, 5, seed=0, n_dummies=2)


def test_roles_are_named_positions(tiny):
    tp = tokenize(tiny.tokenizer, FORMATS["paper"], [Pair("hot", "cold")], "big")
    assert tp.positions[PREDICT] == len(tp.ids) - 1
    assert tiny.tokenizer.convert_ids_to_tokens(tp.ids[tp.positions[PREDICT]]) == "->"
    assert tiny.tokenizer.convert_ids_to_tokens(tp.ids[tp.positions[QUERY]]) == "example"


def test_single_token_filter_counts_answers_in_context(tiny):
    fmt = FORMATS["paper"]
    assert answer_token_counts(tiny.tokenizer, fmt, [Pair("a", "b"), Pair("a", "b c")]) == [1, 2]
    task = tvlab.Task("t", "custom", tuple([Pair(f"x{i}", "dog") for i in range(10)] + [Pair("y", "two words")]))
    kept, report = tvlab.single_token_filter(task, tiny.tokenizer, fmt)
    assert report.kept == 10 and report.total == 11 and len(kept) == 10
    with pytest.raises(TaskError, match="10 usable pairs remain but a set needs 11"):
        tvlab.single_token_filter(task, tiny.tokenizer, fmt, min_pairs=11)


def test_filter_report_says_what_was_dropped_and_what_prefix_scoring_keeps(tiny):
    from tvlab.prompts import FilterReport

    exact = FilterReport("en_es", 584, 111, ("'perro'", "'gato'"))
    assert str(exact) == "en_es: 111/584 pairs kept (their answer is one token); 473 dropped, e.g. 'perro', 'gato'"
    prefix = FilterReport("country_capital", 195, 195, (), "prefix", 40)
    assert "195/195 pairs kept; scored by prefix" in str(prefix) and "40 answers of several tokens" in str(prefix)
    strict = tvlab.get_task("country_capital").with_scoring("exact")
    assert strict.scoring == "exact" and not strict.score("Lux", tvlab.Pair("Luxembourg", "Luxembourg City"))
    assert tvlab.get_task("country_capital").score("Lux", tvlab.Pair("Luxembourg", "Luxembourg City"))


@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_batched_fast_encoding_gives_the_tokenizers_own_ids(which, request):
    from tvlab.prompts import encode_batch, prompt_ids

    tokenizer = request.getfixturevalue(which).tokenizer
    fmt = FORMATS["paper"]
    sets = sample_sets(tvlab.get_task("country_capital"), n_sets=20, n_demos=5, seed=3, n_dummies=1)
    texts = [fmt.render(s.demos, s.query.input) for s in sets] + ["", " spaces  and\ttabs\n", "ünïcödé ->"]
    assert encode_batch(tokenizer, texts) == tokenizer(texts).input_ids
    assert tokenizer._tvlab_fast_encode is True  # the fast path was taken, not the tokenizer's own
    items = [(s.demos, s.query.input) for s in sets]
    assert prompt_ids(tokenizer, fmt, items) == [tokenize(tokenizer, fmt, d, q).ids for d, q in items]


def test_a_tokenizer_whose_fast_encoding_differs_keeps_its_own(tiny):
    from transformers import PreTrainedTokenizerFast

    from tvlab.prompts import encode_batch

    class Lowercasing(PreTrainedTokenizerFast):  # does something in Python the Rust core does not know
        def __call__(self, text, **kwargs):
            return super().__call__([t.lower() for t in text] if isinstance(text, list) else text.lower(), **kwargs)

    tokenizer = Lowercasing(tokenizer_object=tiny.tokenizer._tokenizer, bos_token="<bos>", pad_token="<pad>")
    texts = ["Big->small", "HOT->cold"]
    assert encode_batch(tokenizer, texts) == tokenizer(texts).input_ids != [e.ids for e in tokenizer._tokenizer.encode_batch(texts)]
    assert tokenizer._tvlab_fast_encode is False
    assert encode_batch(tokenizer, texts[:1]) == tokenizer(texts[:1]).input_ids


def test_padding_or_truncation_left_on_by_another_call_does_not_reach_the_prompts(tiny):
    from tvlab.prompts import encode_batch

    texts = ["example:hot->", "example:hot->cold\nexample:big->"]
    want = tiny.tokenizer(texts).input_ids
    tiny.tokenizer(["a", "a b c d e f"], return_tensors="pt", padding=True)  # as a hooks example does
    assert encode_batch(tiny.tokenizer, texts) == want
    tiny.tokenizer(["a b c d e f"], truncation=True, max_length=3)
    assert encode_batch(tiny.tokenizer, texts) == want
