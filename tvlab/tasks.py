"""Tasks: sets of (input, output) pairs, and how an answer to them is scored.

>>> import tvlab
>>> task = tvlab.get_task("country_capital")
>>> task.category, task.scoring, len(task)
('knowledge', 'prefix', 195)
>>> task.pairs[0]
Pair(input='Afghanistan', output='Kabul', accept=())
>>> task.score(" Kab", task.pairs[0]), task.score("Paris", task.pairs[0])   # a decoded first token
(True, False)

The paper's 18 tasks come in four categories. The algorithmic ones are generated
here; the others are JSON files in ``data/`` written for this project (see
``data/README.md``). Your own task is a JSON list of ``{"input", "output"}``
objects, a JSON object ``{"input": "output", ...}`` (the format of the paper's own
files) or a two-column CSV: ``tvlab.load_task("path/to/file.json")``.
"""

from __future__ import annotations

import csv
import difflib
import json
import string
import warnings
from collections import abc
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

Category = Literal["algorithmic", "translation", "linguistic", "knowledge", "custom"]
Scoring = Literal["exact", "prefix"]

CATEGORIES: tuple[str, ...] = ("algorithmic", "translation", "linguistic", "knowledge")

#: The paper's 18 tasks by category, in the paper's order (plus singular_plural,
#: the reverse of plural_singular, which tvlab adds).
PAPER_TASKS: dict[str, tuple[str, ...]] = {
    "algorithmic": ("next_letter", "prev_letter", "list_first", "list_last", "to_upper", "to_lower"),
    "translation": ("fr_en", "es_en", "en_fr", "en_es"),
    "linguistic": ("present_simple_gerund", "present_simple_past_simple", "plural_singular", "antonyms"),
    "knowledge": ("country_capital", "person_language", "location_continent", "location_religion"),
}
EXTRA_TASKS: dict[str, str] = {"singular_plural": "linguistic"}


class TaskError(ValueError):
    """A task name or task file that tvlab cannot use; the message says what to do."""


@dataclass(frozen=True)
class Pair:
    """One example of a task: ``input -> output``; ``accept`` lists other correct answers."""

    input: str
    output: str
    accept: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        accept = self.accept
        if accept is None:
            accept = ()
        elif isinstance(accept, str):
            accept = (accept,)  # one other answer, not its letters
        elif not isinstance(accept, (tuple, list)):
            raise TaskError(f"pair {self.input!r}: accept must be a list of other correct answers, got {accept!r}.")
        object.__setattr__(self, "accept", tuple(accept))

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.output, *self.accept)


@dataclass(frozen=True)
class Task:
    """A named set of pairs and the rule that scores a predicted first token.

    ``scoring="exact"``: the stripped first token must equal an answer (the paper's
    metric). ``scoring="prefix"``: knowledge tasks accept a prefix match in either
    direction, as in the paper (" Buenos" for "Buenos Aires").
    """

    name: str
    category: str
    pairs: tuple[Pair, ...]
    scoring: Scoring = "exact"
    description: str = ""
    source: str = ""
    allow_multiple_outputs: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.scoring not in ("exact", "prefix"):
            raise TaskError(f"task {self.name!r}: scoring must be 'exact' or 'prefix', got {self.scoring!r}.")
        if isinstance(self.pairs, (str, Pair)) or not isinstance(self.pairs, abc.Iterable):
            raise TaskError(f"task {self.name!r}: pairs must be a list of Pair(input, output), got {type(self.pairs).__name__}.")
        # (input, output) tuples are pairs too; a list is kept as a tuple, like every other field.
        pairs = tuple(Pair(*p) if isinstance(p, (tuple, list)) and not isinstance(p, Pair) and len(p) in (2, 3) else p
                      for p in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        _validate_pairs(self.name, self.pairs, self.allow_multiple_outputs)

    def __len__(self) -> int:
        return len(self.pairs)

    def score(self, predicted: str, pair: Pair) -> bool:
        """Is ``predicted`` (a decoded first token) a correct answer for ``pair``?"""
        guess = predicted.strip()
        if not guess:
            return False
        if self.scoring == "exact":
            return guess in pair.answers
        return any(a.startswith(guess) or guess.startswith(a) for a in pair.answers)

    def with_scoring(self, scoring: Scoring) -> "Task":
        """The same task under another scoring rule: ``"exact"`` is the strict alternative to a
        knowledge task's ``"prefix"`` (only one-token answers survive the filter, matched whole)."""
        if scoring not in ("exact", "prefix"):
            raise TaskError(f"scoring must be 'exact' or 'prefix', got {scoring!r}.")
        return replace(self, scoring=scoring, notes=self.notes + (f"scored {scoring}",))

    def with_pairs(self, pairs: Iterable[Pair], note: str | None = None) -> "Task":
        """The same task restricted to ``pairs`` (e.g. after the single-token filter)."""
        notes = self.notes + ((note,) if note else ())
        return Task(self.name, self.category, tuple(pairs), self.scoring, self.description,
                    self.source, self.allow_multiple_outputs, notes)


def _validate_pairs(name: str, pairs: tuple[Pair, ...], allow_multiple: bool) -> None:
    seen: dict[str, str] = {}
    for i, p in enumerate(pairs):
        if not isinstance(p, Pair):
            raise TaskError(f"task {name!r}, pair {i}: expected a Pair(input, output) or an (input, output) tuple, "
                            f"got {p!r}.")
        for what, value in (("input", p.input), ("output", p.output)):
            if not isinstance(value, str) or not value.strip():
                raise TaskError(f"task {name!r}, pair {i} (input {p.input!r}): the {what} is empty. Remove the row or fill it in.")
            if "\n" in value:
                raise TaskError(f"task {name!r}, pair {i}: the {what} {value!r} contains a newline; prompts are one line per example.")
        if p.input in seen and seen[p.input] != p.output and not allow_multiple:
            raise TaskError(
                f"task {name!r}: the input {p.input!r} is mapped to two outputs ({seen[p.input]!r} and "
                f"{p.output!r}). Keep one and list the other under \"accept\", or remove the duplicate.")
        if p.input in seen and seen[p.input] == p.output:
            raise TaskError(f"task {name!r}: the pair {p.input!r} -> {p.output!r} is listed twice; remove the copy "
                            "(a repeated pair could be a query and its own demonstration).")
        seen.setdefault(p.input, p.output)


# --------------------------------------------------------------------------- data files

def data_dir() -> Path:
    """The folder holding the task JSON files (inside the wheel, or the repo's ``data/``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data", here.parent / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"tvlab's task data is missing (looked in {here / '_data'} and {here.parent / 'data'}); reinstall tvlab.")


def _pairs_from_records(records: list, origin: str) -> tuple[Pair, ...]:
    if not isinstance(records, list):
        raise TaskError(f"{origin}: expected a JSON list of {{\"input\": ..., \"output\": ...}} objects, got {type(records).__name__}.")
    pairs = []
    for i, row in enumerate(records):
        if not isinstance(row, dict) or "input" not in row or "output" not in row:
            raise TaskError(f"{origin}: row {i} ({row!r}) needs both \"input\" and \"output\" keys.")
        output, accept = row["output"], row.get("accept")
        accept = [] if accept is None else [accept] if isinstance(accept, str) else accept  # null: pandas' NaN
        if not isinstance(accept, (list, tuple)) or any(a is None or isinstance(a, (dict, list)) for a in accept):
            raise TaskError(f"{origin}: row {i} has accept {accept!r}; it must be a list of other correct "
                            "answers (strings), or left out.")
        if isinstance(output, list) and output:  # a list of outputs, as in the JSON object format: the first is shown
            output, accept = output[0], [*output[1:], *accept]
        for what, value in (("input", row["input"]), ("output", output)):
            if value is None or isinstance(value, (dict, list, bool)):
                raise TaskError(f"{origin}: row {i} has the {what} {value!r}; it must be a string. Fill it in or remove the row.")
        pairs.append(Pair(str(row["input"]).strip(), str(output).strip(), tuple(str(a).strip() for a in accept)))
    return tuple(pairs)


def _load_data_file(path: Path) -> Task:
    spec = json.loads(path.read_text(encoding="utf-8"))
    category = spec["category"]
    return Task(
        name=spec["task"],
        category=category,
        pairs=_pairs_from_records(spec["pairs"], str(path)),
        scoring="prefix" if category == "knowledge" else "exact",
        description=spec.get("description", ""),
        source=spec.get("source", ""),
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TaskError(f"task file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at position {e.start}). "
                        "Save it with the UTF-8 encoding (in Excel: 'CSV UTF-8'; in an editor: save with encoding "
                        "UTF-8) and try again.") from None


#: Column names a table from another project may use for a task's two columns (compared in lower case).
INPUT_COLUMNS = ("input", "source", "src", "prompt", "question", "query", "x")
OUTPUT_COLUMNS = ("output", "target", "tgt", "completion", "answer", "label", "y")


def _table_records(path: Path, text: str, delimiter: str) -> list[dict]:
    """A CSV (or TSV) table: two columns of input, output; or a header row naming them among other columns."""
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in r)]
    kind = "TSV" if delimiter == "\t" else "CSV"
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    columns = [next((header.index(n) for n in names if n in header), None) for names in (INPUT_COLUMNS, OUTPUT_COLUMNS)]
    named = next((c for c in columns if c is not None), None)
    if columns.count(None) == 1 and len(header[named]) > 1:  # a header row naming one column, e.g. word,output
        known, missing = ("input", "output") if columns[0] is not None else ("output", "input")
        if len(header) != 2:
            names = OUTPUT_COLUMNS if missing == "output" else INPUT_COLUMNS
            raise TaskError(f"{path}: the header row names the {known} column ({rows[0][named].strip()!r}) but no "
                            f"{missing} column: name the {missing} column one of {', '.join(names)}.")
        columns = [named if c is not None else 1 - named for c in columns]  # two columns: the other one is the other
    if None not in columns:  # a header row: read the two named columns, whatever else the table holds
        i, o = columns
        short = [n for n, r in enumerate(rows[1:], start=2) if len(r) <= max(i, o)]
        if short:
            raise TaskError(f"{path}: row {short[0]} has {len(rows[short[0] - 1])} columns; the header names the "
                            f"input in column {i + 1} and the output in column {o + 1}.")
        return [{"input": r[i], "output": r[o]} for r in rows[1:]]
    bad = [n for n, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise TaskError(f"{path}: row {bad[0] + 1} has {len(rows[bad[0]])} columns; a task {kind} has exactly two "
                        "(input, output), or a header row that names its input and output columns (e.g. input,output "
                        f"or source,target) among others.")
    return [{"input": r[0], "output": r[1]} for r in rows]


def _jsonl_records(path: Path, text: str) -> list:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {n} is not valid JSON ({e}). A .jsonl task file holds one "
                                "{\"input\": ..., \"output\": ...} object per line.") from None
    return records


def _mapping_records(path: Path, mapping: dict) -> list[dict]:
    """The paper's format: ``{"hot": "cold", ...}``; a list value is the output, then other accepted answers."""
    records = []
    for key, value in mapping.items():
        answers = value if isinstance(value, list) else [value]
        if not answers or any(isinstance(a, (dict, list)) or a is None for a in answers):
            raise TaskError(f"{path}: the input {key!r} maps to {value!r}; in a JSON object task file every input maps "
                            "to an output string (or a list of accepted output strings).")
        records.append({"input": key, "output": answers[0], "accept": [str(a) for a in answers[1:]]})
    return records


def _json_data(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} is not valid JSON ({e}). A task file is a JSON list of "
                        "{\"input\": ..., \"output\": ...} objects, a JSON object {\"input\": \"output\", ...}, "
                        "or a two-column CSV.") from None


def _json_records(path: Path, data) -> list:
    if isinstance(data, dict):
        return data["pairs"] if "pairs" in data else _mapping_records(path, data)
    return data


def _merge_multiple_outputs(path: Path, pairs: tuple[Pair, ...]) -> tuple[Pair, ...]:
    """One pair per input that has several outputs: the first is the output, the others are accepted too."""
    answers: dict[str, list[str]] = {}
    outputs: dict[str, set[str]] = {}
    for p in pairs:
        answers.setdefault(p.input, [])
        answers[p.input] += [a for a in p.answers if a not in answers[p.input]]
        outputs.setdefault(p.input, set()).add(p.output)
    conflicted = {x for x, outs in outputs.items() if len(outs) > 1}
    seen: set[str] = set()
    repeats = 0
    for p in pairs:
        repeats += p.input in seen and p.input not in conflicted
        seen.add(p.input)
    if not conflicted and not repeats:
        return pairs
    if conflicted:
        ordered = [x for x in answers if x in conflicted]
        shown = ", ".join(repr(x) for x in ordered[:3]) + (", ..." if len(ordered) > 3 else "")
        warnings.warn(f"{path}: {len(conflicted)} input(s) have several outputs ({shown}); each is kept once, its first "
                      "output shown in prompts and every listed output accepted as a correct answer.", UserWarning,
                      stacklevel=3)
    if repeats:
        warnings.warn(f"{path}: {repeats} row(s) repeat an earlier row; each pair is kept once (a repeated pair could "
                      "be a query and its own demonstration).", UserWarning, stacklevel=3)
    merged, done = [], set()
    for p in pairs:
        if p.input not in done:
            done.add(p.input)
            merged.append(Pair(p.input, answers[p.input][0], tuple(answers[p.input][1:])))
    return tuple(merged)


#: The task file formats :func:`load_task` reads, by file name ending.
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


def is_task_file(name_or_path: str | Path) -> bool:
    """Does ``name_or_path`` name a task file rather than a built-in task?

    A Path; or a name of no built-in task that has a file name ending (``.json``, ``.txt``, ...),
    a folder in it, or names an existing file or folder (:func:`load_task` says what is wrong
    with one it cannot read).
    """
    if isinstance(name_or_path, Path):
        return True
    name = str(name_or_path)
    return name not in list_tasks() and (Path(name).suffix != "" or "/" in name or "\\" in name or Path(name).exists())


def load_task(path: str | Path, name: str | None = None, scoring: Scoring | None = None) -> Task:
    """Load a user task: a JSON list of ``{"input", "output"}`` objects, a JSON object
    ``{"input": "output", ...}`` (the paper's files), JSON Lines (one object per line), or a CSV
    or TSV table: two columns, or a header row naming the input and output columns among others
    (``input``/``output``, ``source``/``target``, ``prompt``/``completion``, ``question``/``answer``, ...;
    in a two-column table one such name is enough, e.g. ``word,output``). A first row that names
    neither column (``word,antonym``) is read as a pair: rename its columns.

    An input listed with several outputs is kept once, with every output accepted (a
    UserWarning names such inputs). ``scoring="prefix"`` scores like the paper's knowledge tasks.
    A JSON file in tvlab's own format (``{"task": ..., "category": ..., "pairs": [...]}``, as in
    tvlab's ``data/``) keeps its category, description and source, and a knowledge task its prefix
    scoring (``scoring=None``: the file's rule, else exact); the name is still the file's.

    >>> from pathlib import Path
    >>> _ = Path("antonyms_fr.json").write_text('[{"input": "chaud", "output": "froid"}, {"input": "grand", "output": "petit"}]')
    >>> task = tvlab.load_task("antonyms_fr.json")
    >>> task.name, task.category, len(task), task.pairs[0]
    ('antonyms_fr', 'custom', 2, Pair(input='chaud', output='froid', accept=()))
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in TASK_FILE_SUFFIXES)
        listed = f" It holds {len(found)} task file(s): {' '.join(found[:8])}{' ...' if len(found) > 8 else ''}." if found else ""
        raise TaskError(f"{str(path)!r} is a folder; name the task files themselves.{listed}")
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in TASK_FILE_SUFFIXES:
        raise TaskError(f"{str(path)!r} is not a task file tvlab reads: it reads .json (a list of {{\"input\", "
                        "\"output\"} objects, or {\"input\": \"output\", ...}), .jsonl (one object per line), "
                        ".csv and .tsv (input and output columns). Save it as one of these.")
    if scoring not in ("exact", "prefix", None):
        raise TaskError(f"unknown scoring rule {scoring!r}; choose 'exact' or 'prefix'.")
    name = name or path.stem
    text = _read_text(path)
    data = _json_data(path, text) if suffix == ".json" else None
    # tvlab's own format ({"task", "category", "pairs", ...}, as in its data/): keep what the file says of itself
    spec = data if isinstance(data, dict) and isinstance(data.get("pairs"), list) else {}
    category = spec.get("category") if spec.get("category") in CATEGORIES else "custom"
    scoring = scoring or ("prefix" if category == "knowledge" else "exact")
    records = (_table_records(path, text, "," if suffix == ".csv" else "\t") if suffix in (".csv", ".tsv")
               else _jsonl_records(path, text) if suffix == ".jsonl" else _json_records(path, data))
    pairs = _pairs_from_records(records, str(path))
    if not pairs:
        raise TaskError(f"{path} holds no pairs.")
    description = spec.get("description") if isinstance(spec.get("description"), str) else ""
    origin = spec.get("source") if isinstance(spec.get("source"), str) and spec.get("source") else str(path)
    return Task(name=name, category=category, pairs=_merge_multiple_outputs(path, pairs), scoring=scoring,
                description=description or f"user task from {path.name}", source=origin)


# --------------------------------------------------------------------------- algorithmic tasks

def _letters(shift: int) -> tuple[Pair, ...]:
    pairs = []
    for alphabet in (string.ascii_lowercase, string.ascii_uppercase):
        for i, c in enumerate(alphabet):
            j = i + shift
            if 0 <= j < len(alphabet):
                pairs.append(Pair(c, alphabet[j]))
    return tuple(pairs)


@lru_cache(maxsize=1)
def _word_pool() -> tuple[str, ...]:
    """Plain lower-case nouns for the generated tasks (the singular nouns of our data)."""
    spec = json.loads((data_dir() / "singular_plural.json").read_text(encoding="utf-8"))
    words = sorted({p["input"] for p in spec["pairs"] if p["input"].isalpha() and 3 <= len(p["input"]) <= 8})
    return tuple(words)


def _case_pairs(upper: bool) -> tuple[Pair, ...]:
    letters = [Pair(c, c.upper()) if upper else Pair(c.upper(), c) for c in string.ascii_lowercase]
    words = [Pair(w, w.upper()) if upper else Pair(w.upper(), w) for w in _word_pool()]
    return tuple(letters + words)


def _list_pairs(first: bool, n: int = 400, seed: int = 0) -> tuple[Pair, ...]:
    rng = np.random.default_rng(seed)
    words = _word_pool()
    pairs, seen = [], set()
    while len(pairs) < n:
        k = int(rng.integers(2, 5))
        items = [words[i] for i in rng.choice(len(words), size=k, replace=False)]
        text = ", ".join(items)
        if text not in seen:
            seen.add(text)
            pairs.append(Pair(text, items[0] if first else items[-1]))
    return tuple(pairs)


_GENERATED = {
    "next_letter": (lambda: _letters(+1), "A letter -> the next letter of the alphabet."),
    "prev_letter": (lambda: _letters(-1), "A letter -> the previous letter of the alphabet."),
    "list_first": (lambda: _list_pairs(first=True), "A comma list of 2-4 words -> its first item."),
    "list_last": (lambda: _list_pairs(first=False), "A comma list of 2-4 words -> its last item."),
    "to_upper": (lambda: _case_pairs(upper=True), "A letter or word -> the same in upper case."),
    "to_lower": (lambda: _case_pairs(upper=False), "An upper-case letter or word -> the same in lower case."),
}


# --------------------------------------------------------------------------- registry

def list_tasks(category: str | None = None, include_extra: bool = True) -> list[str]:
    """Task names, in the paper's order (its 18 tasks, then tvlab's extras)."""
    if category is not None and category not in PAPER_TASKS:
        raise TaskError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}.")
    names = [t for c, ts in PAPER_TASKS.items() if category in (None, c) for t in ts]
    if include_extra:
        names += [t for t, c in EXTRA_TASKS.items() if category in (None, c)]
    return names


def task_category(name: str) -> str:
    for c, ts in PAPER_TASKS.items():
        if name in ts:
            return c
    return EXTRA_TASKS.get(name, "custom")


@lru_cache(maxsize=None)
def _builtin_task(name: str) -> Task:
    if name in _GENERATED:
        make, description = _GENERATED[name]
        return Task(name, "algorithmic", make(), "exact", description, source="generated by tvlab.tasks")
    return _load_data_file(data_dir() / f"{name}.json")


def as_task_list(tasks, distinct: bool = False) -> list:
    """``tasks`` as a list: one name, path or :class:`Task` becomes a list of it (not of a name's letters).

    An empty list is a :class:`TaskError` (nothing would run); with ``distinct``, so is a task named twice
    (its vectors or results would be counted twice).
    """
    out = [tasks] if isinstance(tasks, (str, Path, Task)) else list(tasks)
    if not out:
        raise TaskError("no tasks given: name at least one, e.g. ['antonyms'] (tvlab.list_tasks() lists them).")
    if distinct:
        names = [t.name if isinstance(t, Task) else Path(t).stem if is_task_file(t) else str(t) for t in out]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise TaskError(f"task(s) {', '.join(map(repr, twice))} named more than once: list each task once.")
    return out


def get_task(name_or_path: str | Path) -> Task:
    """A built-in task by name (``"antonyms"``), or a user task file by path.

    An unknown name raises :class:`TaskError` listing the closest known names.
    """
    if isinstance(name_or_path, (list, tuple, set)):
        raise TaskError(f"expected one task, got {len(name_or_path)} ({name_or_path!r}): pass one name, or run several "
                        "with tvlab.reproduce.run_main(lm, tasks).")
    if is_task_file(name_or_path):
        return load_task(name_or_path)
    name = str(name_or_path)
    known = list_tasks()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)}. "
                        "A path to a .json, .jsonl, .csv or .tsv file loads your own task.")
    return _builtin_task(name)
