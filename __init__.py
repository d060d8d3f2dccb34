"""Atelier: Stable Diffusion research techniques as ComfyUI nodes.

ComfyUI imports this folder as a package from ``custom_nodes/`` and reads the three names below. The
standalone app (``python -m web``) does not import this file: it imports ``nodes`` and ``web`` directly.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
