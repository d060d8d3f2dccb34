"""Every node class the standalone app offers: ComfyUI-compatible built-ins, then Atelier's own pack."""

from __future__ import annotations

import nodes

from .builtin_nodes import BUILTIN_DISPLAY_NAMES, builtin_nodes
from .folders import DataFolders


def node_classes(folders: DataFolders) -> dict[str, type]:
    """Node type name -> class, with the built-ins bound to ``folders``."""
    builtins = builtin_nodes(folders)
    clash = builtins.keys() & nodes.NODE_CLASS_MAPPINGS.keys()
    if clash:
        raise RuntimeError(f"Atelier nodes must not reuse ComfyUI core names; {sorted(clash)} do")
    return {**builtins, **nodes.NODE_CLASS_MAPPINGS}


def display_names() -> dict[str, str]:
    """Node type name -> the name the editor shows."""
    return {**BUILTIN_DISPLAY_NAMES, **nodes.NODE_DISPLAY_NAME_MAPPINGS}
