"""The DAG executor: runs a validated API-format prompt with ComfyUI's node semantics (``comfyui-protocol.md`` §5).

- Only what the output nodes need runs, in dependency order, depth first from each output.
- A lazy input is evaluated only when the node's ``check_lazy_status`` asks for it.
- Results are cached across prompts by input signature: the node's class, its constants, its ``IS_CHANGED``
  value and the signatures of the nodes it reads. After one widget change only that node and the nodes
  downstream of it run again.
- Events go to a listener as ``(event_type, data)``, with ComfyUI's websocket payloads. ``"preview"`` is ours:
  its data carries a PIL image, which the server frames as a binary message.
- A node that raises fails its own prompt only; an interrupt is honoured at the next progress call.

Departure: node expansion (``{"expand": ...}``) and ``ExecutionBlocker`` are not supported; a node that
returns an expansion fails with a message saying so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from nodes.common.progress import InterruptedByUser, use_sink

from .cache import DEFAULT_BUDGET_BYTES, CacheEntry, ResultCache
from .node_info import InputSpec, call_with_declared, input_specs
from .validation import ValidationResult, is_link, validate_prompt

logger = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]
HIDDEN_VALUES = ("PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG")


@dataclasses.dataclass
class ExecutionResult:
    """How a prompt ended: ``status`` is "success", "error" or "interrupted"."""

    status: str
    outputs: dict[str, dict[str, list]]  # node id -> UI output, cached nodes included
    messages: list[tuple[str, dict]]  # the lifecycle events, for the history entry
    executed: list[str]  # ids of the nodes that really ran


class Executor:
    """Validates and runs prompts against a set of node classes, keeping results between prompts.

    One thread runs prompts; :meth:`interrupt` may be called from any other thread.
    """

    def __init__(self, node_classes: Mapping[str, type], cache_budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.node_classes = dict(node_classes)
        self.cache = ResultCache(cache_budget_bytes)
        self._instances: dict[tuple[str, str], Any] = {}  # ComfyUI keeps one instance per node id
        self._interrupt = threading.Event()

    def validate(self, prompt: Any, partial_targets=None) -> ValidationResult:
        return validate_prompt(prompt, self.node_classes, partial_targets)

    def interrupt(self) -> None:
        """Stop the running prompt at its next progress call or node boundary."""
        self._interrupt.set()

    def free(self) -> None:
        """Drop every cached result and node instance."""
        self.cache.clear()
        self._instances.clear()

    def execute(self, prompt: dict, prompt_id: str, outputs: list[str], listener: Listener | None = None,
                extra_data: dict | None = None) -> ExecutionResult:
        """Run the ``outputs`` of a prompt that :meth:`validate` accepted (pass its ``prompt`` and ``outputs``)."""
        self._interrupt.clear()
        run = _PromptRun(self, prompt, prompt_id, extra_data or {}, listener or (lambda event, data: None))
        return run.execute(outputs)


class _PromptRun:
    """The state of one prompt's execution."""

    def __init__(self, executor: Executor, prompt: dict, prompt_id: str, extra_data: dict, listener: Listener):
        self.executor = executor
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.listener = listener
        self.values: dict[str, list[list[Any]]] = {}  # node id -> per-output lists of values
        self.ui: dict[str, dict[str, list]] = {}
        self.executed: list[str] = []
        self.messages: list[tuple[str, dict]] = []
        self.requested_lazy: dict[str, set[str]] = {}
        self.specs: dict[str, list[InputSpec]] = {}

    def emit(self, event: str, data: dict, record: bool = False) -> None:
        data = {**data, "prompt_id": self.prompt_id}
        if record:
            data["timestamp"] = int(time.time() * 1000)
            self.messages.append((event, data))
        self.listener(event, data)

    def execute(self, outputs: list[str]) -> ExecutionResult:
        self.emit("execution_start", {}, record=True)
        needed = self._needed(outputs)
        self.keys = self._signatures(needed)
        cached = [n for n in needed if self.keys[n] is not None and self.keys[n] in self.executor.cache]
        self.emit("execution_cached", {"nodes": cached}, record=True)
        node_id = None
        try:
            stack = list(reversed(outputs))
            while stack:
                node_id = stack[-1]
                if node_id in self.values:
                    stack.pop()
                    continue
                if self._load_cached(node_id):
                    stack.pop()
                    continue
                missing = self._missing_inputs(node_id)
                if not missing:
                    missing = self._requested_lazy_inputs(node_id)
                if missing:
                    stack.extend(missing)
                    continue
                self._run_node(node_id)
                stack.pop()
        except InterruptedByUser:
            self.emit("execution_interrupted", {"node_id": node_id, "node_type": self._class_type(node_id),
                                                "executed": list(self.executed)}, record=True)
            return self._result("interrupted")
        except Exception as error:
            self.emit("execution_error", self._error_data(node_id, error), record=True)
            logger.error("node %s (%s) failed: %s", node_id, self._class_type(node_id), error)
            return self._result("error")
        self.emit("execution_success", {}, record=True)
        return self._result("success")

    def _result(self, status: str) -> ExecutionResult:
        return ExecutionResult(status, dict(self.ui), self.messages, list(self.executed))

    def _class_type(self, node_id: str | None) -> str | None:
        return self.prompt[node_id]["class_type"] if node_id in self.prompt else None

    def _class(self, node_id: str) -> type:
        return self.executor.node_classes[self.prompt[node_id]["class_type"]]

    def _specs(self, node_id: str) -> list[InputSpec]:
        """The node's declared inputs; INPUT_TYPES may scan folders, so it is read once per class per prompt."""
        class_type = self.prompt[node_id]["class_type"]
        if class_type not in self.specs:
            self.specs[class_type] = input_specs(self._class(node_id))
        return self.specs[class_type]

    # --- what to run -------------------------------------------------------------------------------------------

    def _needed(self, outputs: list[str]) -> list[str]:
        """Every node the outputs may need, lazy links included, sources before the nodes that read them."""
        order, seen = [], set()
        for output in outputs:
            stack = [(output, False)]
            while stack:
                node_id, expanded = stack.pop()
                if expanded:
                    order.append(node_id)
                    continue
                if node_id in seen:
                    continue
                seen.add(node_id)
                stack.append((node_id, True))
                stack.extend((source, False) for source, _slot in self._links(node_id).values()
                             if source not in seen)
        return order

    def _links(self, node_id: str) -> dict[str, list]:
        return {name: value for name, value in self.prompt[node_id]["inputs"].items() if is_link(value)}

    def _signatures(self, order: list[str]) -> dict[str, str | None]:
        """Each node's cache key, or None when it must run every time (its or an ancestor's IS_CHANGED is NaN)."""
        keys: dict[str, str | None] = {}
        for node_id in order:
            cls = self._class(node_id)
            changed = self._is_changed(node_id, cls)
            inputs = self.prompt[node_id]["inputs"]
            if changed is None or any(keys[source] is None for source, _slot in self._links(node_id).values()):
                keys[node_id] = None
                continue
            hidden = {spec.type for spec in self._specs(node_id) if spec.section == "hidden"}
            record = [
                self.prompt[node_id]["class_type"],
                changed,
                node_id if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden else None,
                sorted((name, ["link", keys[value[0]], value[1]] if is_link(value) else ["value", value])
                       for name, value in inputs.items()),
            ]
            keys[node_id] = hashlib.sha256(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()
        return keys

    def _is_changed(self, node_id: str, cls: type) -> str | None:
        """``repr`` of the node's ``IS_CHANGED`` value; None for NaN or an error, which means "always run"."""
        function = getattr(cls, "IS_CHANGED", None)
        if function is None:
            return ""
        constants = {name: (None if is_link(value) else value)
                     for name, value in self.prompt[node_id]["inputs"].items()}
        try:
            value = call_with_declared(function, constants)
        except Exception as error:
            logger.warning("IS_CHANGED of node %s (%s) failed, so it runs every time: %s",
                           node_id, cls.__name__, error)
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        return repr(value)

    def _load_cached(self, node_id: str) -> bool:
        key = self.keys[node_id]
        entry = self.executor.cache.get(key) if key is not None else None
        if entry is None:
            return False
        self.values[node_id] = entry.outputs
        if entry.ui is not None:
            self.ui[node_id] = entry.ui
        if entry.ui is not None or getattr(self._class(node_id), "OUTPUT_NODE", False):
            self.emit("executed", {"node": node_id, "display_node": node_id, "output": entry.ui})
        return True

    def _missing_inputs(self, node_id: str) -> list[str]:
        """Sources of this node's strong and requested lazy links that have not produced values yet."""
        lazy = {spec.name for spec in self._specs(node_id) if spec.is_lazy}
        requested = self.requested_lazy.get(node_id, set())
        return [source for name, (source, _slot) in self._links(node_id).items()
                if (name not in lazy or name in requested) and source not in self.values]

    def _requested_lazy_inputs(self, node_id: str) -> list[str]:
        """Ask ``check_lazy_status`` which lazy inputs it needs now; returns the sources still to run."""
        cls = self._class(node_id)
        if not hasattr(cls, "check_lazy_status"):
            return []
        lazy = {spec.name for spec in self._specs(node_id) if spec.is_lazy}
        instance = self._instance(node_id)
        names: set[str] = set()
        for call in _calls(self._inputs(node_id), getattr(cls, "INPUT_IS_LIST", False)):
            names.update(call_with_declared(instance.check_lazy_status, call) or ())
        requested = self.requested_lazy.setdefault(node_id, set())
        links = self._links(node_id)
        new = {name for name in names if name in lazy and name in links and name not in requested}
        requested.update(new)
        return [links[name][0] for name in new if links[name][0] not in self.values]

    # --- running a node ----------------------------------------------------------------------------------------

    def _instance(self, node_id: str) -> Any:
        key = (node_id, self.prompt[node_id]["class_type"])
        if key not in self.executor._instances:
            self.executor._instances[key] = self._class(node_id)()
        return self.executor._instances[key]

    def _inputs(self, node_id: str) -> dict[str, list]:
        """The node's declared inputs as lists of values; unevaluated lazy links are ``[None]``."""
        inputs = self.prompt[node_id]["inputs"]
        values: dict[str, list] = {}
        for spec in self._specs(node_id):
            if spec.section == "hidden":
                values[spec.name] = [self._hidden_value(node_id, spec.type)]
            elif spec.name in inputs:
                value = inputs[spec.name]
                if is_link(value):
                    source, slot = value
                    values[spec.name] = self.values[source][slot] if source in self.values else [None]
                else:
                    if isinstance(value, dict) and set(value) == {"__value__"}:
                        value = value["__value__"]
                    values[spec.name] = [value]
        return values

    def _hidden_value(self, node_id: str, kind: str) -> Any:
        if kind not in HIDDEN_VALUES:
            raise ValueError(f"unknown hidden input {kind!r}; expected one of {HIDDEN_VALUES}")
        return {"PROMPT": self.prompt, "EXTRA_PNGINFO": self.extra_data.get("extra_pnginfo"),
                "UNIQUE_ID": node_id}.get(kind)  # DYNPROMPT and the comfy.org credentials are not ours to give

    def _run_node(self, node_id: str) -> None:
        if self.executor._interrupt.is_set():
            raise InterruptedByUser("interrupted by the user")
        cls = self._class(node_id)
        self.emit("executing", {"node": node_id, "display_node": node_id})
        instance = self._instance(node_id)
        function = getattr(instance, cls.FUNCTION)
        results = []
        with use_sink(_NodeSink(self, node_id)):
            for call in _calls(self._inputs(node_id), getattr(cls, "INPUT_IS_LIST", False)):
                result = function(**call)
                if inspect.isawaitable(result):
                    result = asyncio.run(_awaited(result))
                results.append(_normalise(result, cls))
        self.executed.append(node_id)

        output_is_list = getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * len(cls.RETURN_TYPES)
        outputs = [[item for values, _ in results for item in values[slot]] if output_is_list[slot]
                   else [values[slot] for values, _ in results]
                   for slot in range(len(cls.RETURN_TYPES))]
        ui = None
        for _, call_ui in results:
            if call_ui is not None:
                ui = ui or {}
                for key, value in call_ui.items():
                    ui.setdefault(key, []).extend(value)
        self.values[node_id] = outputs
        if ui is not None:
            self.ui[node_id] = ui
            self.emit("executed", {"node": node_id, "display_node": node_id, "output": ui})
        if self.keys[node_id] is not None:
            self.executor.cache.put(self.keys[node_id], CacheEntry(outputs, ui))

    def _error_data(self, node_id: str | None, error: Exception) -> dict:
        current = self._inputs_for_report(node_id) if node_id in self.prompt else {}
        kind = type(error)
        kind_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        return {
            "node_id": node_id, "node_type": self._class_type(node_id), "executed": list(self.executed),
            "exception_message": str(error), "exception_type": kind_name,
            "traceback": traceback.format_tb(error.__traceback__),
            "current_inputs": current, "current_outputs": list(self.values),
        }

    def _inputs_for_report(self, node_id: str) -> dict[str, list[str]]:
        try:
            inputs = self._inputs(node_id)
        except Exception:  # the report must not fail on the inputs that made the node fail
            return {}
        return {name: [_format(v) for v in values] for name, values in inputs.items()
                if name in self.prompt[node_id]["inputs"]}


class _NodeSink:
    """Turns a running node's progress calls into events."""

    def __init__(self, run: _PromptRun, node_id: str):
        self.run = run
        self.node_id = node_id

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.run.emit("progress", {"value": step, "max": total, "node": self.node_id})
        if preview is not None:
            self.run.emit("preview", {"node": self.node_id, "image": preview})

    def text(self, message: str) -> None:
        self.run.emit("progress_text", {"node": self.node_id, "text": message})

    def interrupted(self) -> bool:
        return self.run.executor._interrupt.is_set()


def _calls(inputs: dict[str, list], input_is_list: bool) -> list[dict[str, Any]]:
    """ComfyUI's list mapping: one call per element, shorter lists repeating their last element."""
    if input_is_list:
        return [inputs]
    if any(len(values) == 0 for values in inputs.values()):
        return []
    count = max((len(values) for values in inputs.values()), default=1)
    return [{name: values[min(i, len(values) - 1)] for name, values in inputs.items()} for i in range(count)]


async def _awaited(awaitable):
    return await awaitable


def _normalise(result: Any, cls: type) -> tuple[tuple, dict | None]:
    """A node's return value as ``(outputs, ui)``; refuses shapes that do not match RETURN_TYPES."""
    ui = None
    if isinstance(result, dict):
        if "expand" in result:
            raise NotImplementedError(f"{cls.__name__} returned a node expansion, which Atelier does not run yet")
        ui = result.get("ui")
        result = result.get("result", ())
    if result is None:
        result = ()
    if not isinstance(result, (tuple, list)) or len(result) != len(cls.RETURN_TYPES):
        raise TypeError(f"{cls.__name__}.{cls.FUNCTION} must return a tuple of {len(cls.RETURN_TYPES)} "
                        f"outputs ({', '.join(map(str, cls.RETURN_TYPES)) or 'none'}); got {type(result).__name__} "
                        f"of length {len(result) if hasattr(result, '__len__') else '?'}")
    if ui is not None and not (isinstance(ui, dict) and all(isinstance(v, list) for v in ui.values())):
        raise TypeError(f"{cls.__name__} returned a 'ui' whose values are not all lists: {ui!r}")
    return tuple(result), ui


def _format(value: Any) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{tuple(shape)}" if shape is not None else type(value).__name__
