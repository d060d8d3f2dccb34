"""The T-Stitch node: the user's MODEL with a small model stitched in for the first steps, a MODEL → MODEL patch
that the user's own KSampler runs (``interop.md`` §4). See :mod:`.stitch`."""

from __future__ import annotations

import contextlib
from typing import Any

from ..common.comfy_host import comfy_noise_schedule
from ..models.refs import ModelRef
from ..sampling.patches import patch_model
from .stitch import DEFAULT_RATIO, TrajectoryStitch, check_stitchable, held

CATEGORY = "atelier/acceleration"
ADDITIONAL_MODELS_KEY = "atelier_tstitch"  # ComfyUI loads the small model with the sampled one under this key


def _describe_atelier(model: ModelRef) -> dict[str, Any]:
    config, schedule = model.model.unet.config, model.model.schedule
    return {"latent channels": config.in_channels, "output channels": config.out_channels,
            "cross-attention width": config.cross_attention_dim,
            "added embedding": (config.addition_embed_type, config.projection_class_embeddings_input_dim),
            "prediction type": schedule.prediction_type, "noise schedule": schedule.alphas_cumprod,
            "sampling": type(model.model_sampling_override).__name__ if model.model_sampling_override else "discrete"}


def _describe_comfy(patcher: Any) -> dict[str, Any]:
    config = patcher.model.model_config.unet_config
    schedule = comfy_noise_schedule(patcher)
    return {"latent channels": config.get("in_channels"), "output channels": config.get("out_channels"),
            "cross-attention width": config.get("context_dim"), "added embedding": config.get("adm_in_channels"),
            "prediction type": schedule.prediction_type, "noise schedule": schedule.alphas_cumprod.float(),
            "sampling": "discrete"}


def _atelier_network(small: ModelRef, large: ModelRef):
    if small.model is large.model and small.loras != large.loras:
        raise ValueError("small_model is the sampled checkpoint with other LoRAs: the two would switch one model's "
                         "LoRAs mid-step; load the small model from its own file")

    @contextlib.contextmanager
    def network():
        with small.in_use() as loaded:
            yield loaded.unet, loaded.unet.dtype

    return network


class AtelierTStitch:
    DESCRIPTION = ("T-Stitch: a copy of the model that lets a small model of the same family (same latents and text "
                   "encoder, e.g. a distilled SD1.5 such as BK-SDM) make the first steps, where the layout forms, "
                   "and the model itself the rest: faster, at a similar picture. Sample with your own KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the small model stitched in; the input models are unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The large model, which makes the later steps (and gives the picture its "
                                           "detail and style)."}),
            "small_model": ("MODEL", {"tooltip": "The small model for the early steps: same latent space, text "
                                                 "encoder width, prediction type and noise schedule."}),
            "ratio": ("FLOAT", {"default": DEFAULT_RATIO, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                                "tooltip": "Fraction of the steps, from the first, that the small model makes (the "
                                           "paper's 0.4; 0: the large model alone, 1: the small alone)."}),
        }}

    def patch(self, model, small_model, ratio: float) -> tuple:
        if isinstance(model, ModelRef) != isinstance(small_model, ModelRef):
            raise TypeError("model and small_model must both be Atelier's or both ComfyUI's MODEL")
        if isinstance(model, ModelRef):
            check_stitchable(_describe_atelier(small_model), _describe_atelier(model))
            return (patch_model(model, TrajectoryStitch(_atelier_network(small_model, model), ratio)),)
        check_stitchable(_describe_comfy(small_model), _describe_comfy(model))
        base = small_model.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        patched = patch_model(model, TrajectoryStitch(lambda: held(base.diffusion_model, dtype), ratio))
        patched.set_additional_models(ADDITIONAL_MODELS_KEY, [small_model])
        return (patched,)


NODE_CLASS_MAPPINGS = {"AtelierTStitch": AtelierTStitch}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierTStitch": "T-Stitch"}
