"""The Feature Inheritance node: a MODEL → MODEL patch that the user's own KSampler runs (``interop.md`` §4). See
:mod:`.inherit`; its settings are ours, the paper's being unpublished beyond its abstract."""

from __future__ import annotations

from ..sampling.patches import patch_model
from .inherit import (DEFAULT_FRONT, DEFAULT_GRANULARITY, DEFAULT_INTERVAL, DEFAULT_MIN_LEVEL, DEFAULT_MODE,
                      GRANULARITIES, MODES, FeatureInheritance)

CATEGORY = "atelier/acceleration"
MAX_INTERVAL, MAX_LEVEL = 50, 6


class AtelierFeatureInheritance:
    DESCRIPTION = ("Feature inheritance (A-SDM's idea; the settings are Atelier's): a copy of the model whose "
                   "low-resolution layers reuse, between full steps, what they computed at the last one, so those "
                   "steps cost less. Sample with your own KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with feature inheritance; the input model is unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (an SD1, SD2 or SDXL UNet)."}),
            "granularity": (list(GRANULARITIES), {"default": DEFAULT_GRANULARITY,
                                                  "tooltip": "layer: each ResNet and transformer layer reuses its "
                                                             "residual; unit: each attention and feed-forward unit "
                                                             "its output; unet: the whole network its prediction."}),
            "mode": (list(MODES), {"default": DEFAULT_MODE,
                                   "tooltip": "uniform: a full step every interval steps; front_dense: every step "
                                              "full in the first 'front' of the run, then every interval steps."}),
            "interval": ("INT", {"default": DEFAULT_INTERVAL, "min": 1, "max": MAX_INTERVAL, "step": 1,
                                 "tooltip": "A full step every this many steps (1: every step full, no change)."}),
            "front": ("FLOAT", {"default": DEFAULT_FRONT, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                                "tooltip": "front_dense: the fraction of the steps, from the first, that all run "
                                           "full."}),
            "min_level": ("INT", {"default": DEFAULT_MIN_LEVEL, "min": 0, "max": MAX_LEVEL, "step": 1,
                                  "tooltip": "Only layers whose maps are at least 2^min_level times smaller than the "
                                             "latent inherit (2: the two innermost levels of an SD UNet; 0: all)."}),
        }}

    def patch(self, model, granularity: str, mode: str, interval: int, front: float, min_level: int) -> tuple:
        return (patch_model(model, FeatureInheritance(granularity, mode, interval, front, min_level)),)


NODE_CLASS_MAPPINGS = {"AtelierFeatureInheritance": AtelierFeatureInheritance}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierFeatureInheritance": "Feature Inheritance"}
