"""Run the notebooks as a graded course, with nbgrader as the format and the machinery.

An exercise in a *source* notebook is an nbgrader solution cell followed by one or more autograded
test cells (points, visible checks, and a ``### BEGIN HIDDEN TESTS`` region). Two instructor commands:

>>> import nbformat                # a source notebook with one exercise (the course's are in notebooks/)
>>> nbformat.write(nbformat.v4.new_notebook(cells=[
...     solution_cell("def double(x):\\n    ### BEGIN SOLUTION\\n    return 2 * x\\n    ### END SOLUTION", "double"),
...     test_cell("assert double(2) == 4", "test_double", points=1)]), "lesson.ipynb")
>>> release(["lesson.ipynb"], Path("release"))                                   # student copies
[PosixPath('release/lesson.ipynb')]
>>> _ = paste_solutions(Path("lesson.ipynb"), Path("release/lesson.ipynb"), Path("submitted/ada/lesson.ipynb"))
>>> grade(["lesson.ipynb"], Path("submitted"), Path("grades.csv"),                # points + feedback
...       feedback_dir=Path("feedback"), timeout=120)   # doctest: +NORMALIZE_WHITESPACE
  student notebook exercise  points  max_points note            tests
0     ada   lesson   double     1.0         1.0       test_double 1/1

or ``tvlab course release SOURCE... --out DIR`` and
``tvlab course grade SOURCE... --submissions DIR --out grades.csv [--feedback DIR] [--timeout S]``.

Self-study copies, for learners on Binder or Colab with no course around them (the repository's live in
``course/self-study``; ``tvlab course release notebooks --self-study --out course/self-study``):

>>> release(["lesson.ipynb"], Path("self-study"), self_study=True)                # stub, check, folded solution
[PosixPath('self-study/lesson.ipynb')]

Both drive nbgrader's own preprocessors (the ones ``nbgrader generate_assignment`` and ``nbgrader
autograde`` chain), with a throwaway gradebook in a temporary folder: no course directory, no
JupyterHub, no database to keep.

Cell conventions of a source notebook (``solution_cell``, ``test_cell`` and ``reference_cell`` build them):

- solution cell: a code cell with ``metadata.nbgrader = {solution: true, grade: false, locked: false,
  grade_id: ...}``; the reference code between ``### BEGIN SOLUTION`` and ``### END SOLUTION``.
- test cell: a code cell with ``metadata.nbgrader = {grade: true, solution: false, locked: true,
  points: N, grade_id: ...}``. It fails by raising (``assert``); a test that ends on an expression
  evaluating to ``False`` also scores 0. Hidden tests sit between ``### BEGIN HIDDEN TESTS`` and
  ``### END HIDDEN TESTS``. Each test cell belongs to the solution cell above it.
- reference-solution reveal: any cell (markdown or code) whose ``metadata.tags`` holds
  ``"reference-solution"``; it carries no nbgrader metadata and is dropped from the release (folded
  as a "Model answer" in a self-study copy). The model answers to "Questions to explore" are such cells.

While grading, ``tvlab.solutions`` cannot be imported, and a student's cells of an exercise that
mention it score 0 on that exercise. ``forbid`` lets a hidden test run the student's function with the
library function it re-implements replaced by one that raises.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

REFERENCE_TAG = "reference-solution"
FORBIDDEN_MODULES = ("tvlab.solutions",)
NOT_ATTEMPTED = "not attempted"
NOT_SUBMITTED = "not submitted"
ASSIGNMENT = "tvlab"
COLUMNS = ["student", "notebook", "exercise", "points", "max_points", "note", "tests"]

_STUB_LINE = "raise NotImplementedError()"
_MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS",
            "BEGIN MARK SCHEME", "END MARK SCHEME")
_PREAMBLE_KEY = "tvlab_course_preamble"
#: Where the self-study copies live in the repository (their Colab/Binder badges point there).
SELF_STUDY_DIR = "course/self-study"
SOLUTION_SUMMARY = "Reference solution (try first!)"
MODEL_ANSWER_SUMMARY = "Model answer"
_SELF_STUDY_KEY = "tvlab_self_study"  # a self-study cell's role: exercise, check, reference-solution, ...
_KERNEL = "python3"

log = logging.getLogger("tvlab.course")
# nbgrader's and nbclient's own messages (e.g. "checksum for cell X has changed!", which is how hidden tests
# come back): shown with grade(verbose=True) / --verbose.
_nbg_log = logging.getLogger("tvlab.course.nbgrader")
_nbg_log.propagate = False
_nbg_log.addHandler(logging.NullHandler())


class CourseError(ValueError):
    """A problem with the instructor's input: a missing folder, a notebook without graded cells, ..."""


class ForbiddenCall(RuntimeError):
    """Raised by a library function that an exercise asks the student to re-implement (see ``forbid``)."""


# --------------------------------------------------------------------------------------------------
# Cells of a source notebook


def _nbgrader_meta(grade_id: str, *, grade: bool, solution: bool, locked: bool, points: float | None = None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution,
            "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def solution_cell(source: str, grade_id: str):
    """A code cell the student fills in: put the reference code between ``### BEGIN/END SOLUTION``."""
    import nbformat

    return nbformat.v4.new_code_cell(source, metadata={
        "nbgrader": _nbgrader_meta(grade_id, grade=False, solution=True, locked=False)})


def test_cell(source: str, grade_id: str, points: float):
    """An autograded, locked test cell worth ``points``; it fails by raising. Hidden tests go between
    ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``."""
    import nbformat

    return nbformat.v4.new_code_cell(source, metadata={
        "nbgrader": _nbgrader_meta(grade_id, grade=True, solution=False, locked=True, points=points)})


test_cell.__test__ = False  # not a pytest test


def reference_cell(source: str, cell_type: str = "code"):
    """The reference solution revealed on purpose in the source notebook: dropped from the release."""
    import nbformat

    meta = {"tags": [REFERENCE_TAG]}
    if cell_type == "code":
        meta["jupyter"] = {"source_hidden": True}
        return nbformat.v4.new_code_cell(source, metadata=meta)
    return nbformat.v4.new_markdown_cell(source, metadata=meta)


def _nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _is_reference(cell) -> bool:
    return REFERENCE_TAG in (cell.get("metadata", {}).get("tags") or [])


def _is_solution(cell) -> bool:
    return bool(_nbg(cell).get("solution"))


def _is_test(cell) -> bool:
    meta = _nbg(cell)
    return bool(meta.get("grade")) and not meta.get("solution")


@dataclass
class Test:
    grade_id: str
    points: float
    hidden: bool

    __test__ = False  # not a pytest test class


@dataclass
class Exercise:
    """A solution cell (``grade_id``; None for tests with no solution cell above them) and its tests."""

    grade_id: str | None
    tests: list[Test] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.grade_id or self.tests[0].grade_id

    @property
    def max_points(self) -> float:
        return sum(t.points for t in self.tests)


def list_exercises(nb, name: str = "notebook") -> list[Exercise]:
    """The exercises of a source notebook, checked: every solution cell has a test cell below it."""
    found: list[Exercise] = []
    seen: set[str] = set()
    for i, cell in enumerate(nb.cells):
        meta = _nbg(cell)
        if _is_reference(cell) and meta and (meta.get("grade") or meta.get("solution") or meta.get("locked")):
            raise CourseError(f"{name}: cell {i} is tagged {REFERENCE_TAG!r} and is also an nbgrader cell; "
                              "a reference-solution cell must carry no nbgrader metadata")
        if not (meta.get("grade") or meta.get("solution") or meta.get("task")):
            continue
        gid = meta.get("grade_id")
        if not gid:
            raise CourseError(f"{name}: nbgrader cell {i} has no grade_id")
        if gid in seen:
            raise CourseError(f"{name}: grade_id {gid!r} is used twice")
        seen.add(gid)
        if meta.get("task") or cell.cell_type != "code":
            raise CourseError(f"{name}: cell {gid!r} is a {'task' if meta.get('task') else cell.cell_type} cell; "
                              "only autograded code exercises are supported (solution code cell + test code cells)")
        if meta.get("grade") and meta.get("solution"):
            raise CourseError(f"{name}: cell {gid!r} is both a solution and a grade cell (graded by hand); "
                              "split it into a solution cell and an autograded test cell")
        if meta.get("solution"):
            if found and found[-1].grade_id is not None and not found[-1].tests:
                raise CourseError(f"{name}: solution cell {found[-1].grade_id!r} has no test cell below it")
            found.append(Exercise(gid))
        else:
            try:
                points = float(meta.get("points"))
            except (TypeError, ValueError):
                raise CourseError(f"{name}: test cell {gid!r} has no valid 'points'") from None
            test = Test(gid, points, "BEGIN HIDDEN TESTS" in cell.source)
            if not found or (found[-1].grade_id is None and found[-1].tests):
                found.append(Exercise(None))
            found[-1].tests.append(test)
    if not any(ex.tests for ex in found):
        raise CourseError(f"{name}: no autograded test cells (code cells with metadata.nbgrader.grade = true "
                          "and points); there is nothing to grade")
    if found[-1].grade_id is not None and not found[-1].tests:
        raise CourseError(f"{name}: solution cell {found[-1].grade_id!r} has no test cell below it")
    return found


# --------------------------------------------------------------------------------------------------
# Reading sources


def _read(path: Path):
    import nbformat

    try:
        return nbformat.read(str(path), as_version=4)
    except FileNotFoundError:
        raise CourseError(f"{path}: no such notebook") from None
    except Exception as e:  # noqa: BLE001 - a broken file: say which
        raise CourseError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from None


def _has_nbgrader_cells(path: Path) -> bool:
    try:
        return any(_nbg(c).get("grade") for c in _read(path).cells)
    except CourseError:
        return False


def _need_nbgrader() -> None:
    try:
        import nbgrader
    except ImportError:
        raise CourseError("tvlab course needs nbgrader: pip install 'tvlab[course]' "
                          "(or pip install 'nbgrader>=0.9.6,<0.10')") from None
    major_minor = tuple(int(x) for x in re.findall(r"\d+", nbgrader.__version__)[:2])
    if major_minor < (0, 9):
        raise CourseError(f"tvlab course needs nbgrader 0.9 or later, found {nbgrader.__version__}: "
                          "pip install -U 'nbgrader>=0.9.6,<0.10'")


def _sources(source: Path | str | Iterable[Path | str]) -> list[Path]:
    """Source notebooks: files as given; a folder gives its notebooks that have graded cells."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise CourseError("no source notebook given")
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = [p for p in sorted(path.glob("*.ipynb")) if _has_nbgrader_cells(p)]
            if not found:
                raise CourseError(f"{path}: folder has no notebook with nbgrader graded cells")
            paths += found
        elif path.is_file():
            if path.suffix != ".ipynb":
                raise CourseError(f"{path}: not a notebook (.ipynb)")
            paths.append(path)
        else:
            raise CourseError(f"{path}: no such notebook or folder")
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise CourseError(f"two source notebooks share the name {twice[0]!r}; grading matches notebooks by name")
    return paths


def _normalise(nb):
    """Give test cells ``locked: true`` (as nbgrader's cell toolbar does), needed to restore hidden tests."""
    from nbgrader.nbgraderformat import MetadataValidator

    for cell in nb.cells:
        if _is_test(cell):
            cell.metadata.nbgrader["locked"] = True
    return MetadataValidator().upgrade_notebook_metadata(nb)


def _run(preprocessors, nb, resources: dict):
    for pp in preprocessors:
        nb, resources = pp.preprocess(nb, resources)
    return nb, resources


def _assign_steps(save_to: dict | None = None):
    """``nbgrader generate_assignment``'s chain (GenerateAssignment.preprocessors), less headers and the
    test-template instantiation; with ``save_to`` the cells go to the gradebook as generate_assignment does."""
    from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                        ClearSolutions, ComputeChecksums, LockCells, SaveCells)

    first = [LockCells, ClearSolutions, ClearOutput, CheckCellMetadata, ComputeChecksums]
    rest = [SaveCells] if save_to is not None else [ClearHiddenTests, ClearMarkScheme, ComputeChecksums,
                                                     CheckCellMetadata]
    return [step(log=_nbg_log) for step in first + rest]


def _student_copy(nb, name: str):
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if not _is_reference(c)]
    nb = _normalise(nb)
    try:
        nb, _ = _run(_assign_steps(), nb, {})
    except Exception as e:  # noqa: BLE001 - nbgrader's RuntimeError/ValidationError: a source problem
        raise CourseError(f"{name}: nbgrader could not make the student copy: {e}") from None
    for key in ("widgets", "celltoolbar"):
        nb.metadata.pop(key, None)
    return nb


def _regions(source: str) -> dict[str, set[str]]:
    """The stripped lines of ``source`` by region: "solution", "hidden" (tests), "scheme", "outside"."""
    found: dict[str, set[str]] = {"solution": set(), "hidden": set(), "scheme": set(), "outside": set()}
    stack: list[str] = []
    for line in source.split("\n"):
        text = line.strip()
        begin = next((k for k, m in (("solution", "BEGIN SOLUTION"), ("hidden", "BEGIN HIDDEN TESTS"),
                                     ("scheme", "BEGIN MARK SCHEME")) if m in line), None)
        if begin:
            stack.append(begin)
        elif "END SOLUTION" in line or "END HIDDEN TESTS" in line or "END MARK SCHEME" in line:
            if stack:
                stack.pop()
        elif text:
            found[stack[-1] if stack else "outside"].add(text)
    return found


def _region_lines(source: str) -> tuple[set[str], set[str]]:
    """(lines inside solution / hidden-test regions, lines outside them), stripped."""
    found = _regions(source)
    return found["solution"] | found["hidden"] | found["scheme"], found["outside"]


def _strip_comments(source: str) -> str:
    import io
    import tokenize

    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type != tokenize.COMMENT]
        return tokenize.untokenize(tokens)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return re.sub(r"#[^\n]*", "", source)


def _uses_module(source: str, module: str) -> bool:
    """Whether code (comments aside) imports or names ``module`` (``tvlab.solutions``,
    ``from tvlab import solutions``, ``importlib.import_module(".solutions", "tvlab")``, ...)."""
    source = _strip_comments(source)
    parent, _, leaf = module.rpartition(".")
    patterns = [rf"\b{re.escape(module)}\b"]
    if parent:
        patterns.append(rf"from\s+{re.escape(parent)}\s+import\s+(\([^)]*|[^\n#]*)\b{re.escape(leaf)}\b")
        patterns.append(rf"import_module\(\s*['\"]\.{re.escape(leaf)}['\"]")
    return any(re.search(p, source) for p in patterns)


def check_release(source_nb, released_nb, name: str = "notebook", forbidden_modules=FORBIDDEN_MODULES) -> None:
    """Raise CourseError if a student copy holds a solution, a hidden test, a reveal cell or an output.

    Every cell is scanned: nbgrader's markers, the reference-solution tag, imports of the reference module,
    and every line (8+ characters) that the source has only inside a solution or hidden-test region."""
    secret, public = set(), set()
    for cell in source_nb.cells:
        inside, outside = _region_lines(cell.source)
        secret |= inside
        if not _is_reference(cell):
            public |= outside
    secret = {line for line in secret - public if len(line) >= 8 and not line.startswith("#")}
    for i, cell in enumerate(released_nb.cells):
        where = f"{name}: released cell {i}"
        if _is_reference(cell):
            raise CourseError(f"{where} is a {REFERENCE_TAG!r} cell")
        marker = next((m for m in _MARKERS if m in cell.source), None)
        if marker:
            raise CourseError(f"{where} still holds '### {marker}'")
        leaked = sorted({line.strip() for line in cell.source.split("\n")} & secret)
        if leaked:
            raise CourseError(f"{where} holds solution or hidden-test code: {leaked[0]!r}")
        if cell.cell_type == "code":
            if cell.get("outputs"):
                raise CourseError(f"{where} has outputs")
            for module in forbidden_modules:
                if _uses_module(cell.source, module):
                    raise CourseError(f"{where} uses {module} (the reference solutions); tag the cell "
                                      f"{REFERENCE_TAG!r} in the source so that it is left out of the release")


# --------------------------------------------------------------------------------------------------
# Self-study copies


def _solution_code(source: str) -> str:
    """A solution cell's code as a student would write it: the ``### BEGIN/END SOLUTION`` lines removed."""
    return "\n".join(x for x in source.split("\n") if "BEGIN SOLUTION" not in x and "END SOLUTION" not in x)


def _fenced(code: str, language: str = "python") -> str:
    fence = "```"
    while fence in code:
        fence += "`"
    return f"{fence}{language}\n{code.strip()}\n{fence}"


def _details(summary: str, body: str) -> str:
    """A collapsed HTML block (GitHub, JupyterLab, Colab and nbviewer render the markdown inside it)."""
    return f"<details><summary>{summary}</summary>\n\n{body.strip()}\n\n</details>"


def _outside_details(text: str) -> str:
    """``text`` without its ``<details>...</details>`` blocks."""
    return re.sub(r"<details\b.*?</details\s*>", "", text, flags=re.DOTALL | re.IGNORECASE)


def _cell_id(base: str, taken: set[str]) -> str:
    """A valid nbformat cell id from ``base``, unique in ``taken`` (deterministic: copies compare equal)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", base)[:56] or "cell"
    cid, n = base, 1
    while cid in taken:
        n += 1
        cid = f"{base}-{n}"
    taken.add(cid)
    return cid


def _retarget_links(text: str, folder: str, badge_path: str) -> str:
    """Colab, GitHub and Binder links to ``<folder>/<notebook>.ipynb`` (the sources) made to point to
    ``<badge_path>/<notebook>.ipynb`` (the self-study copies)."""
    folder, badge_path = re.escape(folder.strip("/")), badge_path.strip("/")
    text = re.sub(rf"(/blob/[^/\s)\"']+/){folder}/([^/\s)\"']+\.ipynb)", rf"\g<1>{badge_path}/\g<2>", text)
    return re.sub(rf"(urlpath=(?:lab/tree|tree|notebooks)/){folder}/([^/\s)\"'&]+\.ipynb)",
                  rf"\g<1>{badge_path}/\g<2>", text)


def _self_study_copy(nb, path: Path, badge_path: str | None = SELF_STUDY_DIR):
    """The learner's copy: the student release's stubs and visible checks, the reference solution folded
    under each exercise, model answers folded, and the outputs of every other cell kept."""
    import nbformat
    from nbgrader.preprocessors import CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearSolutions

    name = path.name
    exercises = list_exercises(nb, name)
    src = _normalise(copy.deepcopy(nb))
    work = copy.deepcopy(src)
    work.cells = [c for c in work.cells if not _is_reference(c)]
    try:  # generate_assignment's chain less LockCells, ClearOutput and the checksums: outputs stay
        work, _ = _run([step(log=_nbg_log) for step in (ClearSolutions, ClearHiddenTests, ClearMarkScheme,
                                                        CheckCellMetadata)], work, {})
    except Exception as e:  # noqa: BLE001 - nbgrader's RuntimeError/ValidationError: a source problem
        raise CourseError(f"{name}: nbgrader could not make the self-study copy: {e}") from None
    reference = {_nbg(c)["grade_id"]: _solution_code(c.source) for c in src.cells if _is_solution(c)}
    after = {ex.tests[-1].grade_id: ex.grade_id for ex in exercises if ex.grade_id and ex.tests}
    taken = {c.get("id") for c in src.cells if c.get("id")}
    folder = path.parent.name
    processed = iter(work.cells)
    cells = []
    for cell in src.cells:
        if _is_reference(cell):  # a model answer (or revealed code): folded
            body = cell.source if cell.cell_type == "markdown" else _fenced(cell.source)
            folded = nbformat.v4.new_markdown_cell(_details(MODEL_ANSWER_SUMMARY, body),
                                                   metadata={_SELF_STUDY_KEY: "model-answer"})
            if cell.get("id"):
                folded["id"] = cell["id"]
            cells.append(folded)
            continue
        out = next(processed)
        meta = _nbg(out)
        if meta.get("solution") or meta.get("grade"):
            out.outputs, out.execution_count = [], None
            for key in ("nbgrader", "editable", "deletable", "execution"):  # "execution": the run's timings
                out.metadata.pop(key, None)
            if meta.get("solution"):
                out.metadata[_SELF_STUDY_KEY] = "exercise"
            else:  # read-only, as in the graded release
                out.metadata.update({_SELF_STUDY_KEY: "check", "editable": False, "deletable": False})
        elif out.cell_type == "markdown" and badge_path:
            out.source = _retarget_links(out.source, folder, badge_path)
        out.metadata.pop("nbgrader", None)  # not an assignment: nothing for nbgrader to act on
        if not (meta.get("grade") and not meta.get("solution") and not _strip_comments(out.source).strip()):
            cells.append(out)  # (a check cell that held only hidden tests is left out: nothing to run)
        gid = meta.get("grade_id")
        if gid in after:
            reveal = nbformat.v4.new_markdown_cell(_details(SOLUTION_SUMMARY, _fenced(reference[after[gid]])),
                                                   metadata={_SELF_STUDY_KEY: "reference-solution"})
            reveal["id"] = _cell_id(f"{after[gid]}-reference", taken)
            cells.append(reveal)
    note = nbformat.v4.new_markdown_cell(
        "> **Self-study copy.** Each exercise has a stub to fill in (`raise NotImplementedError()`) and a check "
        "to run below it; the reference solution is folded under the check: try first, then open "
        f"*{SOLUTION_SUMMARY.split(' (')[0]}*. The model answers to the questions to explore are folded "
        f"the same way. This file is generated from `{folder}/{name}` by `tvlab course release {folder} "
        f"--self-study --out {badge_path or 'DIR'}`: edit the source notebook, not this copy.",
        metadata={_SELF_STUDY_KEY: "note"})
    note["id"] = _cell_id("self-study-note", taken)
    at = 1 if cells and cells[0].cell_type == "markdown" else 0  # after the title cell
    cells.insert(at, note)
    src.cells = cells
    for key in ("celltoolbar",):  # the widget state stays: kept outputs of explorers need it
        src.metadata.pop(key, None)
    return src


def check_self_study(source_nb, copy_nb, name: str = "notebook", forbidden_modules=FORBIDDEN_MODULES) -> None:
    """Raise CourseError if a self-study copy holds a hidden test anywhere, or a solution or model answer
    outside its collapsed ``<details>`` block, or an exercise cell (stub, check) with outputs.

    Scanned like ``check_release``: every cell's text (and text outputs), with the ``<details>`` blocks cut
    out of markdown cells for the solution lines; hidden-test lines and nbgrader's markers may not appear
    even inside them."""
    solution, hidden, public, answers = set(), set(), set(), set()
    for cell in source_nb.cells:
        found = _regions(cell.source)
        solution |= found["solution"] | found["scheme"]
        hidden |= found["hidden"]
        if _is_reference(cell):
            answers |= found["outside"]
        else:
            public |= found["outside"]

    def keep(lines):
        return {line for line in lines - public if len(line) >= 8 and not line.startswith("#")}

    hidden, folded = keep(hidden - solution), keep(solution | answers)  # a line shared with the solution is shown
    for i, cell in enumerate(copy_nb.cells):
        where = f"{name}: self-study cell {i}"
        if _is_reference(cell) or _nbg(cell):
            raise CourseError(f"{where} still carries the {REFERENCE_TAG!r} tag or nbgrader metadata")
        marker = next((m for m in _MARKERS if m in cell.source), None)
        if marker:
            raise CourseError(f"{where} still holds '### {marker}'")
        texts = [cell.source]
        for out in cell.get("outputs", []):
            data = out.get("text") or out.get("data", {}).get("text/plain", "")
            texts.append("".join(data) if isinstance(data, list) else str(data))
        lines = {line.strip() for text in texts for line in text.split("\n")}
        leaked = sorted(lines & hidden)
        if leaked:
            raise CourseError(f"{where} holds hidden-test code: {leaked[0]!r}")
        outside = texts[1:] + [_outside_details(cell.source) if cell.cell_type == "markdown" else cell.source]
        leaked = sorted({line.strip() for text in outside for line in text.split("\n")} & folded)
        if leaked:
            raise CourseError(f"{where} holds solution or model-answer text outside a <details> block: "
                              f"{leaked[0]!r}")
        if cell.cell_type == "code":
            if cell.metadata.get(_SELF_STUDY_KEY) in ("exercise", "check") and cell.get("outputs"):
                raise CourseError(f"{where} is an exercise cell with outputs")
            for module in forbidden_modules:
                if _uses_module(cell.source, module):
                    raise CourseError(f"{where} uses {module} (the reference solutions)")


# --------------------------------------------------------------------------------------------------
# Release


def release(source: Path | list[Path], out_dir: Path, *, self_study: bool = False,
            badge_path: str | None = SELF_STUDY_DIR) -> list[Path]:
    """Write the student copy of each source notebook into ``out_dir`` (same file names).

    nbgrader's generate_assignment chain: solution regions become ``raise NotImplementedError()`` stubs,
    hidden tests and outputs go, cells are locked and checksummed (their nbgrader metadata stays, for
    grading). Cells tagged ``reference-solution`` are dropped. Each copy is checked with ``check_release``.

    ``self_study=True`` writes the learner's copy instead (for Binder/Colab, no grading): the same stubs and
    visible checks, no hidden tests, no nbgrader metadata; after each exercise's last check, the reference
    solution in a collapsed ``<details>`` block; ``reference-solution`` cells collapsed as model answers;
    the outputs of every cell but the exercises' kept. Links to the source notebooks in its markdown (the
    Colab/Binder badges) are made to point to ``badge_path/<notebook>.ipynb``, the copies' folder in the
    repository (None: left alone). Each copy is checked with ``check_self_study``.
    """
    import nbformat

    _need_nbgrader()
    paths = _sources(source)
    prepared = []
    for path in paths:  # check everything before writing anything
        nb = _read(path)
        list_exercises(nb, path.name)
        if self_study:
            student = _self_study_copy(nb, path, badge_path)
            check_self_study(nb, student, path.name)
        else:
            student = _student_copy(nb, path.name)
            check_release(nb, student, path.name)
        prepared.append((path, student))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CourseError(f"{out_dir}: is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, student in prepared:
        target = out_dir / path.name
        if target.resolve() == path.resolve():
            raise CourseError(f"{target}: would overwrite the source notebook; choose another --out folder")
        nbformat.write(student, str(target))
        written.append(target)
    return written


def paste_solutions(source: Path, released: Path, out: Path) -> Path:
    """The released notebook with each stub replaced by the source's reference code (markers removed):
    what a student who solved everything would hand in. For checking that it gets full points."""
    import nbformat

    src = {(_nbg(c).get("grade_id")): c for c in _read(Path(source)).cells if _is_solution(c)}
    nb = _read(Path(released))
    for cell in nb.cells:
        gid = _nbg(cell).get("grade_id")
        if _is_solution(cell) and gid in src:
            cell.source = _solution_code(src[gid].source)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out))
    return Path(out)


# --------------------------------------------------------------------------------------------------
# forbid: for hidden tests


def _resolve(target) -> tuple[object, str, tuple | None]:
    """(object, display name, (owner, attribute) for a dotted name) of a target given by object or name."""
    if not isinstance(target, str):
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        return target, name, None
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        return getattr(owner, parts[-1]), target, (owner, parts[-1])
    raise ValueError(f"cannot resolve {target!r}: give a dotted name such as 'tvlab.extract_task_vector'")


def _namespaces() -> list[dict]:
    spaces, ids = [], set()
    candidates = list(sys.modules.values())
    try:  # the notebook's own namespace (``from tvlab import extract_task_vector``)
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            candidates.append(shell.user_ns)
    except ImportError:
        pass
    for item in candidates:
        try:
            ns = item if isinstance(item, dict) else vars(item)
        except TypeError:
            continue
        if isinstance(ns, dict) and id(ns) not in ids:
            ids.add(id(ns))
            spaces.append(ns)
    return spaces


@contextlib.contextmanager
def forbid(*targets, reason: str = "re-implement it, not call it") -> Iterator[list[str]]:
    """Inside the block every name bound to a target function raises ForbiddenCall.

    A target is a function or a dotted name ("tvlab.extract_task_vector"). Every module attribute and
    notebook variable that is that same object is swapped (``tvlab.extract_task_vector`` and
    ``tvlab.experiments.extract_task_vector`` alike), and put back on exit. Yields the list of names
    called, so a test can also catch a student who swallowed the error::

        want = tvlab.extract_task_vector(lm, demos, dummies, layer)
        with forbid(tvlab.extract_task_vector) as called:
            got = extract_theta(lm, demos, dummies, layer)
        assert not called and torch.allclose(got, want)
    """
    called: list[str] = []
    swaps: list[tuple] = []
    resolved = [_resolve(t) for t in targets]
    try:
        spaces = _namespaces()
        for obj, name, owner in resolved:
            def blocked(*args, _name=name, **kwargs):
                called.append(_name)
                raise ForbiddenCall(f"{_name} was called: this exercise asks you to {reason}")

            blocked.__name__ = getattr(obj, "__name__", "blocked")
            blocked.__doc__ = getattr(obj, "__doc__", None)
            for ns in spaces:
                for key, value in list(ns.items()):
                    if value is obj:
                        swaps.append((ns, key, value))
                        ns[key] = blocked
            if owner is not None and getattr(owner[0], owner[1], None) is obj:
                swaps.append((owner[0], owner[1], obj))
                setattr(owner[0], owner[1], blocked)
        yield called
    finally:
        for where, key, value in reversed(swaps):
            if isinstance(where, dict):
                where[key] = value
            else:
                setattr(where, key, value)


# --------------------------------------------------------------------------------------------------
# Grading


def _preamble(blocked: tuple[str, ...]) -> str:
    return (
        "import sys as _tvlab_sys\n"
        "class _TvlabGradingImportBlock:\n"
        f"    blocked = {tuple(blocked)!r}\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if any(name == b or name.startswith(b + '.') for b in cls.blocked):\n"
        "            raise ImportError(name + ' holds the reference solutions: it cannot be imported while grading')\n"
        "        return None\n"
        "_tvlab_sys.meta_path.insert(0, _TvlabGradingImportBlock)\n"
        "for _tvlab_m in _TvlabGradingImportBlock.blocked:\n"
        "    _tvlab_sys.modules.pop(_tvlab_m, None)\n"
        "del _tvlab_sys, _tvlab_m\n"
    )


def _executor_class():
    from nbclient.util import run_sync
    from nbgrader.preprocessors import Execute

    class _Execute(Execute):
        """nbgrader's Execute (interrupts a cell at the timeout, keeps going after errors), remembering the
        cell it is in, so that a kernel that ignores the interrupt or dies can be blamed on that cell."""

        current: int | None = None
        quiet_kernel = True

        async def async_start_new_kernel(self, **kwargs):
            if self.quiet_kernel:  # the kernel process's own console chatter; cell output comes over ZMQ
                kwargs.setdefault("stdout", subprocess.DEVNULL)
                kwargs.setdefault("stderr", subprocess.DEVNULL)
            return await super().async_start_new_kernel(**kwargs)

        # nbclient binds the sync wrapper to its own coroutine at class creation: rebind it to ours
        start_new_kernel = run_sync(async_start_new_kernel)

        def preprocess_cell(self, cell, resources, index):
            self.current = index
            return super().preprocess_cell(cell, resources, index)

    return _Execute


def _error_output(ename: str, evalue: str):
    from nbformat import NotebookNode

    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _execute(nb, cwd: Path, timeout: int, blocks: dict[int, list[int]], quiet: bool = True, label: str = "",
             offset: int = 0):
    """Execute ``nb`` (in place semantics: returns the executed copy) with a per-cell timeout.

    A cell that runs past ``timeout`` is interrupted and the next cell runs (nbgrader's Execute:
    interrupt_on_timeout, error_on_timeout). If the kernel ignores the interrupt (nbclient then raises
    "Timeout waiting for IOPub output") or dies, the notebook is run again in a fresh kernel with that
    cell, and the other cells of ``blocks[index]`` (the rest of its exercise), replaced by a raise.
    """
    executor = _executor_class()
    skipped: dict[int, str] = {}
    for _ in range(len(nb.cells) + 1):
        run = copy.deepcopy(nb)
        for index, why in skipped.items():
            run.cells[index].source = f"raise RuntimeError({why!r})"
        ex = executor(timeout=timeout, kernel_name=_KERNEL, shutdown_kernel="immediate", startup_timeout=120,
                      extra_arguments=["--HistoryManager.hist_file=:memory:"], log=_nbg_log)
        ex.quiet_kernel = quiet
        try:
            run, _ = ex.preprocess(run, {"metadata": {"path": str(cwd)}})
            break
        except Exception as e:  # noqa: BLE001 - a kernel that hung past the interrupt or died
            index = ex.current
            if index is None or index in skipped:
                raise CourseError(f"could not run the notebook in a {_KERNEL} kernel: {type(e).__name__}: {e}") from e
            dead = "DeadKernel" in type(e).__name__ or "died" in str(e).lower()
            why = (f"the kernel died in this cell ({type(e).__name__})" if dead else
                   f"this cell ran past the {timeout} s timeout and did not stop when interrupted")
            log.warning("%scell %d: %s; running the notebook again without it", label, index - offset, why)
            for other in blocks.get(index, [index]):
                if other >= index:
                    skipped.setdefault(other, why if other == index else "skipped: an earlier cell of this "
                                       "exercise hung or crashed the kernel")
    else:  # pragma: no cover - every cell skipped
        raise CourseError("the notebook could not be run")
    for index, why in skipped.items():
        cell = run.cells[index]
        cell.source = nb.cells[index].source
        ename = "CellTimeoutError" if "timeout" in why else "KernelError"
        cell.outputs = [_error_output(ename, why)]
    return run


def _renumber(nb) -> None:
    """Execution counts as if the grading preamble had not run; cell ids for cells nbgrader added back."""
    for cell in nb.cells:
        if cell.cell_type == "code" and isinstance(cell.get("execution_count"), int):
            cell.execution_count -= 1
            for out in cell.get("outputs", []):
                if isinstance(out.get("execution_count"), int):
                    out["execution_count"] -= 1
    from nbformat.corpus.words import generate_corpus_id

    if (nb.nbformat, nb.nbformat_minor) >= (4, 5):
        for cell in nb.cells:
            cell.setdefault("id", generate_corpus_id())


def _first_error(cell) -> tuple[str, str] | None:
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if not errors:
        return None
    timeout = next((o for o in errors if o.get("ename") == "CellTimeoutError"), None)
    first = timeout or errors[-1]
    value = str(first.get("evalue", "")).strip().splitlines()
    if not value and first.get("ename") == "CellTimeoutError":
        value = ["no reply from the kernel before the timeout; interrupted"]
    return str(first.get("ename", "Error")), (value[0] if value else "")


def _score(cell, points: float, strict_stderr: bool) -> tuple[float, str]:
    """nbgrader's rule (utils.determine_grade): an error scores 0, a number as the last value is partial
    credit, else full points; also 0 for a last value ``False``. stderr (warnings, progress bars) only
    counts as a failure with ``strict_stderr``, as in nbgrader."""
    from nbgrader import utils

    cell = copy.deepcopy(cell)
    cell.metadata.nbgrader["points"] = points
    if not strict_stderr:
        cell.outputs = [o for o in cell.get("outputs", [])
                        if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    error = _first_error(cell)
    if error:
        return 0.0, f"{error[0]}: {error[1]}".rstrip(": ")
    for out in cell.outputs:
        if out.get("output_type") == "execute_result":
            text = out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            if text.strip() == "False":
                return 0.0, "the test returned False"
    if any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in cell.outputs):
        return 0.0, "the test wrote to stderr"
    try:
        score, _ = utils.determine_grade(cell, log)
    except (ValueError, KeyError) as e:
        return 0.0, f"could not read a score from the test's output ({e})"
    return float(points if score is None else score), ""


@dataclass
class _Book:
    path: Path
    exercises: list[Exercise]
    stubs: dict[str, str]  # solution grade_id -> released stub source
    hidden_sources: dict[str, str]  # test grade_id -> source with hidden tests


def _prepare_books(paths: list[Path], db_url: str) -> dict[str, _Book]:
    from nbgrader.api import Gradebook

    with Gradebook(db_url) as gb:
        gb.update_or_create_assignment(ASSIGNMENT)
    books = {}
    for path in paths:
        nb = _read(path)
        found = list_exercises(nb, path.name)
        student = _student_copy(nb, path.name)
        stubs = {_nbg(c)["grade_id"]: c.source for c in student.cells if _is_solution(c)}
        src = _normalise(copy.deepcopy(nb))
        src.cells = [c for c in src.cells if not _is_reference(c)]
        hidden = {_nbg(c)["grade_id"]: c.source for c in src.cells if _is_test(c)}
        resources = {"nbgrader": {"notebook": path.stem, "assignment": ASSIGNMENT, "db_url": db_url}}
        try:  # the gradebook generate_assignment would have written: cells with hidden tests, checksums
            _run(_assign_steps(save_to=resources), src, resources)
        except Exception as e:  # noqa: BLE001
            raise CourseError(f"{path.name}: nbgrader could not record the source cells: {e}") from None
        books[path.stem] = _Book(path, found, stubs, hidden)
    return books


def _sanitize(nb, stem: str, student: str, db_url: str):
    """nbgrader autograde's sanitize chain (Autograde.sanitize_preprocessors): locked and test cells come
    back from the source, with their hidden tests; deleted test cells are added back."""
    from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, DeduplicateIds, OverwriteCells, OverwriteKernelspec

    resources = {"nbgrader": {"notebook": stem, "assignment": ASSIGNMENT, "db_url": db_url, "student": student}}
    steps = [ClearOutput(log=_nbg_log), DeduplicateIds(log=_nbg_log), OverwriteKernelspec(log=_nbg_log),
             OverwriteCells(add_missing_cells=True, log=_nbg_log), CheckCellMetadata(log=_nbg_log)]
    nb, _ = _run(steps, nb, resources)
    return nb


def _rows_for(student: str, stem: str, book: _Book, note: str) -> list[dict]:
    return [{"student": student, "notebook": stem, "exercise": ex.name, "points": 0.0, "max_points": ex.max_points,
             "note": note, "tests": "; ".join(f"{t.grade_id} 0/{t.points:g}" for t in ex.tests)}
            for ex in book.exercises]


def _is_stub(source: str, stub: str | None) -> bool:
    def squash(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip().split("\n") if line.strip())

    return stub is not None and squash(source) == squash(stub)


def _grade_notebook(student_dir: Path, book: _Book, db_url: str, timeout: int, strict_stderr: bool,
                    forbidden_modules: tuple[str, ...], feedback_dir: Path | None,
                    feedback_hidden_tests: bool, verbose: bool = False) -> list[dict]:
    import nbformat

    student, stem = student_dir.name, book.path.stem
    path = student_dir / book.path.name
    if not path.is_file():
        return _rows_for(student, stem, book, NOT_SUBMITTED)
    try:
        nb = nbformat.read(str(path), as_version=4)
        nb = _sanitize(nb, stem, student, db_url)
    except Exception as e:  # noqa: BLE001 - a student's broken file scores 0, the others go on
        return _rows_for(student, stem, book, f"could not read the notebook ({type(e).__name__}: {e})")

    where = {_nbg(c).get("grade_id"): i for i, c in enumerate(nb.cells) if _nbg(c).get("grade_id")}
    # The cells of an exercise: from after the previous exercise's last test cell to its own last test.
    spans, start = {}, 0
    for ex in book.exercises:
        ends = [where[t.grade_id] for t in ex.tests if t.grade_id in where]
        end = max(ends) if ends else start - 1
        spans[ex.name] = range(start, end + 1)
        start = max(start, end + 1)
    uses_reference = {ex.name: next((m for m in forbidden_modules for i in spans[ex.name]
                                     if nb.cells[i].cell_type == "code" and not _is_test(nb.cells[i])
                                     and _uses_module(nb.cells[i].source, m)), None)
                      for ex in book.exercises}

    # Run with the reference modules blocked: a preamble cell, removed afterwards.
    preamble = nbformat.v4.new_code_cell(_preamble(tuple(forbidden_modules)), metadata={_PREAMBLE_KEY: True})
    run = copy.deepcopy(nb)
    run.cells.insert(0, preamble)
    blocks: dict[int, list[int]] = {}
    for ex in book.exercises:
        cells = [i + 1 for i in spans[ex.name]]
        for i in cells:
            blocks[i] = [j for j in cells if j == i or _is_test(run.cells[j])]
    with tempfile.TemporaryDirectory(prefix=f"tvlab-grade-{student}-") as tmp:
        cwd = Path(tmp) / "work"
        shutil.copytree(student_dir, cwd, ignore=shutil.ignore_patterns(".*"))
        for extra in book.path.parent.iterdir():  # the source folder's files win, as in nbgrader autograde
            if extra.is_file() and extra.suffix != ".ipynb" and not extra.name.startswith("."):
                shutil.copy(extra, cwd / extra.name)
        previous = os.environ.get("NBGRADER_EXECUTION")
        os.environ["NBGRADER_EXECUTION"] = "autograde"  # as nbgrader autograde sets it
        try:
            run = _execute(run, cwd, timeout, blocks, quiet=not verbose, label=f"{student} / {stem}: ", offset=1)
        finally:
            if previous is None:
                os.environ.pop("NBGRADER_EXECUTION", None)
            else:
                os.environ["NBGRADER_EXECUTION"] = previous
    run.cells = [c for c in run.cells if not c.metadata.get(_PREAMBLE_KEY)]
    _renumber(run)
    from nbgrader.preprocessors import LimitOutput

    run, _ = LimitOutput(log=_nbg_log).preprocess(run, {})  # as nbgrader autograde does after executing

    rows, total, total_max = [], 0.0, 0.0
    cells = {_nbg(c).get("grade_id"): c for c in run.cells if _nbg(c).get("grade_id")}
    for ex in book.exercises:
        notes, details, points = [], [], 0.0
        timed_out = any(any(o.get("ename") == "CellTimeoutError" for o in run.cells[i].get("outputs", []))
                        for i in spans[ex.name] if run.cells[i].cell_type == "code")
        for i in spans[ex.name]:  # the student's own cells of this exercise: say where it broke
            own = run.cells[i]
            error = _first_error(own) if own.cell_type == "code" and not _is_test(own) else None
            if error and error[0] != "CellTimeoutError":
                label = "your solution cell" if _nbg(own).get("grade_id") == ex.grade_id else "a cell you added"
                notes.append(f"{label} raised {error[0]}: {error[1]}".rstrip(": "))
                break
        for t in ex.tests:
            cell = cells.get(t.grade_id)
            if cell is None:
                score, why = 0.0, "test cell missing"
            else:
                score, why = _score(cell, t.points, strict_stderr)
                cell.metadata.nbgrader["score"] = score
                cell.metadata.nbgrader["points"] = t.points
            points += score
            details.append(f"{t.grade_id} {score:g}/{t.points:g}")
            if why:
                notes.append(f"{t.grade_id}{' (with hidden tests)' if t.hidden else ''}: {why}")
        solution = cells.get(ex.grade_id) if ex.grade_id else None
        untouched = solution is not None and _is_stub(solution.source, book.stubs.get(ex.grade_id))
        stub_left = solution is not None and any(line.strip() == _STUB_LINE for line in solution.source.split("\n"))
        if ex.grade_id and solution is None:
            points, notes = 0.0, ["solution cell missing"] + notes
        elif uses_reference[ex.name]:
            points, notes = 0.0, [f"uses {uses_reference[ex.name]} (the reference solutions): 0 points"]
        elif untouched:
            points, notes = 0.0, [NOT_ATTEMPTED]
        elif stub_left and points < ex.max_points:  # a stub left in place that still fails: not attempted
            points, notes = 0.0, [f"{NOT_ATTEMPTED}: `{_STUB_LINE}` is still in the solution cell"] + notes
        elif timed_out:
            notes.insert(0, f"stopped after the {timeout} s timeout")
        if solution is not None:
            solution.metadata.nbgrader["comment"] = "; ".join(notes) or "all tests passed"
        total += points
        total_max += ex.max_points
        rows.append({"student": student, "notebook": stem, "exercise": ex.name, "points": points,
                     "max_points": ex.max_points, "note": "; ".join(notes), "tests": "; ".join(details)})
    if feedback_dir is not None:
        _write_feedback(run, rows, stem, total, total_max, Path(feedback_dir) / student / f"{stem}.html",
                        feedback_hidden_tests)
    return rows


def _write_feedback(nb, rows: list[dict], stem: str, score: float, max_score: float, out: Path,
                    hidden_tests: bool) -> None:
    """nbgrader's feedback page (its HTML template, as ``nbgrader generate_feedback`` renders it), with a
    summary of points and notes on top. Hidden-test code is cleared unless ``hidden_tests``; their
    tracebacks are cut to the error line."""
    import nbformat
    from nbconvert.exporters import HTMLExporter
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import ClearHiddenTests
    from traitlets.config import Config

    nb = copy.deepcopy(nb)
    if not hidden_tests:
        for cell in nb.cells:
            if "BEGIN HIDDEN TESTS" in cell.source:
                for out_ in cell.get("outputs", []):
                    if out_.get("output_type") == "error":
                        out_["traceback"] = [f"{out_.get('ename', 'Error')}: {out_.get('evalue', '')}"]
        nb, _ = ClearHiddenTests(log=_nbg_log).preprocess(nb, {})
    table = ["| exercise | points | note |", "|---|---|---|"]
    table += [f"| `{r['exercise']}` | {r['points']:g} / {r['max_points']:g} | {r['note'] or 'all tests passed'} |"
              for r in rows]
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"## Feedback: {stem}\n\nTotal: **{score:g} / {max_score:g}**"
                                                     "\n\n" + "\n".join(table)))
    import nbgrader

    root = Path(nbgrader.__file__).parent / "server_extensions" / "formgrader"
    c = Config()
    c.HTMLExporter.template_name = "feedback"
    c.HTMLExporter.extra_template_basedirs = [str(root / "templates")]
    c.HTMLExporter.extra_template_paths = [str(root / "static" / "node_modules" / "bootstrap" / "dist" / "css")]
    exporter = HTMLExporter(config=c)
    exporter.register_preprocessor(CSSHTMLHeaderPreprocessor(), enabled=True)
    resources = {"nbgrader": {"notebook": stem, "assignment": ASSIGNMENT, "score": score, "max_score": max_score,
                              "late_penalty": 0}}
    html, _ = exporter.from_notebook_node(nb, resources=resources)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")


def _check_writable(path: Path, folder: bool) -> None:
    """A CourseError unless ``path`` can be written: a folder (``folder``) or a file, with no file in the way."""
    if folder and path.exists() and not path.is_dir():
        raise CourseError(f"{path}: is a file, not a folder; name a folder for the feedback (--feedback DIR)")
    if not folder and path.is_dir():
        raise CourseError(f"{path}: is a folder; --out names the grades file, e.g. {path / 'grades.csv'}")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CourseError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise CourseError(f"cannot write {path}: no permission to write in {existing}")


def grade(source: Path | list[Path], submissions: Path, out_csv: Path, feedback_dir: Path | None = None,
          timeout: int = 120, *, strict_stderr: bool = False, forbidden_modules: Iterable[str] = FORBIDDEN_MODULES,
          feedback_hidden_tests: bool = False, progress: bool = False, verbose: bool = False) -> pd.DataFrame:
    """Grade ``submissions/<student>/<notebook>.ipynb`` against the source notebooks.

    Per student and notebook: nbgrader autograde's sanitize chain restores locked and test cells with their
    hidden tests from the source (a throwaway gradebook holds them), then the notebook runs in a ``python3``
    kernel with a per-cell ``timeout`` (an interrupted or crashed cell does not stop the rest), with
    ``forbidden_modules`` blocked. Each exercise scores the sum of its test cells, or 0 with a note: "not
    attempted" (the stub is still there), "not submitted", or using the reference solutions.

    Returns and writes to ``out_csv`` one row per student per exercise: student, notebook, exercise
    (the solution cell's grade_id), points, max_points, note, tests (each test cell's score). With
    ``feedback_dir``, writes ``feedback_dir/<student>/<notebook>.html``.

    ``strict_stderr``: a test cell that writes to stderr scores 0 (nbgrader's rule). ``feedback_hidden_tests``:
    show the hidden tests' code in the feedback. ``progress``: a line per notebook graded, on stderr.
    ``verbose``: also nbgrader's and nbclient's log messages and the kernels' console output.
    """
    _need_nbgrader()
    paths = _sources(source)
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise CourseError(f"{submissions}: no such submissions folder (expected SUBMISSIONS/<student>/<notebook>.ipynb)")
    students = sorted((d for d in submissions.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: d.name)
    if not students:
        loose = sorted(p.name for p in submissions.glob("*.ipynb"))
        hint = f"; found notebooks directly in it ({', '.join(loose[:3])}): put each in a folder named for its student" if loose else ""
        raise CourseError(f"{submissions}: no student folders (expected SUBMISSIONS/<student>/<notebook>.ipynb){hint}")
    if timeout is not None and timeout <= 0:
        raise CourseError(f"timeout must be a positive number of seconds, got {timeout}")
    _check_writable(Path(out_csv), folder=False)  # before any grading: a late failure would lose every grade
    if feedback_dir is not None:
        _check_writable(Path(feedback_dir), folder=True)
    rows: list[dict] = []
    handler = logging.StreamHandler(sys.stderr) if verbose else None
    if handler:
        _nbg_log.addHandler(handler)
        _nbg_log.setLevel(logging.INFO)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="tvlab-gradebook-") as tmp:
        if handler:
            stack.callback(_nbg_log.removeHandler, handler)
        db_url = f"sqlite:///{Path(tmp) / 'gradebook.db'}"
        books = _prepare_books(paths, db_url)
        for student_dir in students:
            for stem, book in books.items():
                start = time.perf_counter()
                got = _grade_notebook(student_dir, book, db_url, timeout, strict_stderr, tuple(forbidden_modules),
                                      feedback_dir, feedback_hidden_tests, verbose)
                rows += got
                if progress:
                    points, most = sum(r["points"] for r in got), sum(r["max_points"] for r in got)
                    print(f"{student_dir.name} / {stem}: {points:g} / {most:g} ({time.perf_counter() - start:.0f} s)",
                          file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvlab course", description="Release and grade the notebooks as "
                                     "nbgrader assignments.")
    sub = parser.add_subparsers(dest="action", required=True)
    rel = sub.add_parser("release", help="write student notebooks: stubs, visible tests, no solutions, no outputs")
    rel.add_argument("source", nargs="+", help="source notebooks, or folders of them")
    rel.add_argument("--out", required=True, help="folder for the student notebooks")
    rel.add_argument("--self-study", action="store_true",
                     help="write self-study copies instead (Binder/Colab learners): stubs, visible checks, the "
                          "reference solutions and model answers collapsed, the other cells' outputs kept")
    rel.add_argument("--badge-path", default=SELF_STUDY_DIR,
                     help="with --self-study: the copies' folder in the repository, for their Colab/Binder "
                          f"badges (default {SELF_STUDY_DIR})")
    gr = sub.add_parser("grade", help="autograde submitted notebooks into a CSV (and HTML feedback)")
    gr.add_argument("source", nargs="+", help="source notebooks (with solutions and hidden tests), or folders")
    gr.add_argument("--submissions", required=True, help="folder of SUBMISSIONS/<student>/<notebook>.ipynb")
    gr.add_argument("--out", required=True, help="CSV file to write (one row per student per exercise)")
    gr.add_argument("--feedback", default=None, help="folder for FEEDBACK/<student>/<notebook>.html")
    gr.add_argument("--timeout", type=int, default=120, help="seconds each cell may run (default 120)")
    gr.add_argument("--strict-stderr", action="store_true",
                    help="a test cell that writes to stderr scores 0 (nbgrader's own rule; off by default, "
                         "since warnings and progress bars go there)")
    gr.add_argument("--show-hidden-tests", action="store_true", help="show the hidden tests' code in the feedback")
    gr.add_argument("--verbose", action="store_true", help="show nbgrader's and the kernels' log messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "release":
            for path in release(args.source, Path(args.out), self_study=args.self_study, badge_path=args.badge_path):
                print(path)
            return 0
        if args.timeout <= 0:
            raise CourseError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        frame = grade(args.source, Path(args.submissions), Path(args.out),
                      Path(args.feedback) if args.feedback else None, timeout=args.timeout,
                      strict_stderr=args.strict_stderr, feedback_hidden_tests=args.show_hidden_tests,
                      progress=True, verbose=args.verbose)
        totals = frame.groupby("student")[["points", "max_points"]].sum()
        print(totals.to_string())
        print(f"Wrote {args.out}" + (f" and feedback in {args.feedback}" if args.feedback else ""))
        return 0
    except CourseError as e:
        print(f"tvlab course: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
