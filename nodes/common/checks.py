"""Checks that ``VALIDATE_INPUTS`` methods share.

A node that names an input in ``VALIDATE_INPUTS`` switches off ComfyUI's own min/max and list checks for it (and
``**kwargs`` switches them off for every input), so it re-checks what it names with these.
"""

from __future__ import annotations

from collections.abc import Mapping


def range_errors(values: Mapping[str, float | None], limits: Mapping[str, tuple[float, float]]) -> list[str]:
    """Messages for the values outside their inclusive limits; a None value (a linked input) is not checked.

    Example:
        >>> range_errors({"steps": 0, "cfg": 7.0, "seed": None}, {"steps": (1, 100), "cfg": (0, 30), "seed": (0, 9)})
        ['steps must be in [1, 100]; got 0']
    """
    return [f"{name} must be in [{limits[name][0]}, {limits[name][1]}]; got {value}"
            for name, value in values.items()
            if value is not None and not limits[name][0] <= value <= limits[name][1]]
