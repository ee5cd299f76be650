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
