"""Every task data file is well-formed, sourced and big enough."""

import json

import pytest

from tvlab.tasks import EXTRA_TASKS, PAPER_TASKS, data_dir, get_task, list_tasks

MIN_SIZE = {
    "fr_en": 200, "es_en": 200, "en_fr": 200, "en_es": 200,
    "present_simple_gerund": 200, "present_simple_past_simple": 200,
    "plural_singular": 150, "singular_plural": 150, "antonyms": 150,
    "country_capital": 195, "person_language": 150, "location_continent": 150, "location_religion": 100,
}
FILES = sorted(p for p in data_dir().glob("*.json"))


def test_every_file_task_exists():
    names = {p.stem for p in FILES}
    assert names == set(MIN_SIZE)
    assert names <= set(list_tasks())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_is_well_formed(path):
    spec = json.loads(path.read_text(encoding="utf-8"))
    assert spec["task"] == path.stem
    assert spec["category"] in PAPER_TASKS and (path.stem in PAPER_TASKS[spec["category"]] or EXTRA_TASKS.get(path.stem) == spec["category"])
    assert len(spec["source"]) > 20, "each file records where its facts come from"
    assert spec["description"]
    inputs = [p["input"] for p in spec["pairs"]]
    assert len(inputs) == len(set(inputs)), "duplicate inputs"
    assert len(inputs) >= MIN_SIZE[path.stem]
    for p in spec["pairs"]:
        assert set(p) <= {"input", "output", "accept"}
        for text in [p["input"], p["output"], *p.get("accept", [])]:
            assert text and text == text.strip() and "\n" not in text and "->" not in text, p
        assert p["output"] not in p.get("accept", []), p


def test_every_sovereign_state_has_a_capital():
    capitals = {p.input: p.output for p in get_task("country_capital").pairs}
    assert len(capitals) == 195  # 193 UN members + 2 observer states
    assert capitals["France"] == "Paris" and capitals["Japan"] == "Tokyo" and capitals["Kenya"] == "Nairobi"


def test_singular_plural_reverses_plural_singular():
    forward = {(p.input, p.output) for p in get_task("plural_singular").pairs}
    backward = {(p.output, p.input) for p in get_task("singular_plural").pairs}
    assert forward == backward
