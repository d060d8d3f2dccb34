"""Atelier's node pack: one subpackage per technique, shared code in ``common``.

Only relative imports live here: inside ComfyUI, ``import nodes`` is ComfyUI's own module.
"""

from .generation import nodes as generation

NODE_CLASS_MAPPINGS: dict[str, type] = {**generation.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {**generation.NODE_DISPLAY_NAME_MAPPINGS}
