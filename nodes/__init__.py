"""Atelier's node pack: one subpackage per technique, shared code in ``common``.

Only relative imports live here: inside ComfyUI, ``import nodes`` is ComfyUI's own module.
"""

from .generation import nodes as generation_nodes
from .router import nodes as router_nodes

NODE_CLASS_MAPPINGS: dict[str, type] = {**generation_nodes.NODE_CLASS_MAPPINGS, **router_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {**generation_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                              **router_nodes.NODE_DISPLAY_NAME_MAPPINGS}
