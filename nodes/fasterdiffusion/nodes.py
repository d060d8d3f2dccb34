"""The Faster Diffusion node: a MODEL → MODEL patch that the user's own KSampler runs (``interop.md`` §4).

Standalone the patch travels on Atelier's MODEL and the KSampler nodes' guider runs it; inside ComfyUI it is a pair
of wrappers on a clone of the user's MODEL. See :mod:`.propagation` for the algorithm, its sources and departures.
"""

from __future__ import annotations

from ..sampling.patches import patch_model
from .propagation import (DEFAULT_INTERVAL, DEFAULT_MAX_GROUP, DEFAULT_PARALLEL, KEY_MODES, NOISE_ALPHA, NOISE_TAU,
                          EncoderPropagation)

CATEGORY = "atelier/acceleration"
MAX_INTERVAL = 50
MAX_GROUP = 50


class AtelierFasterDiffusion:
    DESCRIPTION = ("Faster Diffusion: a copy of the model that runs the UNet's encoder only at key steps and reuses "
                   "its features in between, so most steps cost only the decoder (about 1.8x faster at DDIM 50 in "
                   "the paper). Sample with your own KSampler; DDIM (or Euler) at 50 steps is the paper's setting.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with encoder propagation; the input model is unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (an SD1, SD2 or SDXL UNet)."}),
            "key_steps": (list(KEY_MODES), {"default": "paper",
                                            "tooltip": "paper: the authors' non-uniform key steps (for 50 steps: 0, "
                                                       "1, 2, 3, 5, 10, 15, 25, 35; 75 and 100 have their own; other "
                                                       "counts scale the 50-step set). uniform: every interval-th "
                                                       "step."}),
            "interval": ("INT", {"default": DEFAULT_INTERVAL, "min": 1, "max": MAX_INTERVAL, "step": 1,
                                 "tooltip": "Uniform mode: the encoder runs every this many steps (the authors "
                                            "advise 4 for community checkpoints; 1 runs it every step)."}),
            "noise_alpha": ("FLOAT", {"default": NOISE_ALPHA, "min": 0.0, "max": 0.1, "step": 0.001, "round": 0.0001,
                                      "tooltip": "Prior noise injection: this much of the starting noise is added "
                                                 "back before each step below noise_tau, for texture detail (0: "
                                                 "off)."}),
            "noise_tau": ("INT", {"default": NOISE_TAU, "min": 0, "max": 1000, "step": 1,
                                  "tooltip": "Noise injection applies at timesteps below this (of 1000)."}),
            "parallel": ("BOOLEAN", {"default": DEFAULT_PARALLEL,
                                     "tooltip": "Decode a key step and the steps after it in one batch (the "
                                                "authors' way): faster, more memory, same picture. Under a "
                                                "ControlNet in ComfyUI the steps are decoded one by one."}),
            "max_group": ("INT", {"default": DEFAULT_MAX_GROUP, "min": 1, "max": MAX_GROUP, "step": 1,
                                  "tooltip": "Parallel mode: at most this many steps decoded in one batch."}),
        }}

    def patch(self, model, key_steps: str, interval: int, noise_alpha: float, noise_tau: int, parallel: bool,
              max_group: int) -> tuple:
        return (patch_model(model, EncoderPropagation(key_steps, interval, noise_alpha, noise_tau, parallel,
                                                      max_group)),)


NODE_CLASS_MAPPINGS = {"AtelierFasterDiffusion": AtelierFasterDiffusion}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierFasterDiffusion": "Faster Diffusion"}
