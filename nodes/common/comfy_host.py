"""Which host the pack runs in, and ComfyUI's own modules when that host is ComfyUI.

Inside ComfyUI, sockets carry ComfyUI's objects (``interop.md`` §2): a SAMPLER node must output a
``comfy.samplers.KSAMPLER``, and a MODEL arrives as a ``ModelPatcher``. Standalone there is no ``comfy`` package.
Technique modules never import ``comfy``; they ask :func:`comfy_module`, which looks in ``sys.modules`` instead of
trying the import: ComfyUI loads ``comfy.model_management`` before it loads any custom node, so its presence there
is the sign of the host, and a standalone process never searches ``sys.path`` for a ``comfy`` it does not have.

Example:
    >>> comfy_module("comfy.samplers") is None  # standalone, as in this doctest
    True
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# ComfyUI imports it (from main.py, through execution.py) before loading custom nodes.
HOST_MARKER_MODULE = "comfy.model_management"


def inside_comfyui() -> bool:
    """True when this process is ComfyUI, with the pack loaded as its custom nodes."""
    return HOST_MARKER_MODULE in sys.modules


def comfy_module(name: str) -> ModuleType | None:
    """ComfyUI's module ``name`` (``"comfy.samplers"``, ...) inside ComfyUI; None in the standalone app.

    Raises:
        ValueError: ``name`` is not a module of ComfyUI's ``comfy`` package.
    """
    if name != "comfy" and not name.startswith("comfy."):
        raise ValueError(f"name must be a module of ComfyUI's comfy package ('comfy.…'); got {name!r}")
    if not inside_comfyui():
        return None
    return importlib.import_module(name)
