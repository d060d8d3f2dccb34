"""JSON in and out of the server: strict reading of request bodies, and replies that browsers can always parse.

Every JSON body goes through :func:`read_json`, which refuses what would later break a reply or the server:
``NaN`` and ``Infinity`` (browsers' ``JSON.parse`` rejects them, so one stored value would break ``/history``
until it was cleared), integers beyond Python's 4,300 digits, nesting deeper than MAX_JSON_DEPTH, and bodies
over MAX_JSON_BYTES; each is a 4xx that says why, never a 500.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from aiohttp import web

# A prompt with its workflow is well under 1 MB; parsed JSON takes several times its size in memory.
MAX_JSON_BYTES = 32 << 20
MAX_JSON_DEPTH = 100  # an editor workflow nests about 10 deep; Python's JSON parser fails near 1,000


def json_error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error with a ``{"error": message}`` JSON body, for a handler's helpers to raise."""
    return status(text=json.dumps({"error": message}), content_type="application/json")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; accepted are finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ValueError(f"{text} is too large for a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > sys.get_int_max_str_digits():
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is too long; accepted are at most "
                         f"{sys.get_int_max_str_digits()} digits")
    return int(text)


def _nesting_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest deeper than ``limit``; iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: no ``NaN`` or ``Infinity`` (browsers cannot read them back), no number too large for a
    float, no integer of more than Python's 4,300 digits, and at most MAX_JSON_DEPTH levels of nesting.

    Raises:
        ValueError: the text breaks one of these rules or is not UTF-8 JSON; the message says which.
    Example:
        >>> parse_json('{"a": [1, 2.5]}')
        {'a': [1, 2.5]}
        >>> parse_json('{"a": NaN}')
        Traceback (most recent call last):
        ...
        ValueError: NaN is not a JSON number; accepted are finite numbers
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
    except RecursionError:
        raise ValueError(f"JSON nested too deep; accepted are at most {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"the body is not UTF-8: {error}") from None
    if isinstance(value, (dict, list)) and _nesting_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ValueError(f"JSON nested too deep; accepted are at most {MAX_JSON_DEPTH} levels")
    return value


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, parsed by :func:`parse_json`; any body it refuses is a 400 that says why, and a
    body over MAX_JSON_BYTES a 413, never a 500."""
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise json_error(web.HTTPRequestEntityTooLarge,
                         f"a JSON body may hold at most {MAX_JSON_BYTES} bytes; got {request.content_length}")
    data = await request.read()
    if len(data) > MAX_JSON_BYTES:
        raise json_error(web.HTTPRequestEntityTooLarge,
                         f"a JSON body may hold at most {MAX_JSON_BYTES} bytes; got {len(data)}")
    try:
        return parse_json(data)
    except ValueError as error:
        raise json_error(web.HTTPBadRequest, f"the body is not valid JSON: {error}") from None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def finite_json(value: Any) -> str:
    """``value`` as JSON that browsers can parse: a non-finite float (from a node's output) becomes ``null``,
    because JSON has no NaN and one would make the whole reply unreadable.

    Example:
        >>> finite_json({"score": float("nan"), "n": [1.5, float("inf")]})
        '{"score": null, "n": [1.5, null]}'
    """
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite_or_none(value), allow_nan=False)


def json_response(data: Any, status: int = 200) -> web.Response:
    """``web.json_response`` that never writes NaN or Infinity (:func:`finite_json`)."""
    return web.json_response(data, status=status, dumps=finite_json)
