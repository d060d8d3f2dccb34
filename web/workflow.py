"""Converting a UI-format workflow (what the editor saves) into an API-format prompt (what ``/prompt`` runs).

The editor converts its graph itself before it queues (``graphToPrompt``, ``comfyui-protocol.md`` §4.1); this
module does the same for workflows that arrive as files (§4.2), following the editor's rules:

- Muted nodes (mode 2) and bypassed nodes (mode 4) are left out. A link from a muted node is dropped; a link
  from a bypassed node is rewired to whatever feeds the bypassed node's input of the same type.
- Virtual nodes are left out too: a ``Reroute`` passes its one input through, a ``PrimitiveNode`` gives its
  value to every input it feeds, and notes are ignored.
- Widget values are matched to the class's widget inputs in declaration order, skipping the extra values the
  editor stores after some widgets (seed control, image upload). A linked input wins over its widget value.
  A widget with no saved value (``widgets_values`` short or absent, as in ComfyUI's own ``default.json``) takes
  the value the editor would give it: its declared default.

Departures from the editor, each on purpose:

- A dangling link and a subgraph each raise :class:`WorkflowError` instead of producing a prompt that would fail
  later with a vaguer message.
- A node whose class is not installed is kept with its linked inputs only (its widgets cannot be named), so that
  validation reports every such node, by id and type, at once.
- Widget values beyond the class's widgets are ignored: extensions may add widgets of their own in the
  browser, and their values mean nothing to the node's Python class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .node_info import InputSpec, input_specs

MUTED, BYPASSED = 2, 4  # litegraph's node modes NEVER and BYPASS
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE, "Note", "MarkdownNote"})  # the editor's own, with no Python class


class WorkflowError(ValueError):
    """A UI-format workflow that cannot be converted: malformed, or using something not supported yet."""


@dataclasses.dataclass(frozen=True)
class _Link:
    """The part of a saved link the conversion needs; its target is read from the target node's input."""

    id: int
    origin_id: str
    origin_slot: int
    type: str  # the type of the origin's output, as the editor saved it


def is_ui_workflow(data: Any) -> bool:
    """Whether ``data`` is a UI-format workflow (it has a ``nodes`` list) rather than an API-format prompt.

    Example:
        >>> is_ui_workflow({"version": 0.4, "nodes": [], "links": []})
        True
        >>> is_ui_workflow({"3": {"class_type": "KSampler", "inputs": {"seed": 5}}})
        False
    """
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def ui_to_api(workflow: dict, node_classes: Mapping[str, type]) -> dict[str, dict]:
    """Convert a UI-format workflow (version 0.4 or 1) into an API-format prompt.

    Args:
        workflow: the workflow as the editor saves it.
        node_classes: node type name -> V1 node class; each class's ``INPUT_TYPES`` gives the widget order.
    Returns:
        ``{node_id: {"class_type": str, "inputs": {name: value or [source_id, slot]}, "_meta": {"title": str}}}``,
        with node ids as strings and literal list values wrapped as ``{"__value__": [...]}``.
    Raises:
        WorkflowError: the workflow is malformed or contains a subgraph.
    """
    graph = _Graph(workflow)
    subgraphs = {definition.get("id"): definition.get("name")
                 for definition in (workflow.get("definitions") or {}).get("subgraphs", [])}
    prompt = {}
    for node_id, node in graph.nodes.items():
        class_type = node["type"]
        # A left-out node needs no class, so a muted node from a pack that is not installed does no harm.
        if node.get("mode") in (MUTED, BYPASSED) or class_type in VIRTUAL_TYPES:
            continue
        if class_type in subgraphs:
            raise WorkflowError(f"node {node_id} is an instance of subgraph {subgraphs[class_type]!r} "
                                f"({class_type}); subgraphs are not supported yet")
        specs = input_specs(node_classes[class_type]) if class_type in node_classes else []
        prompt[node_id] = {"class_type": class_type, "inputs": _node_inputs(graph, node_id, node, specs),
                           "_meta": {"title": node.get("title", class_type)}}
    return prompt


class _Graph:
    """A workflow's nodes by string id and its links by id, in either link format."""

    def __init__(self, workflow: Any) -> None:
        if not is_ui_workflow(workflow):
            got = "an object without one" if isinstance(workflow, dict) else type(workflow).__name__
            raise WorkflowError(f"a UI workflow must be an object with a 'nodes' list; got {got}")
        self.nodes: dict[str, dict] = {}
        for node in workflow["nodes"]:
            if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
                raise WorkflowError(f"each node must be an object with an 'id' and a string 'type'; got {node!r}")
            self.nodes[str(node["id"])] = node
        self.links: dict[int, _Link] = {}
        for entry in workflow.get("links") or []:
            link = _parse_link(entry)
            if link.origin_id not in self.nodes:
                raise WorkflowError(f"link {link.id} comes from node {link.origin_id}, which is not in the workflow")
            self.links[link.id] = link

    def link(self, link_id: Any, where: str) -> _Link:
        if isinstance(link_id, bool) or not isinstance(link_id, int) or link_id not in self.links:
            raise WorkflowError(f"{where} refers to link {link_id!r}, which is not in the workflow's links")
        return self.links[link_id]

    def source(self, link_id: Any, node_id: str, input_name: str) -> Any | None:
        """What link ``link_id`` into ``node_id`` carries: ``[source_id, slot]``, a constant, or None when dropped.

        Reroutes and bypassed nodes are walked through upstream until a real node or a PrimitiveNode.
        """
        link = self.link(link_id, f"node {node_id} input {input_name!r}")
        seen = set()
        while link.id not in seen:
            seen.add(link.id)
            origin = self.nodes[link.origin_id]
            if origin["type"] == PRIMITIVE:
                return _constant(_primitive_value(link.origin_id, origin))
            if origin["type"] == REROUTE:
                upstream = _reroute_link_id(origin)
            elif origin.get("mode") == MUTED:
                return None
            elif origin.get("mode") == BYPASSED:
                upstream = _bypass_link_id(origin, link)
            else:
                return [link.origin_id, link.origin_slot]
            if upstream is None:
                return None
            link = self.link(upstream, f"node {link.origin_id} ({origin['type']}), which feeds node {node_id},")
        raise WorkflowError(f"node {node_id} input {input_name!r} is fed by a loop of reroutes or bypassed nodes "
                            f"through link {link.id}")


def _parse_link(entry: Any) -> _Link:
    if isinstance(entry, list) and len(entry) == 6:  # version 0.4
        link_id, origin_id, origin_slot, _target_id, _target_slot, type_ = entry
    elif isinstance(entry, dict) and {"id", "origin_id", "origin_slot", "type"} <= entry.keys():  # version 1
        link_id, origin_id, origin_slot, type_ = entry["id"], entry["origin_id"], entry["origin_slot"], entry["type"]
    else:
        raise WorkflowError("each link must be [id, origin_id, origin_slot, target_id, target_slot, type] or "
                            f"an object with id, origin_id, origin_slot and type; got {entry!r}")
    return _Link(link_id, str(origin_id), origin_slot, type_)


def _node_inputs(graph: _Graph, node_id: str, node: dict, specs: list[InputSpec]) -> dict[str, Any]:
    """A real node's API inputs: its widget values, then every linked input socket on top of them.

    Linked sockets the class does not declare are kept, as the editor keeps them; the validator ignores them.
    """
    sockets = node.get("inputs") or []
    if not isinstance(sockets, list) or not all(isinstance(socket, dict) and isinstance(socket.get("name"), str)
                                                for socket in sockets):
        raise WorkflowError(f"node {node_id}: inputs must be a list of sockets with names; got {sockets!r:.80}")
    linked = {socket["name"]: socket["link"] for socket in sockets if socket.get("link") is not None}
    values = _widget_values(node_id, node, specs)
    inputs = {}
    for spec in specs:
        if spec.is_widget and spec.name not in linked:
            inputs[spec.name] = _constant(values[spec.name] if spec.name in values else spec.widget_default)
    for name, link_id in linked.items():
        value = graph.source(link_id, node_id, name)
        if value is not None:
            inputs[name] = value
    return inputs


def _widget_values(node_id: str, node: dict, specs: list[InputSpec]) -> dict[str, Any]:
    """The node's saved widget values by input name, from either the list or the dict form."""
    saved = node.get("widgets_values")
    if saved is None:  # the editor leaves it out, or writes null, for a node whose widgets were never set
        return {}
    if isinstance(saved, dict):
        return saved
    if not isinstance(saved, list):
        raise WorkflowError(f"node {node_id} widgets_values must be a list or an object; got {saved!r}")
    values, position = {}, 0
    for spec in specs:
        if spec.is_widget and position < len(saved):
            values[spec.name] = saved[position]
            position += 1 + spec.extra_widget_values
    return values


def _bypass_link_id(node: dict, link: _Link) -> Any | None:
    """The link into a bypassed ``node`` that replaces its output: the input at the output's index if that
    input's type matches, else the first input that does, as the editor rewires it."""
    sockets = node.get("inputs") or []
    for index in (link.origin_slot, *range(len(sockets))):
        if index < len(sockets) and sockets[index].get("type") == link.type:
            return sockets[index].get("link")
    return None


def _reroute_link_id(node: dict) -> Any | None:
    sockets = node.get("inputs") or []
    return sockets[0].get("link") if sockets else None


def _primitive_value(node_id: str, node: dict) -> Any:
    values = node.get("widgets_values")
    if not isinstance(values, list) or not values or values[0] is None:
        raise WorkflowError(f"PrimitiveNode {node_id} must hold its value in widgets_values[0]; got {values!r}")
    return values[0]


def _constant(value: Any) -> Any:
    """A widget value as the API prompt holds it: a bare list would read as a link, so lists are wrapped."""
    return {"__value__": value} if isinstance(value, list) else value
