"""tvlab.course: release and grade nbgrader assignments, on small synthetic notebooks (no model)."""

from __future__ import annotations

import json
import operator
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tvlab import course
from tvlab.course import reference_cell, solution_cell, test_cell

md = nbformat.v4.new_markdown_cell
code = nbformat.v4.new_code_cell

ADD_SOLUTION = '''def add(a, b):
    """a + b, without operator.add."""
    ### BEGIN SOLUTION
    total_sum = a + b
    return total_sum
    ### END SOLUTION'''

ADD_TESTS = '''assert add(2, 3) == 5
### BEGIN HIDDEN TESTS
from unittest import mock
assert add(-7, 7) == 0, "add(-7, 7) should be 0"
with mock.patch("operator.add", side_effect=RuntimeError("operator.add is the function to re-implement")):
    assert add(10, 5) == 15
### END HIDDEN TESTS'''

MEAN_SOLUTION = '''def mean(xs):
    ### BEGIN SOLUTION
    how_many = len(xs)
    return sum(xs) / how_many
    ### END SOLUTION'''

MEAN_HIDDEN = '''# More tests run when the notebook is graded.
### BEGIN HIDDEN TESTS
import math
from unittest import mock
assert mean([4]) == 4, "one number"
assert math.isclose(mean([0.1, 0.2]), 0.15)
with mock.patch("statistics.mean", side_effect=RuntimeError("statistics.mean is the function to re-implement")):
    assert mean([1, 3]) == 2
### END HIDDEN TESTS'''

SCALE_SOLUTION = '''def scale(xs, k):
    ### BEGIN SOLUTION
    return [k * x for x in xs]
    ### END SOLUTION'''

SCALE_TESTS = '''assert scale([1, 2], 3) == [3, 6]
### BEGIN HIDDEN TESTS
import operator
from tvlab.course import forbid
with forbid(operator.mul) as called:
    assert scale([2], 5) == [10]
assert not called, f"called {called}"
### END HIDDEN TESTS'''


def basics_notebook():
    return nbformat.v4.new_notebook(cells=[
        md("# Basics"),
        code("import operator\nimport statistics"),
        md("## Exercise 1: `add` without `operator.add`"),
        solution_cell(ADD_SOLUTION, "ex_add"),
        test_cell(ADD_TESTS, "test_add", 2),
        reference_cell("**Solution** (try first!)", "markdown"),
        reference_cell("from tvlab.solutions import build_prompt  # the reference, revealed on purpose"),
        md("## Exercise 2: `mean` without `statistics.mean`"),
        solution_cell(MEAN_SOLUTION, "ex_mean"),
        test_cell("assert mean([1, 2, 3]) == 2", "test_mean", 1),
        test_cell(MEAN_HIDDEN, "test_mean_hidden", 2),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def forbid_notebook():
    return nbformat.v4.new_notebook(cells=[
        md("# `scale` without `operator.mul`"),
        solution_cell(SCALE_SOLUTION, "ex_scale"),
        test_cell(SCALE_TESTS, "test_scale", 1),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def _write(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _with_solution(released: Path, out: Path, **sources: str) -> Path:
    """The released notebook with solution cells (by grade_id) replaced; None deletes a cell."""
    nb = nbformat.read(str(released), as_version=4)
    for cell in list(nb.cells):
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in sources:
            if sources[gid] is None:
                nb.cells.remove(cell)
            else:
                cell.source = sources[gid]
    return _write(nb, out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    src = root / "source"
    basics = _write(basics_notebook(), src / "basics.ipynb")
    forbidden = _write(forbid_notebook(), src / "forbid.ipynb")
    # a stale output in the source must not reach the release
    nb = nbformat.read(str(basics), as_version=4)
    nb.cells[3].outputs = []
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="total_sum = 5\n")]
    _write(nb, basics)
    released = course.release([basics, forbidden], root / "release")
    return root, src, {p.stem: p for p in released}


def test_release_has_no_solutions_hidden_tests_or_reveals(setup):
    root, src, released = setup
    assert sorted(released) == ["basics", "forbid"]
    secrets = ["total_sum", "how_many", "k * x", "BEGIN", "END SOLUTION", "HIDDEN", "mock.patch", "math.isclose",
               "mean([4])", "add(-7, 7)", "forbid(", "tvlab.solutions", "Solution**", "try first"]
    for path in released.values():
        text = path.read_text()
        nb = nbformat.read(str(path), as_version=4)
        for cell in nb.cells:
            for secret in secrets:
                assert secret not in cell.source, (path.name, secret, cell.source)
            assert course.REFERENCE_TAG not in cell.metadata.get("tags", [])
            assert not cell.get("outputs")
        assert "total_sum" not in text and "how_many" not in text
    nb = nbformat.read(str(released["basics"]), as_version=4)
    by_id = {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}
    assert "raise NotImplementedError()" in by_id["ex_add"].source
    assert by_id["ex_add"].source.startswith("def add(a, b):")
    assert by_id["test_add"].source.strip() == "assert add(2, 3) == 5"  # visible check stays
    assert by_id["test_add"].metadata["nbgrader"]["points"] == 2
    assert by_id["test_add"].metadata["nbgrader"]["locked"] and by_id["test_add"].metadata["editable"] is False
    assert "more tests run" in by_id["test_mean_hidden"].source.lower() and "assert" not in by_id["test_mean_hidden"].source


def test_release_refuses_an_untagged_reveal_and_a_notebook_without_tests(tmp_path):
    nb = basics_notebook()
    nb.cells[6].metadata["tags"] = []
    with pytest.raises(course.CourseError, match="tvlab.solutions"):
        course.release(_write(nb, tmp_path / "a.ipynb"), tmp_path / "out")
    plain = nbformat.v4.new_notebook(cells=[md("# nothing"), code("x = 1")])
    with pytest.raises(course.CourseError, match="no autograded test cells"):
        course.release(_write(plain, tmp_path / "b.ipynb"), tmp_path / "out")
    lonely = nbformat.v4.new_notebook(cells=[solution_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "ex"),
                                             test_cell("assert x == 1", "t", 1),
                                             solution_cell("### BEGIN SOLUTION\ny = 1\n### END SOLUTION", "ex2")])
    with pytest.raises(course.CourseError, match="no test cell below it"):
        course.release(_write(lonely, tmp_path / "c.ipynb"), tmp_path / "out")
    with pytest.raises(course.CourseError, match="no such notebook"):
        course.release(tmp_path / "missing.ipynb", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def graded(setup):
    root, src, released = setup
    subs = root / "submitted"
    rel = released["basics"]
    _with_solution(rel, subs / "untouched" / "basics.ipynb")
    shutil.copy(released["forbid"], subs / "untouched" / "forbid.ipynb")
    course.paste_solutions(src / "basics.ipynb", rel, subs / "solved" / "basics.ipynb")
    course.paste_solutions(src / "forbid.ipynb", released["forbid"], subs / "solved" / "forbid.ipynb")
    _with_solution(rel, subs / "cheat" / "basics.ipynb",
                   ex_add="def add(a, b):\n    return operator.add(a, b)",
                   ex_mean="def mean(xs):\n    return statistics.mean(xs)")
    _with_solution(released["forbid"], subs / "cheat" / "forbid.ipynb",
                   ex_scale="from operator import mul\n\ndef scale(xs, k):\n    return [mul(k, x) for x in xs]")
    good_mean = "def mean(xs):\n    return sum(xs) / len(xs)"
    _with_solution(rel, subs / "looper" / "basics.ipynb",
                   ex_add="def add(a, b):\n    while True:\n        pass", ex_mean=good_mean)
    _with_solution(rel, subs / "crash" / "basics.ipynb",
                   ex_add="import no_such_module_for_tvlab\n\ndef add(a, b):\n    return a + b",
                   # the stub's raise left below a working body: graded on the tests
                   ex_mean="def mean(xs):\n    return sum(xs) / len(xs)\n    # YOUR CODE HERE\n    raise NotImplementedError()")
    _with_solution(rel, subs / "peeker" / "basics.ipynb",
                   ex_add="from tvlab.solutions import build_prompt\n\ndef add(a, b):\n    return a + b",
                   ex_mean=good_mean, test_mean_hidden=None)  # a deleted test cell comes back
    _with_solution(rel, subs / "stubborn" / "basics.ipynb",
                   ex_add="import time\n\ndef add(a, b):\n    while True:\n        try:\n            time.sleep(60)\n"
                          "        except KeyboardInterrupt:\n            pass",
                   ex_mean=good_mean)
    _with_solution(rel, subs / "killer" / "basics.ipynb",
                   ex_add="import os\n\ndef add(a, b):\n    os._exit(1)", ex_mean=good_mean)
    (subs / "broken").mkdir()
    (subs / "broken" / "basics.ipynb").write_text("{not json")
    frame = course.grade(src / "basics.ipynb", subs, root / "grades.csv", feedback_dir=root / "feedback", timeout=5)
    # forbid.ipynb's hidden test imports tvlab (and torch): a longer timeout, so a busy CI machine is no problem
    more = course.grade(src / "forbid.ipynb", subs, root / "grades_forbid.csv", feedback_dir=root / "feedback",
                        timeout=120)
    return root, pd.concat([frame, more]).set_index(["student", "notebook", "exercise"]).sort_index()


def _row(frame, student, exercise, notebook="basics"):
    return frame.loc[(student, notebook, exercise)]


def test_grade_writes_one_row_per_student_and_exercise(graded):
    root, frame = graded
    csv = pd.read_csv(root / "grades.csv")
    assert list(csv.columns) == course.COLUMNS
    assert len(csv) == 9 * 2  # 9 students x 2 exercises
    assert len(pd.read_csv(root / "grades_forbid.csv")) == 9
    assert frame["max_points"].to_dict()[("solved", "basics", "ex_add")] == 2
    assert _row(frame, "solved", "ex_mean").max_points == 3


def test_unmodified_release_scores_zero_not_attempted(graded):
    _, frame = graded
    rows = frame.loc["untouched"]
    assert (rows["points"] == 0).all()
    assert (rows["note"] == course.NOT_ATTEMPTED).all()


def test_reference_solutions_get_full_points(graded):
    _, frame = graded
    rows = frame.loc["solved"]
    assert (rows["points"] == rows["max_points"]).all(), rows
    assert rows["note"].fillna("").eq("").all()


def test_calling_the_library_function_loses_the_hidden_points(graded):
    _, frame = graded
    add, mean = _row(frame, "cheat", "ex_add"), _row(frame, "cheat", "ex_mean")
    assert add.points == 0 and "operator.add is the function to re-implement" in add.note
    assert mean.points == 1 and "test_mean_hidden (with hidden tests)" in mean.note  # the visible point stays
    scale = _row(frame, "cheat", "ex_scale", "forbid")  # bound under another name: forbid() finds it
    assert scale.points == 0 and "ForbiddenCall" in scale.note


def test_an_infinite_loop_is_stopped_and_the_rest_is_graded(graded):
    _, frame = graded
    for student in ("looper", "stubborn"):  # the second catches KeyboardInterrupt: the kernel is replaced
        add, mean = _row(frame, student, "ex_add"), _row(frame, student, "ex_mean")
        assert add.points == 0 and "timeout" in add.note, (student, add.note)
        assert mean.points == 3, (student, mean.note)


def test_a_crash_scores_zero_on_that_exercise_only(graded):
    _, frame = graded
    add, mean = _row(frame, "crash", "ex_add"), _row(frame, "crash", "ex_mean")
    assert add.points == 0 and "ModuleNotFoundError" in add.note and "NameError" in add.note
    assert mean.points == 3
    add, mean = _row(frame, "killer", "ex_add"), _row(frame, "killer", "ex_mean")  # the kernel itself died
    assert add.points == 0 and "kernel died" in add.note
    assert mean.points == 3


def test_importing_the_solutions_scores_zero(graded):
    _, frame = graded
    add, mean = _row(frame, "peeker", "ex_add"), _row(frame, "peeker", "ex_mean")
    assert add.points == 0 and "tvlab.solutions" in add.note
    assert mean.points == 3  # its deleted hidden-test cell was restored and passed


def test_missing_and_broken_notebooks_score_zero(graded):
    _, frame = graded
    assert (frame.loc[("looper", "forbid")]["note"] == course.NOT_SUBMITTED).all()
    broken = frame.loc[("broken", "basics")]
    assert (broken["points"] == 0).all() and broken["note"].str.contains("could not read").all()


def test_feedback_has_scores_but_no_hidden_tests(graded):
    root, _ = graded
    page = (root / "feedback" / "cheat" / "basics.html").read_text()
    assert "Score: 1.0 / 3.0" in page or "1 / 3" in page
    assert "mock.patch" not in page and "operator.add is the function to re-implement" in page
    assert (root / "feedback" / "solved" / "forbid.html").exists()
    assert not (root / "feedback" / "looper" / "forbid.html").exists()


def test_forbid_swaps_every_binding_and_restores_them():
    from operator import mul as my_mul  # noqa: F401 - a binding forbid must find
    with course.forbid(operator.mul) as called:
        assert operator.mul is not my_mul
        with pytest.raises(course.ForbiddenCall, match="mul"):
            globals()["operator"].mul(2, 3)
        assert called == ["_operator.mul"]
    assert operator.mul(2, 3) == 6
    with course.forbid("json.dumps"):
        with pytest.raises(course.ForbiddenCall):
            json.dumps({})
    assert json.dumps({}) == "{}"


def test_cli_errors(tmp_path, capsys):
    assert course.main(["grade", str(tmp_path / "nope.ipynb"), "--submissions", str(tmp_path), "--out",
                        str(tmp_path / "g.csv")]) == 2
    assert "no such notebook" in capsys.readouterr().err
    src = _write(basics_notebook(), tmp_path / "basics.ipynb")
    assert course.main(["grade", str(src), "--submissions", str(tmp_path / "none"), "--out",
                        str(tmp_path / "g.csv")]) == 2
    assert "no such submissions folder" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    shutil.copy(src, tmp_path / "flat" / "basics.ipynb")
    assert course.main(["grade", str(src), "--submissions", str(tmp_path / "flat"), "--out",
                        str(tmp_path / "g.csv")]) == 2
    assert "put each in a folder named for its student" in capsys.readouterr().err
    (tmp_path / "subs" / "alice").mkdir(parents=True)
    shutil.copy(src, tmp_path / "subs" / "alice" / "basics.ipynb")
    (tmp_path / "afile").write_text("")
    for out, more, said in ((tmp_path / "subs", [], "is a folder; --out names the grades file"),
                            (tmp_path / "afile" / "g.csv", [], "afile is a file, not a folder"),
                            (tmp_path / "g.csv", ["--feedback", str(tmp_path / "afile")], "name a folder for the feedback")):
        # refused before any notebook is graded (no kernel starts), so a bad path loses no work
        assert course.main(["grade", str(src), "--submissions", str(tmp_path / "subs"), "--out", str(out), *more]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "g.csv").exists()
    assert course.main(["release", str(src), "--out", str(tmp_path / "rel")]) == 0
    assert (tmp_path / "rel" / "basics.ipynb").exists()


def test_reference_module_detection_ignores_comments():
    uses = course._uses_module
    assert uses("from tvlab import (exercises,\n    solutions)", "tvlab.solutions")
    assert uses("import importlib\nimportlib.import_module('tvlab.solutions')", "tvlab.solutions")
    assert not uses("x = 1  # I did not look at tvlab.solutions", "tvlab.solutions")
    assert not uses("from tvlab import exercises", "tvlab.solutions")


# --------------------------------------------------------------------------------------------------
# Self-study copies (release(..., self_study=True))

BADGES = ("[![Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/"
          "github/tvlab-dev/tvlab/blob/main/source/basics.ipynb) [![Binder](https://mybinder.org/badge_logo.svg)]"
          "(https://mybinder.org/v2/gh/tvlab-dev/tvlab/HEAD?urlpath=lab/tree/source/basics.ipynb)")


def _self_study_source(tmp_path: Path) -> Path:
    """basics with badges, an ordinary cell with an output (a figure's stand-in), a stale output on a test
    cell, and a model answer to a question to explore."""
    nb = basics_notebook()
    nb.cells[0].source = "# Basics\n\n" + BADGES
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="imported\n")]
    nb.cells[1].execution_count = 1
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="total_sum = 5\n")]
    nb.cells[4].execution_count = 3
    nb.cells += [md("## Questions to explore\n\n1. Why can `add` not call `operator.add`?"),
                 reference_cell("1. Because the hidden test replaces operator.add by a function that raises.",
                                "markdown")]
    return _write(nb, tmp_path / "source" / "basics.ipynb")


def test_self_study_copy_folds_solutions_and_keeps_outputs(tmp_path):
    src = _self_study_source(tmp_path)
    [out] = course.release(src, tmp_path / "self-study", self_study=True)
    nb = nbformat.read(str(out), as_version=4)
    role = [c.metadata.get("tvlab_self_study") for c in nb.cells]
    assert role.count("exercise") == 2 and role.count("reference-solution") == 2 and role.count("model-answer") == 3
    # each exercise: stub, visible check(s), then its solution folded; a check cell left empty is dropped
    add = role.index("exercise")
    assert role[add:add + 3] == ["exercise", "check", "reference-solution"]
    assert "raise NotImplementedError()" in nb.cells[add].source and "total_sum" not in nb.cells[add].source
    assert nb.cells[add + 1].source.strip() == "assert add(2, 3) == 5"
    reveal = nb.cells[add + 2].source
    assert reveal.startswith("<details><summary>Reference solution (try first!)</summary>")
    assert "```python\ndef add(a, b):" in reveal and "    total_sum = a + b" in reveal and "BEGIN" not in reveal
    assert reveal.rstrip().endswith("</details>")
    mean = role.index("exercise", add + 1)
    assert role[mean:mean + 3] == ["exercise", "check", "reference-solution"]  # the hidden-only cell is gone
    assert "how_many" in nb.cells[mean + 2].source
    # model answers folded, not dropped
    answer = nb.cells[-1].source
    assert answer.startswith("<details><summary>Model answer</summary>") and "hidden test replaces" in answer
    # outputs: ordinary cells keep theirs, exercise cells lose them
    assert nb.cells[role.index(None, 2)].outputs[0]["text"] == "imported\n"
    for cell, r in zip(nb.cells, role):
        if r in ("exercise", "check"):
            assert cell.outputs == [] and cell.execution_count is None
        assert "nbgrader" not in cell.metadata and course.REFERENCE_TAG not in cell.metadata.get("tags", [])
    text = out.read_text()
    for secret in ("mock.patch", "add(-7, 7)", "mean([4])", "HIDDEN", "More tests run"):
        assert secret not in text, secret
    # the badges open the copy, and a note says what it is and how it is made
    assert "blob/main/course/self-study/basics.ipynb" in nb.cells[0].source
    assert "urlpath=lab/tree/course/self-study/basics.ipynb" in nb.cells[0].source
    assert role[1] == "note" and "--self-study" in nb.cells[1].source
    # deterministic: a second release writes the same bytes (the committed copies can be compared)
    [again] = course.release(src, tmp_path / "again", self_study=True)
    assert again.read_text() == text


def test_check_self_study_finds_leaks(tmp_path):
    src = nbformat.read(str(_self_study_source(tmp_path)), as_version=4)
    [out] = course.release(tmp_path / "source" / "basics.ipynb", tmp_path / "ss", self_study=True)
    good = nbformat.read(str(out), as_version=4)
    course.check_self_study(src, good)
    leaks = {"a solution line outside <details>": md("Hint: `    total_sum = a + b`\n    total_sum = a + b"),
             "a hidden test even inside <details>": md("<details><summary>x</summary>\n\n"
                                                       "assert add(-7, 7) == 0, \"add(-7, 7) should be 0\"\n</details>"),
             "a model answer outside <details>": md("1. Because the hidden test replaces operator.add by a "
                                                    "function that raises."),
             "a marker": code("### BEGIN SOLUTION\n### END SOLUTION")}
    for what, cell in leaks.items():
        bad = nbformat.read(str(out), as_version=4)
        bad.cells.append(cell)
        with pytest.raises(course.CourseError):
            course.check_self_study(src, bad)
            pytest.fail(f"not caught: {what}")
    bad = nbformat.read(str(out), as_version=4)
    stub = next(c for c in bad.cells if c.metadata.get("tvlab_self_study") == "exercise")
    stub.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x\n")]
    with pytest.raises(course.CourseError, match="exercise cell with outputs"):
        course.check_self_study(src, bad)


def test_cli_release_self_study(tmp_path, capsys):
    src = _self_study_source(tmp_path)
    assert course.main(["release", str(src.parent), "--self-study", "--out", str(tmp_path / "ss"),
                        "--badge-path", "study"]) == 0
    nb = nbformat.read(str(tmp_path / "ss" / "basics.ipynb"), as_version=4)
    assert "urlpath=lab/tree/study/basics.ipynb" in nb.cells[0].source
    assert any(c.metadata.get("tvlab_self_study") == "reference-solution" for c in nb.cells)
