"""The course as a whole: every notebook in notebooks/ released, one real notebook graded, and the
committed self-study copies in course/self-study checked against the sources.

Runs in the default ``pytest`` (CI). The release and self-study tests take seconds; the grading tests run
one real notebook (00, the cheapest) three times in a Jupyter kernel (it loads the bundled model; marked
``model``): this file and tests/test_course.py together took 177 s on a 2-core machine running other jobs
(load average about 4).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbgrader", reason="the course tooling needs nbgrader: pip install 'tvlab[course]'")

from tvlab import course  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SELF_STUDY = ROOT / course.SELF_STUDY_DIR
REGENERATE = f"tvlab course release notebooks --self-study --out {course.SELF_STUDY_DIR}"

# The notebook graded end to end: the cheapest to run (grading runs the whole notebook once per
# submission). Others in the order of their run time, used if it has no exercise with a forbid() check.
GRADED_PREFERENCE = ["00_welcome", "06_inspecting_task_vectors", "04_task_vector_geometry",
                     "02_extracting_task_vectors", "01_icl_basics", "05_conflicting_tasks", "07_comparing_models",
                     "03_layer_sweep", "08_beyond_the_paper"]
GRADE_TIMEOUT = 300  # seconds per cell: generous, for a busy CI machine

# A submission that calls the library function an exercise asks to re-implement, by the name its hidden
# test forbid()s: the body of the student's function, with {0}, {1}, ... its parameters in order.
# Each passes the exercise's visible check, and must lose the hidden-test points.
CHEATS = {
    "next_token_probs": "return tvlab.explore.next_token_probs({0}, {1}, k=1)['token'].iloc[0]",
    "render": "return tvlab.prompts.FORMATS['paper'].render({0}, {1})",
    "extract_task_vector": "return tvlab.extract_task_vector({0}, {1}, {2}, {3})",
    "top_tokens": "return tvlab.inspect_vectors.top_tokens({0}, {1}, {2})['token'].tolist()",
    "distance_summary": "return tvlab.geometry.distance_summary({0}, {1})['within']",
}


def _read(path: Path):
    return nbformat.read(str(path), as_version=4)


@pytest.fixture(scope="module")
def sources():
    assert NOTEBOOKS, "no notebooks in notebooks/"
    return {p.stem: _read(p) for p in NOTEBOOKS}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The student release of the whole series (each notebook named: one that is not converted fails)."""
    out = tmp_path_factory.mktemp("series") / "release"
    return {p.stem: p for p in course.release(NOTEBOOKS, out)}


# --------------------------------------------------------------------------------------------------
# The release of the whole series


def _secret_lines(nb) -> set[str]:
    """Lines (8+ characters, not comments) the source has only inside solution or hidden-test regions."""
    secret, public = set(), set()
    for cell in nb.cells:
        found = course._regions(cell.source)
        secret |= found["solution"] | found["hidden"]
        if course.REFERENCE_TAG not in cell.metadata.get("tags", []):
            public |= found["outside"]
    return {line for line in secret - public if len(line) >= 8 and not line.startswith("#")}


def test_series_release_has_no_solutions_hidden_tests_reveals_or_outputs(sources, released):
    assert sorted(released) == sorted(sources)
    for stem, path in released.items():
        src, nb = sources[stem], _read(path)
        secret = _secret_lines(src)
        assert secret, f"{stem}: the source has no solution or hidden-test lines: the scan would prove nothing"
        with pytest.raises(course.CourseError):  # the same scan catches the source itself
            course.check_release(src, src, stem)
        for i, cell in enumerate(nb.cells):
            where = f"{stem} released cell {i}"
            for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS", "MARK SCHEME"):
                assert marker not in cell.source, f"{where}: {marker}"
            leaked = {line.strip() for line in cell.source.split("\n")} & secret
            assert not leaked, f"{where} holds solution or hidden-test code: {sorted(leaked)[:3]}"
            assert course.REFERENCE_TAG not in cell.metadata.get("tags", []), f"{where} is a reveal cell"
            if cell.cell_type == "code":
                assert not cell.get("outputs"), f"{where} has outputs"
                assert not course._uses_module(cell.source, "tvlab.solutions"), f"{where} imports tvlab.solutions"
        stubs = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
        assert stubs and all("raise NotImplementedError()" in c.source for c in stubs), stem
        assert "widgets" not in nb.metadata, f"{stem}: widget state (stored outputs) in the release"


def test_every_notebook_has_graded_exercises(sources):
    for stem, nb in sources.items():
        exercises = course.list_exercises(nb, stem)  # raises on a malformed exercise
        assert exercises, f"{stem}: no exercise"
        for ex in exercises:
            assert ex.grade_id, f"{stem}: test cells {[t.grade_id for t in ex.tests]} follow no solution cell"
            assert ex.tests and all(t.points > 0 for t in ex.tests), f"{stem}: {ex.name} has a test without points"
            assert any(t.hidden for t in ex.tests), f"{stem}: {ex.name} has no hidden tests"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and course.REFERENCE_TAG not in cell.metadata.get("tags", []):
                assert not course._uses_module(cell.source, "tvlab.solutions"), f"{stem} cell {i} uses tvlab.solutions"


def test_every_exercise_says_difficulty_importance_and_time(sources):
    """ARENA's line above each exercise: `Difficulty: 🔴🔴⚪⚪⚪ · Importance: 🔵🔵🔵⚪⚪ · About 15 minutes`."""
    for stem, nb in sources.items():
        start = 0
        for i, cell in enumerate(nb.cells):
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("solution"):
                above = [c.source for c in nb.cells[start:i] if c.cell_type == "markdown"]
                assert any(re.search(r"Difficulty:.*Importance:.*\d+\s*minutes", text, re.DOTALL) for text in above), \
                    f"{stem}: no 'Difficulty: ... · Importance: ... · About N minutes' line above {meta['grade_id']}"
            if meta.get("grade") or meta.get("solution"):
                start = i + 1


def test_questions_to_explore_have_model_answers(sources):
    for stem, nb in sources.items():
        asked = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "Questions to explore" in c.source]
        for i in asked:
            answers = [c for c in nb.cells[i + 1:] if course.REFERENCE_TAG in c.metadata.get("tags", [])]
            assert answers, f"{stem}: 'Questions to explore' (cell {i}) has no model answer cell after it"
            assert all(c.cell_type == "markdown" and c.source.strip() for c in answers), stem


# --------------------------------------------------------------------------------------------------
# The self-study copies (course/self-study)


def test_self_study_copies_are_current(sources, tmp_path):
    """The committed copies are exactly what the release makes from the current sources, hold no hidden
    test, and show solution code and model answers only in their collapsed <details> blocks."""
    assert SELF_STUDY.is_dir(), f"{course.SELF_STUDY_DIR}/ is missing (the README links to it): run `{REGENERATE}`"
    fresh = {p.name: p for p in course.release(NOTEBOOKS, tmp_path / "self-study", self_study=True)}
    committed = {p.name: p for p in SELF_STUDY.glob("*.ipynb")}
    assert sorted(committed) == sorted(fresh), (
        f"{course.SELF_STUDY_DIR} holds {sorted(committed)}, the sources give {sorted(fresh)}: run `{REGENERATE}` "
        "(and delete copies whose source is gone)")
    stale = [name for name in sorted(fresh)
             if json.loads(committed[name].read_text(encoding="utf-8")) != json.loads(fresh[name].read_text(encoding="utf-8"))]
    assert not stale, f"stale self-study copies {stale}: run `{REGENERATE}` and commit them"
    for name, path in committed.items():
        stem = Path(name).stem
        src, nb = sources[stem], _read(path)
        course.check_self_study(src, nb, name)
        secret = _secret_lines(src)
        hidden, solution = set(), set()
        for cell in src.cells:
            hidden |= course._regions(cell.source)["hidden"]
            solution |= course._regions(cell.source)["solution"]
        hidden = {line for line in hidden - solution - _public_lines(src) if len(line) >= 8 and not line.startswith("#")}
        for i, cell in enumerate(nb.cells):
            where = f"{name} cell {i}"
            assert "HIDDEN TESTS" not in cell.source and "BEGIN SOLUTION" not in cell.source, where
            assert not ({line.strip() for line in cell.source.split("\n")} & hidden), f"{where} holds hidden-test code"
            outside = course._outside_details(cell.source) if cell.cell_type == "markdown" else cell.source
            leaked = {line.strip() for line in outside.split("\n")} & secret
            assert not leaked, f"{where} shows solution code outside <details>: {sorted(leaked)[:3]}"
        # every exercise: a stub, and its reference solution folded after its checks
        exercises = [ex.grade_id for ex in course.list_exercises(src, stem)]
        roles = [c.metadata.get("tvlab_self_study") for c in nb.cells]
        assert roles.count("exercise") == roles.count("reference-solution") == len(exercises), name
        reveals = [c.source for c in nb.cells if c.metadata.get("tvlab_self_study") == "reference-solution"]
        assert all(r.startswith(f"<details><summary>{course.SOLUTION_SUMMARY}</summary>") for r in reveals), name
        answers = sum(course.REFERENCE_TAG in c.metadata.get("tags", []) for c in src.cells)
        assert roles.count("model-answer") == answers, name
        assert "blob/main/course/self-study/" in nb.cells[0].source or "colab" not in nb.cells[0].source, \
            f"{name}: the Colab badge does not open the self-study copy"


def _public_lines(nb) -> set[str]:
    public = set()
    for cell in nb.cells:
        if course.REFERENCE_TAG not in cell.metadata.get("tags", []):
            public |= course._regions(cell.source)["outside"]
    return public


# --------------------------------------------------------------------------------------------------
# Grading one real notebook


def _forbidden_names(test_source: str) -> list[str]:
    """The last component of each function a hidden test forbid()s: forbid(tvlab.x), forbid("tvlab.y.z")."""
    names = []
    for args in re.findall(r"forbid\(([^)]*)\)", test_source):
        for arg in args.split(","):
            arg = arg.strip().strip("'\"")
            if arg and "=" not in arg:
                names.append(arg.rsplit(".", 1)[-1])
    return names


def _cheats(src) -> dict[str, tuple[str, list[str]]]:
    """{solution grade_id: (forbidden name with a cheat in CHEATS, all names forbidden)} for the exercises
    whose hidden tests forbid() a library function."""
    found = {}
    for ex in course.list_exercises(src):
        tests = [c.source for c in src.cells if c.metadata.get("nbgrader", {}).get("grade_id") in
                 {t.grade_id for t in ex.tests}]
        names = [n for text in tests for n in _forbidden_names(text)]
        usable = [n for n in names if n in CHEATS]
        if names:
            found[ex.grade_id] = (usable[0] if usable else None, names)
    return found


def _cheat_source(stub: str, body: str) -> str:
    """The stub with its ``# YOUR CODE HERE`` / raise replaced by ``body`` (formatted with the parameters)."""
    lines = stub.split("\n")
    at = next(i for i, line in enumerate(lines) if "YOUR CODE HERE" in line)
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    fn = next(node for node in ast.walk(ast.parse(stub)) if isinstance(node, ast.FunctionDef))
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return "\n".join(lines[:at] + [f"{indent}import tvlab", indent + body.format(*params)])


@pytest.fixture(scope="module")
def graded_name(sources):
    """The cheapest notebook that has an exercise whose hidden test forbids a function CHEATS covers."""
    missing = {}
    for stem in GRADED_PREFERENCE:
        if stem not in sources:
            continue
        try:
            cheats = _cheats(sources[stem])
        except course.CourseError:
            continue  # not converted
        if any(name for name, _ in cheats.values()):
            return stem
        missing.update({f"{stem}:{gid}": names for gid, (_, names) in cheats.items()})
    pytest.fail("no notebook has an exercise whose hidden test forbid()s a function CHEATS knows how to call; "
                f"forbidden: {missing}. Add a cheat for one of them to CHEATS.")


@pytest.fixture(scope="module")
def graded(graded_name, tmp_path_factory):
    """Three submissions of one real notebook, graded with the source's hidden tests."""
    source = ROOT / "notebooks" / f"{graded_name}.ipynb"
    root = tmp_path_factory.mktemp("graded")
    [rel] = course.release(source, root / "release")
    src = _read(source)
    subs = root / "submitted"
    (subs / "untouched").mkdir(parents=True)
    shutil.copy(rel, subs / "untouched" / rel.name)
    solved = course.paste_solutions(source, rel, subs / "solved" / rel.name)
    cheats = {gid: name for gid, (name, _) in _cheats(src).items() if name}
    nb = _read(solved)  # the reference everywhere, but the exercises that call the library function
    for cell in _read(rel).cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in cheats:
            target = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == gid)
            target.source = _cheat_source(cell.source, CHEATS[cheats[gid]])
    (subs / "cheat").mkdir()
    nbformat.write(nb, str(subs / "cheat" / rel.name))
    start = time.perf_counter()
    frame = course.grade(source, subs, root / "grades.csv", feedback_dir=root / "feedback", timeout=GRADE_TIMEOUT,
                         progress=True)  # a line per submission on stderr, with its time
    seconds = time.perf_counter() - start
    print(f"\ngraded {graded_name} for 3 submissions in {seconds:.0f} s")
    return graded_name, src, cheats, frame.set_index(["student", "exercise"]).sort_index(), root


@pytest.mark.model
def test_unmodified_release_scores_zero_not_attempted(graded):
    stem, src, _, frame, _ = graded
    rows = frame.loc["untouched"]
    assert len(rows) == len(course.list_exercises(src)), rows
    assert (rows["points"] == 0).all(), rows
    assert (rows["note"] == course.NOT_ATTEMPTED).all(), rows


@pytest.mark.model
def test_reference_solutions_pasted_in_get_full_points(graded):
    stem, src, _, frame, root = graded
    rows = frame.loc["solved"]
    assert (rows["points"] == rows["max_points"]).all(), rows[["points", "max_points", "note"]].to_string()
    assert rows["note"].fillna("").eq("").all(), rows["note"].tolist()
    assert (root / "feedback" / "solved" / f"{stem}.html").exists()


@pytest.mark.model
def test_calling_the_library_function_loses_the_hidden_test_points(graded):
    stem, src, cheats, frame, _ = graded
    assert cheats, stem
    exercises = {ex.grade_id: ex for ex in course.list_exercises(src)}
    for gid, row in frame.loc["cheat"].iterrows():
        ex = exercises[gid]
        if gid in cheats:
            visible_only = sum(t.points for t in ex.tests if not t.hidden)
            assert row.points == visible_only < ex.max_points, (gid, row.to_dict())
            assert "ForbiddenCall" in row.note or "called" in row.note, (gid, row.note)
            assert "(with hidden tests)" in row.note, (gid, row.note)
        else:  # the reference solution: untouched by the cheat next to it
            assert row.points == ex.max_points, (gid, row.to_dict())
