"""Validating an API-format prompt before anything runs (``comfyui-protocol.md`` §5.2).

Errors come back in ComfyUI's shape, which the editor uses to highlight nodes:

- a whole-prompt ``error``: ``{type, message, details, extra_info}``;
- ``node_errors``: ``{node_id: {errors: [...], dependent_outputs: [...], class_type}}``.

Departures from upstream ComfyUI, each on purpose:

- Constants are cast strictly: ``3.7`` is not silently truncated to the INT ``3``, and ``"false"`` is the
  BOOLEAN ``False``.
- Combo membership is checked for the ``"COMBO"`` form too, not only for the legacy list form.
- ``"*"`` on either side of a link matches any type, as the editor draws it.
- A dependency cycle is reported before anything runs, as a ``dependency_cycle`` error on each node in it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from .node_info import InputSpec, call_with_declared, declared_parameters, input_specs, takes_any_keyword

MAX_LISTED_CHOICES = 20  # upstream echoes a combo's options only when there are this few


@dataclasses.dataclass
class ValidationResult:
    """What :func:`validate_prompt` found; ``prompt`` holds the constants cast to their declared types."""

    ok: bool
    error: dict[str, Any] | None
    node_errors: dict[str, dict[str, Any]]
    outputs: list[str]
    prompt: dict[str, dict[str, Any]]


def is_link(value: Any) -> bool:
    """Whether an input value is a link ``[source_node_id, output_index]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def types_match(received: Any, expected: Any) -> bool:
    """Whether an output of type ``received`` may feed an input of type ``expected``.

    Example:
        >>> types_match("IMAGE", "IMAGE"), types_match("INT,FLOAT", "FLOAT"), types_match("IMAGE", "MASK")
        (True, True, False)
    """
    if not received != expected:  # `!=`, not `==`: ComfyUI's AnyType overrides __ne__ to match everything
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    if "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def output_type(cls: type, slot: int) -> Any:
    """The type of output ``slot`` of ``cls``; a list in RETURN_TYPES is a combo value."""
    declared = cls.RETURN_TYPES[slot]
    return "COMBO" if isinstance(declared, (list, tuple)) else declared


def prompt_error(type_: str, message: str, details: str = "") -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": {}}


def validate_prompt(prompt: Any, node_classes: Mapping[str, type],
                    partial_targets: Iterable[str] | None = None) -> ValidationResult:
    """Check a whole API-format prompt against the node classes.

    Args:
        prompt: ``{node_id: {"class_type": str, "inputs": {name: value or [source_id, slot]}}}``.
        node_classes: node type name -> V1 node class.
        partial_targets: output node ids to run; None runs every output node.
    Returns:
        The result. ``ok`` is true when at least one output is valid; ``outputs`` lists the valid ones, and
        ``node_errors`` may still name nodes that only the invalid outputs need.
    """
    if not isinstance(prompt, dict) or not prompt:
        return _refused(prompt_error("invalid_prompt", "The prompt must be a non-empty object of nodes",
                                     f"got {type(prompt).__name__}"))
    missing_types = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _refused(prompt_error("invalid_prompt",
                                         "Cannot execute because a node is missing the class_type property.",
                                         f"Node ID '#{node_id}'"))
        if not isinstance(node["class_type"], str):
            return _refused(prompt_error("invalid_prompt", "A node's class_type must be a string",
                                         f"Node ID '#{node_id}': got {type(node['class_type']).__name__}"))
        if not isinstance(node.get("inputs", {}), dict):
            return _refused(prompt_error("invalid_prompt", "A node's inputs must be an object",
                                         f"Node ID '#{node_id}'"))
        if node["class_type"] not in node_classes:
            missing_types[node_id] = node["class_type"]

    prompt = {node_id: {**node, "inputs": dict(node.get("inputs", {}))} for node_id, node in prompt.items()}
    if missing_types:
        return _missing_node_types(prompt, missing_types, node_classes)
    outputs = [node_id for node_id, node in prompt.items()
               if getattr(node_classes[node["class_type"]], "OUTPUT_NODE", False)]
    if partial_targets is not None:
        targets = set(map(str, partial_targets))
        outputs = [node_id for node_id in outputs if node_id in targets]
    if not outputs:
        return _refused(prompt_error("prompt_no_outputs", "Prompt has no outputs"), prompt)

    upstream = {output: ancestors(prompt, output) for output in outputs}
    own_errors: dict[str, list[dict]] = {}
    for node_id in set().union(*upstream.values()):
        errors = _node_errors(prompt, node_id, node_classes)
        if errors:
            own_errors[node_id] = errors
    for node_id in _nodes_on_cycles(prompt, set().union(*upstream.values())):
        own_errors.setdefault(node_id, []).append({
            "type": "dependency_cycle", "message": "Node is part of a dependency cycle",
            "details": f"Node ID '#{node_id}' depends on its own output", "extra_info": {}})

    node_errors = {
        node_id: {"errors": errors, "class_type": prompt[node_id]["class_type"],
                  "dependent_outputs": [o for o in outputs if node_id in upstream[o]]}
        for node_id, errors in own_errors.items()
    }
    valid = [o for o in outputs if not upstream[o] & own_errors.keys()]
    if not valid:
        details = "\n".join(f"{prompt[n]['class_type']} {n}: {e['message']} ({e['details']})"
                            for n, entry in node_errors.items() for e in entry["errors"])
        return ValidationResult(False, prompt_error("prompt_outputs_failed_validation",
                                                    "Prompt outputs failed validation", details),
                                node_errors, [], prompt)
    return ValidationResult(True, None, node_errors, valid, prompt)


def _missing_node_types(prompt: dict, missing_types: dict[str, str], node_classes: Mapping[str, type]
                        ) -> ValidationResult:
    """Refuse a prompt with node types that are not installed, naming each such node as a node error (its id,
    type and title, in the ``missing_node_type`` shape of newer ComfyUI), so the editor marks every one."""
    outputs = [node_id for node_id, node in prompt.items()
               if node_id not in missing_types and getattr(node_classes[node["class_type"]], "OUTPUT_NODE", False)]
    upstream = {output: ancestors(prompt, output) for output in outputs}
    node_errors = {}
    for node_id, class_type in missing_types.items():
        meta = prompt[node_id].get("_meta")
        title = meta.get("title") if isinstance(meta, dict) and meta.get("title") else class_type
        error = {"type": "missing_node_type", "message": f"Node type {class_type!r} is not installed",
                 "details": f"Node ID '#{node_id}'",
                 "extra_info": {"node_id": node_id, "class_type": class_type, "node_title": title}}
        node_errors[node_id] = {"errors": [_jsonable(error)], "class_type": class_type,
                                "dependent_outputs": [o for o in outputs if node_id in upstream[o]]}
    types = sorted({str(class_type) for class_type in missing_types.values()})
    message = (f"Cannot execute because {len(missing_types)} node(s) have types that are not installed: "
               f"{', '.join(types)}")
    details = "\n".join(f"Node ID '#{node_id}': {class_type}" for node_id, class_type in missing_types.items())
    return ValidationResult(False, prompt_error("missing_node_type", message, details), node_errors, [], prompt)


def _refused(error: dict, prompt: Any = None) -> ValidationResult:
    return ValidationResult(False, error, {}, [], prompt if isinstance(prompt, dict) else {})


def _links(node: dict) -> list[tuple[str, list]]:
    return [(name, value) for name, value in node["inputs"].items() if is_link(value)]


def ancestors(prompt: dict, output: str) -> set[str]:
    """``output`` and every node it reaches through links, lazy ones included."""
    seen, todo = {output}, [output]
    while todo:
        for _, (source, _slot) in _links(prompt[todo.pop()]):
            if source in prompt and source not in seen:
                seen.add(source)
                todo.append(source)
    return seen


def _nodes_on_cycles(prompt: dict, nodes: set[str]) -> set[str]:
    """The nodes left after peeling off, from both ends, every node that cannot lie on a cycle (Kahn's way)."""
    sources = {n: {s for _, (s, _slot) in _links(prompt[n]) if s in nodes} for n in nodes}
    targets: dict[str, set[str]] = {n: set() for n in nodes}
    for node, node_sources in sources.items():
        for source in node_sources:
            targets[source].add(node)
    left = set(nodes)
    for incoming, outgoing in ((sources, targets), (targets, sources)):
        degree = {n: len(incoming[n] & left) for n in left}
        todo = [n for n, d in degree.items() if d == 0]
        while todo:
            node = todo.pop()
            left.discard(node)
            for other in outgoing[node] & left:
                degree[other] -= 1
                if degree[other] == 0:
                    todo.append(other)
    return left


def _node_errors(prompt: dict, node_id: str, node_classes: Mapping[str, type]) -> list[dict]:
    node = prompt[node_id]
    cls = node_classes[node["class_type"]]
    try:
        specs = [s for s in input_specs(cls) if s.section != "hidden"]
    except Exception as error:  # a broken INPUT_TYPES is that node's error, not the server's
        return [_exception_error(error, "")]
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    custom = declared_parameters(validate) if validate else set()
    checks_everything = bool(validate) and takes_any_keyword(validate)
    errors, received_types = [], {}

    for spec in specs:
        if spec.name not in node["inputs"]:
            if spec.section == "required":
                errors.append(_input_error("required_input_missing", "Required input is missing", spec,
                                           spec.name))
            continue
        value = node["inputs"][spec.name]
        if isinstance(value, list):
            error = _link_error(prompt, node_classes, spec, value, check_type="input_types" not in custom)
            if error:
                errors.append(error)
            else:
                received_types[spec.name] = output_type(node_classes[prompt[value[0]]["class_type"]], value[1])
            continue
        if isinstance(value, dict) and set(value) == {"__value__"}:  # how a literal list is sent
            value = value["__value__"]
        try:
            value = _cast(spec.type, value)
        except (TypeError, ValueError) as error:
            errors.append(_input_error("invalid_input_type",
                                       f"Failed to convert an input value to a {spec.type} value", spec,
                                       f"{spec.name}, {value!r}, {error}", received_value=value))
            continue
        node["inputs"][spec.name] = value
        if spec.name not in custom and not checks_everything:
            errors.extend(_range_errors(spec, value))

    if validate and not errors:
        values = {spec.name: (None if is_link(node["inputs"].get(spec.name)) else node["inputs"].get(spec.name))
                  for spec in specs if spec.name in node["inputs"]}
        if "input_types" in custom:
            values["input_types"] = received_types
        try:
            verdict = call_with_declared(validate, values)
        except Exception as error:
            errors.append(_exception_error(error, f"{node['class_type']}.VALIDATE_INPUTS"))
        else:
            if verdict is not True:
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": str(verdict), "extra_info": {}})
    return errors


def _link_error(prompt, node_classes, spec: InputSpec, value: list, check_type: bool) -> dict | None:
    if not is_link(value):
        return _input_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            spec, spec.name, received_value=value)
    source, slot = value
    if source not in prompt:
        return _input_error("bad_linked_input", f"Linked node '#{source}' does not exist", spec, spec.name,
                            received_value=value)
    source_cls = node_classes[prompt[source]["class_type"]]
    if not 0 <= slot < len(source_cls.RETURN_TYPES):
        return _input_error("bad_linked_input",
                            f"Linked node '#{source}' has outputs 0..{len(source_cls.RETURN_TYPES) - 1}; got {slot}",
                            spec, spec.name, received_value=value)
    received = output_type(source_cls, slot)
    if check_type and not types_match(received, spec.type):
        return _input_error("return_type_mismatch", "Return type mismatch between linked nodes", spec,
                            f"{spec.name}, received_type({received}) mismatch input_type({spec.type})",
                            received_type=received, linked_node=value)
    return None


def _cast(type_: str, value: Any) -> Any:
    """Cast a constant to its declared primitive type, refusing anything that would lose information."""
    if type_ == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        return int(value)
    if type_ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if type_ == "STRING":
        if not isinstance(value, (str, int, float)):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return str(value)
    if type_ == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    return value


def _range_errors(spec: InputSpec, value: Any) -> list[dict]:
    if spec.type in ("INT", "FLOAT"):
        low, high = spec.options.get("min"), spec.options.get("max")
        if low is not None and value < low:
            return [_input_error("value_smaller_than_min", f"Value {value} smaller than min of {low}", spec,
                                 spec.name, received_value=value)]
        if high is not None and value > high:
            return [_input_error("value_bigger_than_max", f"Value {value} bigger than max of {high}", spec,
                                 spec.name, received_value=value)]
    if spec.choices is not None and value not in spec.choices:
        listed = list(spec.choices) if len(spec.choices) <= MAX_LISTED_CHOICES else f"{len(spec.choices)} options"
        return [_input_error("value_not_in_list", "Value not in list", spec,
                             f"{spec.name}: {value!r} not in {listed}", received_value=value)]
    return []


def _input_error(type_: str, message: str, spec: InputSpec, details: str, **extra: Any) -> dict:
    extra_info = {"input_name": spec.name, "input_config": _jsonable(_config(spec)), **extra}
    return {"type": type_, "message": message, "details": details, "extra_info": _jsonable(extra_info)}


def _config(spec: InputSpec) -> list:
    return [list(spec.choices) if spec.choices is not None and spec.type == "COMBO" and "options" not in spec.options
            else spec.type, spec.options]


def _exception_error(error: Exception, where: str) -> dict:
    return {"type": "exception_during_validation", "message": f"Exception when validating node: {error}",
            "details": where,
            "extra_info": {"exception_type": type(error).__qualname__,
                           "traceback": traceback.format_exception(error),
                           "exception_message": str(error)}}


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into its ``repr``, so errors always serialise."""
    return json.loads(json.dumps(value, default=repr))
