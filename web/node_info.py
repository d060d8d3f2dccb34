"""Reading a V1 node class: its inputs in widget order, and its ``/object_info`` entry.

The validator, the executor, the UI → API converter and the server all read node classes through this
module, so that each rule of ComfyUI's node protocol (``comfyui-protocol.md`` §3.1) lives in one place.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")  # primitives that get a widget in the editor
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a seed-control widget after these without being asked


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One declared input of a node class."""

    name: str
    section: str  # "required", "optional" or "hidden"
    type: str  # "INT", "IMAGE", ..., or "COMBO" for both combo forms
    options: dict[str, Any]
    choices: tuple | None  # the combo's allowed values, for both the legacy list and the "COMBO" form

    @property
    def is_widget(self) -> bool:
        """Whether the editor shows a widget (and so ``widgets_values`` holds a value) for this input."""
        if self.section == "hidden" or self.options.get("forceInput"):
            return False
        return self.type in WIDGET_TYPES or self.type == "COMBO"

    @property
    def extra_widget_values(self) -> int:
        """How many extra values the editor stores after this widget's own in ``widgets_values``."""
        if not self.is_widget:
            return 0
        control = self.options.get("control_after_generate")
        if control is None:
            control = self.type == "INT" and self.name in SEED_NAMES
        upload = self.type == "COMBO" and bool(self.options.get("image_upload"))
        return int(bool(control)) + int(upload)

    @property
    def is_lazy(self) -> bool:
        return bool(self.options.get("lazy"))

    @property
    def widget_default(self) -> Any:
        """The value the editor gives this widget when the workflow holds none: the declared ``default``, else a
        combo's first choice, else 0, ``""`` or false, as the frontend's widget constructors choose it.

        Example:
            >>> InputSpec("steps", "required", "INT", {"default": 20, "min": 1}, None).widget_default
            20
            >>> InputSpec("sampler", "required", "COMBO", {}, ("euler", "ddim")).widget_default
            'euler'
        """
        if self.options.get("default") is not None:
            return self.options["default"]
        if self.choices:
            return self.choices[0]
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)


def input_types(cls: type) -> dict[str, dict]:
    """Call ``cls.INPUT_TYPES()`` and check that it has the protocol's shape."""
    declared = cls.INPUT_TYPES()
    if not isinstance(declared, dict) or not set(declared) <= {"required", "optional", "hidden"}:
        raise TypeError(f"{cls.__name__}.INPUT_TYPES() must return a dict with keys among "
                        f"required/optional/hidden; got {declared!r}")
    return declared


def input_specs(cls: type, declared: dict[str, dict] | None = None) -> list[InputSpec]:
    """The inputs of ``cls`` in widget order: required, then optional, then hidden.

    Example:
        >>> class Node:
        ...     @classmethod
        ...     def INPUT_TYPES(cls):
        ...         return {"required": {"seed": ("INT", {"min": 0, "max": 9, "step": 1}), "mode": (["a", "b"],)}}
        >>> [(s.name, s.type, s.choices, s.extra_widget_values) for s in input_specs(Node)]
        [('seed', 'INT', None, 1), ('mode', 'COMBO', ('a', 'b'), 0)]
    """
    declared = input_types(cls) if declared is None else declared
    specs = []
    for section in ("required", "optional", "hidden"):
        for name, entry in (declared.get(section) or {}).items():
            if section == "hidden":  # hidden inputs map a name to a magic value, not to (TYPE, options)
                entry = (entry,) if isinstance(entry, str) else entry
            type_, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            choices = None
            if isinstance(type_, (list, tuple)):
                type_, choices = "COMBO", tuple(type_)
            elif type_ == "COMBO":
                choices = tuple(options.get("options", ()))
            specs.append(InputSpec(name, section, type_, options, choices))
    return specs


def object_info(name: str, cls: type, display_name: str | None, python_module: str) -> dict[str, Any]:
    """The ``/object_info`` entry of one V1 node class (``comfyui-protocol.md`` §4.4)."""
    declared = input_types(cls)
    return_types = tuple(cls.RETURN_TYPES)
    info = {
        "input": declared,
        "input_order": {section: list(inputs) for section, inputs in declared.items()},
        "output": return_types,
        "output_is_list": tuple(getattr(cls, "OUTPUT_IS_LIST", (False,) * len(return_types))),
        "output_name": tuple(getattr(cls, "RETURN_NAMES", return_types)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": python_module,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = tuple(cls.OUTPUT_TOOLTIPS)
    for flag in ("DEPRECATED", "EXPERIMENTAL", "API_NODE"):
        if getattr(cls, flag, False):
            info[flag.lower()] = True
    return info


def call_with_declared(function, values: dict[str, Any]) -> Any:
    """Call a node's ``IS_CHANGED``, ``VALIDATE_INPUTS`` or ``check_lazy_status`` the way ComfyUI does.

    The function's signature selects what it gets: each named parameter gets its value, and ``**kwargs``
    gets every value. Parameters with no value are left to their defaults.
    """
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function(**values)
    return function(**{name: value for name, value in values.items() if name in parameters})


def declared_parameters(function) -> set[str]:
    """The named parameters of ``function``; for ``VALIDATE_INPUTS`` these switch off built-in checks."""
    return {name for name, p in inspect.signature(function).parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def takes_any_keyword(function) -> bool:
    """Whether ``function`` has ``**kwargs``; a ``VALIDATE_INPUTS`` that has switches off every built-in check,
    as in ComfyUI (``execution.py``, ``validate_has_kwargs``)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
