"""Prompts: how demonstrations and a query become text and tokens, and which token does what.

>>> fmt = tvlab.FORMATS["paper"]
>>> fmt.render([tvlab.Pair("hot", "cold")], "big")
'example:hot->cold\\nexample:big->'
>>> sets = tvlab.sample_sets(tvlab.get_task("antonyms"), n_sets=3, n_demos=5, seed=41, n_dummies=2)
>>> len(sets), len(sets[0].demos), len(sets[0].dummies)     # each set: S, a query x, dummies x'
(3, 5, 2)

A *set* (the paper's unit of evaluation) is a demonstration list S, a query x and
dummy queries x' (other inputs of the task, used to read θ(S) without leaking x).
Sets are sampled with a seed, so the same seed gives the same prompts.

Token roles are named: ``PREDICT`` is the last prompt token (the arrow), whose
hidden state is the task vector and whose next-token prediction is the answer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ._checks import whole_number
from .tasks import Pair, Task, TaskError

#: Name of the token position that predicts the answer: the last token of a prompt.
PREDICT = "predict"
#: Name of the first token of the query line.
QUERY = "query"


@dataclass(frozen=True)
class PromptFormat:
    """How one demonstration is written, and what joins them.

    ``template`` holds ``{x}`` then ``{y}``; the query line is the template cut just
    before ``{y}`` (trailing spaces removed, so the answer token keeps its own space).
    ``prefix`` starts every prompt: tvlab sets it to a newline for tokenizers that add
    no beginning-of-sequence token (see :func:`tvlab.models.load_model`).
    """

    name: str
    template: str = "example:{x}->{y}"
    separator: str = "\n"
    prefix: str = ""

    def __post_init__(self) -> None:
        if "{x}" not in self.template or not self.template.endswith("{y}") or self.template.index("{x}") > self.template.index("{y}"):
            raise ValueError(f"prompt template {self.template!r} must contain {{x}} and end with {{y}}, e.g. 'example:{{x}}->{{y}}'.")

    def _parts(self) -> tuple[str, str]:
        """The template's text before ``{x}`` and between ``{x}`` and ``{y}`` (``"example:"``, ``"->"``)."""
        before, after = self.template.split("{x}", 1)
        return before, after[: -len("{y}")]

    def demo(self, x: str, y: str) -> str:
        before, between = self._parts()  # one substitution: an input that contains "{y}" stays as written
        return before + x + between + y

    def query(self, x: str) -> str:
        before, between = self._parts()
        return (before + x + between).rstrip(" ")

    def ambiguous(self, pairs: Sequence[Pair]) -> list[str]:
        """The inputs and answers that contain the text joining input to answer (``->`` in the paper's
        format, or a separator between demonstrations): a model reading such a prompt cannot tell where the
        input ends."""
        marks = self.marks()
        return [text for p in pairs for text in (p.input, *p.answers) if any(m in text for m in marks)]

    def marks(self) -> list[str]:
        """The text between input and answer, and between demonstrations, that a model reads as structure."""
        return [m for m in (self._parts()[1].strip(), self.separator.strip()) if m]

    def render(self, demos: Sequence[Pair], query: str) -> str:
        """The prompt text: ``prefix``, the demonstrations, then the query line."""
        lines = [self.demo(p.input, p.output) for p in demos] + [self.query(query)]
        return self.prefix + self.separator.join(lines)

    def with_prefix(self, prefix: str) -> "PromptFormat":
        return replace(self, prefix=prefix)


FORMATS: dict[str, PromptFormat] = {
    "paper": PromptFormat("paper", "example:{x}->{y}", "\n"),
    "arrow": PromptFormat("arrow", "{x} -> {y}", "\n"),
    "qa": PromptFormat("qa", "Q: {x}\nA: {y}", "\n\n"),
}


def get_format(fmt: str | PromptFormat) -> PromptFormat:
    if isinstance(fmt, PromptFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)} or pass a tvlab.PromptFormat.")
    return FORMATS[fmt]


@dataclass(frozen=True)
class PromptSet:
    """One evaluation set: demonstrations S, the test query x, dummy queries x'."""

    demos: tuple[Pair, ...]
    query: Pair
    dummies: tuple[Pair, ...] = ()


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of a prompt and the positions of its named roles (``PREDICT``, ``QUERY``)."""

    text: str
    ids: tuple[int, ...]
    positions: dict

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer, fmt: PromptFormat, demos: Sequence[Pair], query: str) -> TokenizedPrompt:
    """Tokenize a prompt and name its roles. The tokenizer adds its own BOS if it has one."""
    text = fmt.render(demos, query)
    ids = tuple(tokenizer(text).input_ids)
    head = text[: len(text) - len(fmt.query(query))]
    n_head = len(tokenizer(head).input_ids) if head else _n_special_prefix(tokenizer)
    return TokenizedPrompt(text, ids, {PREDICT: len(ids) - 1, QUERY: min(n_head, len(ids) - 1)})


def prompt_ids(tokenizer, fmt: PromptFormat, items: Sequence[tuple[Sequence[Pair], str]]) -> list[tuple[int, ...]]:
    """Token ids of many prompts, each ``(demos, query)``, in one batched tokenizer call.

    The same ids as ``tokenize(tokenizer, fmt, demos, query).ids`` for each item (a batch is
    encoded item by item, without padding: :func:`encode_batch`), at a fraction of the cost of
    one call per prompt: the protocol tokenizes about 16,000 prompts.
    """
    if not items:
        return []
    return [tuple(ids) for ids in encode_batch(tokenizer, [fmt.render(demos, query) for demos, query in items])]


def encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``tokenizer(texts).input_ids``, about twice as fast for a fast (Rust) tokenizer.

    A fast tokenizer's Rust core encodes the batch directly, without the character offsets
    and the Python objects the wrapper builds. Every call first encodes one text the usual way,
    which also clears any padding or truncation an earlier call left switched on in the core,
    and uses the core only when it is then in its plain state and gives that text the same ids
    (the first batch of a tokenizer: its first 8 texts). A tokenizer that does something of its
    own in Python fails that check once and keeps the usual path.
    """
    core = getattr(tokenizer, "_tokenizer", None)
    texts = list(texts)
    if not texts or not hasattr(core, "encode_batch_fast") or getattr(tokenizer, "_tvlab_fast_encode", None) is False:
        return tokenizer(texts).input_ids
    first = tokenizer(texts[:8] if getattr(tokenizer, "_tvlab_fast_encode", None) is None else texts[:1]).input_ids
    plain = (core.padding is None and core.truncation is None
             and bool(getattr(core, "encode_special_tokens", False)) == bool(getattr(tokenizer, "split_special_tokens", False)))
    if not plain:
        return tokenizer(texts).input_ids
    ids = [e.ids for e in core.encode_batch_fast(texts)]
    if ids[:len(first)] != first:
        try:
            tokenizer._tvlab_fast_encode = False
        except AttributeError:  # a tokenizer that takes no new attributes is checked on 8 texts every call
            pass
        return tokenizer(texts).input_ids
    try:
        tokenizer._tvlab_fast_encode = True
    except AttributeError:
        pass
    return ids


def _n_special_prefix(tokenizer) -> int:
    return len(tokenizer("").input_ids)


def _rng(seed: int, task_name: str, split: str) -> np.random.Generator:
    # A stable hash (Python's hash() is salted per process): same seed, same sets, anywhere.
    return np.random.default_rng([seed, zlib.crc32(task_name.encode()), zlib.crc32(split.encode())])


def sample_sets(task: Task, n_sets: int, n_demos: int, seed: int, split: str = "test",
                n_dummies: int = 0) -> list[PromptSet]:
    """``n_sets`` independent sets of ``n_demos`` demonstrations, a query and dummy queries.

    Within a set all examples are distinct. ``split`` names an independent stream
    ("test", "dev", "baseline"), so dev and test sets never share a random draw.
    """
    for what, value in (("n_sets", n_sets), ("n_demos", n_demos), ("n_dummies", n_dummies), ("seed", seed)):
        if (number := whole_number(value)) is None or number < 0:
            raise ValueError(f"{what} must be a whole number >= 0, got {value!r}.")
    need = n_demos + 1 + n_dummies
    if len(task.pairs) < need:
        raise TaskError(f"task {task.name!r} has {len(task.pairs)} usable pairs but a set needs {need} distinct ones "
                        f"({n_demos} demonstrations + 1 query + {n_dummies} dummy queries). Use fewer demonstrations "
                        "or add pairs to the task.")
    rng = _rng(seed, task.name, split)
    sets = []
    for _ in range(n_sets):
        idx = rng.choice(len(task.pairs), size=need, replace=False)
        picked = [task.pairs[i] for i in idx]
        sets.append(PromptSet(tuple(picked[:n_demos]), picked[n_demos], tuple(picked[n_demos + 1:])))
    return sets


@dataclass(frozen=True)
class FilterReport:
    """How many pairs of a task survive the single-token-answer filter for one tokenizer."""

    task: str
    total: int
    kept: int
    dropped_examples: tuple[str, ...]
    scoring: str = "exact"
    multi_token_kept: int = 0     # prefix scoring: kept pairs whose answer takes several tokens

    def __str__(self) -> str:
        if self.scoring == "prefix":
            text = (f"{self.task}: {self.kept}/{self.total} pairs kept; scored by prefix (the paper's rule for "
                    f"knowledge tasks), so {self.multi_token_kept} answers of several tokens stay and count as "
                    "right when the first token starts them")
        else:
            text = f"{self.task}: {self.kept}/{self.total} pairs kept (their answer is one token)"
        dropped = self.total - self.kept
        if dropped:
            text += f"; {dropped} dropped, e.g. {', '.join(self.dropped_examples)}"
        return text


def answer_token_counts(tokenizer, fmt: PromptFormat, pairs: Sequence[Pair]) -> list[int]:
    """How many tokens each pair's answer takes right after its query line.

    Measured in context (query line, then answer) because most tokenizers merge a
    leading space into the word that follows it. -1 means the query's own tokens changed
    when the answer was appended (the answer cannot be read as separate tokens).
    """
    queries = [fmt.prefix + fmt.query(p.input) for p in pairs]
    fulls = [fmt.prefix + fmt.demo(p.input, p.output) for p in pairs]
    q_ids = encode_batch(tokenizer, queries)
    f_ids = encode_batch(tokenizer, fulls)
    return [len(f) - len(q) if f[: len(q)] == q else -1 for q, f in zip(q_ids, f_ids)]


def single_token_filter(task: Task, tokenizer, fmt: PromptFormat, min_pairs: int = 0) -> tuple[Task, FilterReport]:
    """Keep the pairs whose answer is one token for this tokenizer (the paper's rule).

    Tasks scored by prefix (knowledge) keep every pair: their first token is scored by
    prefix match, as in the paper. Raises :class:`TaskError` if fewer than ``min_pairs``
    remain, saying how many were dropped and why.
    """
    counts = answer_token_counts(tokenizer, fmt, task.pairs)
    if task.scoring == "prefix":
        keep = [c >= 1 for c in counts]
    else:
        keep = [c == 1 for c in counts]
    kept = [p for p, k in zip(task.pairs, keep) if k]
    dropped = list(dict.fromkeys(repr(p.output) for p, k in zip(task.pairs, keep) if not k))[:3]
    report = FilterReport(task.name, len(task.pairs), len(kept), tuple(dropped), task.scoring,
                          sum(c > 1 for c, k in zip(counts, keep) if k))
    if len(kept) < min_pairs:
        advice = ("Add pairs to the task, or use fewer demonstrations." if len(kept) == len(task.pairs) else
                  "Answers must be a single token for this model's tokenizer: use shorter, more common "
                  "answers, add pairs, or use fewer demonstrations.")
        raise TaskError(f"{report}; {len(kept)} usable pairs remain but a set needs {min_pairs}. {advice}")
    note = f"single-token filter: {len(kept)}/{len(task.pairs)} kept"
    return task.with_pairs(kept, note), report
