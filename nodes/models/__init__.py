"""Models: offline loading of SD1, SD2 and SDXL checkpoints, family detection, LoRA hot-swap, the LDM exporter.

The engine lives in ``loading``, ``families``, ``lora`` and ``export``; this package exports no nodes of its own
yet. Importing it does not import diffusers: only ``loading`` does, and it sets ``HF_HUB_OFFLINE`` first.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
