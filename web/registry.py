"""Every node class the standalone app offers: ComfyUI-compatible built-ins, then Atelier's own pack."""

from __future__ import annotations

import os

import nodes

from . import nodes_conditioning, nodes_latent, nodes_loaders, nodes_mask, nodes_sampling
from .builtin_nodes import BUILTIN_DISPLAY_NAMES, builtin_nodes
from .folders import DataFolders

# ComfyUI's core Stable Diffusion nodes, on Atelier's diffusers backbone (standalone only: ComfyUI has its own).
CORE_MODULES = (nodes_loaders, nodes_conditioning, nodes_latent, nodes_sampling, nodes_mask)


def _bind_models_dir(classes: dict[str, type], models_dir: str) -> dict[str, type]:
    return {name: type(name, (cls,), {"models_dir": models_dir}) if hasattr(cls, "models_dir") else cls
            for name, cls in classes.items()}


def node_classes(folders: DataFolders, models_dir: str) -> dict[str, type]:
    """Node type name -> class, with the built-ins bound to ``folders`` and every model loader to ``models_dir``
    (inside ComfyUI the pack's loaders use ComfyUI's own model folders instead)."""
    core = {**builtin_nodes(folders), **{cls.__name__: cls for module in CORE_MODULES for cls in module.NODE_CLASSES}}
    clash = core.keys() & nodes.NODE_CLASS_MAPPINGS.keys()
    if clash:
        raise RuntimeError(f"Atelier nodes must not reuse ComfyUI core names; {sorted(clash)} do")
    return _bind_models_dir({**core, **nodes.NODE_CLASS_MAPPINGS}, os.path.realpath(models_dir))


def display_names() -> dict[str, str]:
    """Node type name -> the name the editor shows."""
    core = {name: label for module in CORE_MODULES for name, label in module.DISPLAY_NAMES.items()}
    return {**BUILTIN_DISPLAY_NAMES, **core, **nodes.NODE_DISPLAY_NAME_MAPPINGS}
