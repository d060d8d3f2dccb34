"""Every node class the standalone app offers: ComfyUI-compatible built-ins, then Atelier's own pack."""

from __future__ import annotations

import os

import nodes

from .builtin_nodes import BUILTIN_DISPLAY_NAMES, builtin_nodes
from .folders import DataFolders


def node_classes(folders: DataFolders, models_dir: str) -> dict[str, type]:
    """Node type name -> class, with the built-ins bound to ``folders`` and the pack's model loaders to
    ``models_dir`` (inside ComfyUI they use ComfyUI's own model folders instead)."""
    builtins = builtin_nodes(folders)
    clash = builtins.keys() & nodes.NODE_CLASS_MAPPINGS.keys()
    if clash:
        raise RuntimeError(f"Atelier nodes must not reuse ComfyUI core names; {sorted(clash)} do")
    models_dir = os.path.realpath(models_dir)
    pack = {name: type(name, (cls,), {"models_dir": models_dir}) if hasattr(cls, "models_dir") else cls
            for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}
    return {**builtins, **pack}


def display_names() -> dict[str, str]:
    """Node type name -> the name the editor shows."""
    return {**BUILTIN_DISPLAY_NAMES, **nodes.NODE_DISPLAY_NAME_MAPPINGS}
