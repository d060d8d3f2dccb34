"""Atelier's node pack: one subpackage per technique, shared code in ``common``.

Only relative imports live here: inside ComfyUI, ``import nodes`` is ComfyUI's own module.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
