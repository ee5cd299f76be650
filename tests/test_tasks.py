import json

import pytest

import tvlab
from tvlab.tasks import Pair, Task, TaskError


def test_eighteen_paper_tasks_in_four_categories():
    paper = tvlab.list_tasks(include_extra=False)
    assert len(paper) == 18 and len(set(paper)) == 18
    assert {tvlab.get_task(t).category for t in paper} == set(tvlab.CATEGORIES)
    assert "singular_plural" in tvlab.list_tasks()


@pytest.mark.parametrize("name", tvlab.list_tasks())
def test_every_task_loads_with_enough_pairs(name):
    task = tvlab.get_task(name)
    assert task.name == name and len(task) >= 40


def test_generated_tasks_are_right():
    assert Pair("a", "b") in tvlab.get_task("next_letter").pairs
    assert Pair("B", "A") in tvlab.get_task("prev_letter").pairs
    first = tvlab.get_task("list_first").pairs[0]
    assert first.output == first.input.split(", ")[0]
    last = tvlab.get_task("list_last").pairs[3]
    assert last.output == last.input.split(", ")[-1] and 2 <= len(last.input.split(", ")) <= 4
    assert all(p.output == p.input.upper() for p in tvlab.get_task("to_upper").pairs)


def test_exact_and_prefix_scoring():
    exact = tvlab.get_task("antonyms")
    pair = Pair("big", "small", ("little",))
    assert exact.score(" small", pair) and exact.score("little", pair)
    assert not exact.score("smal", pair) and not exact.score("", pair)
    knowledge = tvlab.get_task("country_capital")
    assert knowledge.scoring == "prefix"
    buenos = Pair("Argentina", "Buenos Aires")
    assert knowledge.score(" Buenos", buenos) and not knowledge.score("Santiago", buenos)


def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match="Did you mean antonyms"):
        tvlab.get_task("antonym")


def test_user_task_from_json_and_csv(tmp_path):
    rows = [{"input": f"w{i}", "output": f"W{i}"} for i in range(12)]
    (tmp_path / "caps.json").write_text(json.dumps(rows))
    task = tvlab.get_task(str(tmp_path / "caps.json"))
    assert task.name == "caps" and task.category == "custom" and len(task) == 12
    (tmp_path / "caps.csv").write_text("input,output\n" + "\n".join(f"w{i},W{i}" for i in range(12)))
    assert tvlab.load_task(tmp_path / "caps.csv").pairs == task.pairs


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('[{"input": "a"}]', "needs both"),
    ('[{"input": "a", "output": ""}]', "the output is empty"),
    ("[]", "holds no pairs"),
    ("{}", "holds no pairs"),
    ('{"a": null}', "maps to an output string"),
])
def test_bad_user_task_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        tvlab.load_task(path)


def test_task_rejects_conflicting_outputs_unless_allowed():
    pairs = (Pair("a", "b"), Pair("a", "c"))
    with pytest.raises(TaskError):
        Task("t", "custom", pairs)
    assert len(Task("t", "custom", pairs, allow_multiple_outputs=True)) == 2
