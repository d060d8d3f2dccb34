"""Rectified Diffusion (Wang et al. 2024, "Rectified Diffusion: Straightness is Not Your Need in Rectified Flow"):
SD1.5 and SDXL UNets retrained on the model's own noise–sample pairs, sampled by first-order DDIM in few steps.

The authors publish four UNet state dicts (huggingface.co/wangfuyun/Rectified-Diffusion, ``weights/``): ``rd``,
``cm`` (its consistency-distilled variant) and ``phased`` for SD1.5, ``phasedxl`` for SDXL. Their evaluation script
(G-U-N/Rectified-Diffusion, ``generate_5k.py``) loads each into the base pipeline's UNet and samples with diffusers'
``DDIMScheduler`` on trailing timesteps, η 0 (the pipeline's default), ``set_alpha_to_one`` false:

========== ======================================= ============================ =====================
weights    betas (0.00085 to 0.012)                steps evaluated (FID, COCO)   guidance (diffusers')
========== ======================================= ============================ =====================
rd         ``linear`` (β spaced linearly)           1, 2, 4, 8, 16, 25           1.5
cm         ``linear``                               1, 2                         1.0 (none)
phased     ``scaled_linear`` (SD's own)             4                            1.5
phasedxl   ``scaled_linear`` (SDXL's own)           4                            1.5
========== ======================================= ============================ =====================

``linear`` is not SD's training schedule: ``rd`` and ``cm`` were retrained on it, so the node makes the MODEL
sample on it (ComfyUI's "sqrt_linear"). Deterministic DDIM is ComfyUI's "ddim" sampler (Euler on the VE ODE) on
the trailing grid's sigmas. The phased models' sampler is the same DDIM: each of their four phases is one step.

Departures: the schedules end at σ = 0, as ComfyUI's do, where diffusers' last step stops at ᾱ_0 (σ ≈ 0.029 on
either betas), as for Hyper-SD (``hypersd.py``). The default step counts are our choice among the
evaluated ones: 2 for rd (FID 22.98, against 21.28 at 25) and cm (21.66), the 4 the phased models were trained for.
The files are torch pickles (``.ckpt``); Atelier reads ``.safetensors`` only, so they are converted once by the user
(README); their keys are diffusers' UNet names, which the loader checks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..common.comfy_host import comfy_module
from ..common.denoiser import NoiseSchedule
from ..sampling.model_sampling import beta_schedule_alphas_cumprod

LINEAR_BETAS = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}


@dataclasses.dataclass(frozen=True)
class RectifiedDiffusionPreset:
    """A published Rectified Diffusion UNet: its base family, its betas, and the authors' sampler settings."""

    family: str  # "sd1" or "sdxl"
    linear_betas: bool  # retrained on linear betas (else the base model's scaled-linear ones)
    steps: int
    cfg: float  # ComfyUI's guidance scale (1 = none)


RECTIFIED_DIFFUSION_PRESETS = {
    "rd": RectifiedDiffusionPreset("sd1", True, 2, 1.5),
    "cm": RectifiedDiffusionPreset("sd1", True, 2, 1.0),
    "phased": RectifiedDiffusionPreset("sd1", False, 4, 1.5),
    "phasedxl": RectifiedDiffusionPreset("sdxl", False, 4, 1.5),
}


def linear_beta_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    """The linear betas rd and cm were retrained on, as a training schedule (ᾱ in float64).

    Example:
        >>> sigmas = linear_beta_schedule().ve_sigmas()
        >>> round(float(sigmas[0]), 4), round(float(sigmas[-1]), 3)  # SD's own betas reach 14.615
        (0.0292, 25.146)
    """
    return NoiseSchedule(beta_schedule_alphas_cumprod(**LINEAR_BETAS), prediction_type)


def comfy_linear_beta_model(model: Any) -> Any:
    """ComfyUI's MODEL sampling on the linear betas: a ``model_sampling`` object patch of ComfyUI's discrete
    sampling with its own prediction type, its schedule registered as ComfyUI's "sqrt_linear" (β spaced linearly).
    Inside ComfyUI only."""
    sampling = comfy_module("comfy.model_sampling")
    current = model.get_model_object("model_sampling")
    prediction = next(cls for cls in (sampling.V_PREDICTION, sampling.EPS) if isinstance(current, cls))
    patched_sampling = _comfy_discrete_class(prediction)(None)
    patched_sampling._register_schedule(beta_schedule="sqrt_linear", linear_start=LINEAR_BETAS["beta_start"],
                                        linear_end=LINEAR_BETAS["beta_end"])
    patched = model.clone()
    patched.add_object_patch("model_sampling", patched_sampling)
    return patched


@functools.cache
def _comfy_discrete_class(prediction: type) -> type:
    sampling = comfy_module("comfy.model_sampling")
    return type(f"LinearBetas{prediction.__name__}", (sampling.ModelSamplingDiscrete, prediction), {})

