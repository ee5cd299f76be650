"""Checks of user input shared by every layer of tvlab (it imports nothing from tvlab)."""

from __future__ import annotations

import operator


def whole_number(value) -> int | None:
    """``value`` as a Python int when it is a whole number: an int, a NumPy integer (``df.best_layer[0]``)
    or an integer 0-d tensor; None for anything else (a float, a bool, a string, a list)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # True is an int to Python, not a count
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def count(value, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int of at least ``minimum``, else a ValueError that names the argument
    (before any work starts: a negative count would slice from the end, zero would run nothing)."""
    number = whole_number(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return number


def counts(values, name: str, minimum: int = 1) -> list[int]:
    """One count or a list of them (``n_sets=4`` or ``n_sets=(1, 4)``) as a non-empty list of ints >= ``minimum``."""
    if whole_number(values) is not None:
        values = [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a whole number >= {minimum} or a list of them, got {values!r}.")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one whole number >= {minimum}.")
    return [count(v, name, minimum) for v in values]


def text(value, name: str, what: str = "") -> str:
    """``value`` when it is a non-empty string, else a ValueError that names the argument (``what`` says what it is for)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string{f' ({what})' if what else ''}, got {value!r}.")
    return value


def as_list(values, name: str) -> list:
    """One item or a list of them as a non-empty list: ``formats="qa"`` is ``["qa"]``, not its letters."""
    values = [values] if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") else list(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one.")
    return values


def file_to_write(path, what: str):
    """``path`` as a Path where a file can be written, else a ValueError before anything is computed or lost:
    a folder is not a file name."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder: give the file to write {what} to, e.g. "
                         f"{str(path / 'vectors.safetensors')!r}.")
    return path
