"""Which host the pack runs in, ComfyUI's own modules when that host is ComfyUI, and what we read off its MODEL.

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
from typing import Any

import torch

from .denoiser import NoiseSchedule

# ComfyUI imports it (from main.py, through execution.py) before loading custom nodes.
HOST_MARKER_MODULE = "comfy.model_management"


def inside_comfyui() -> bool:
    """True when this process is ComfyUI, with the pack loaded as its custom nodes."""
    return HOST_MARKER_MODULE in sys.modules


# The key of Atelier's sampling patches among a ComfyUI MODEL's wrappers (nodes/sampling/patches.py)
SAMPLING_PATCH_KEY = "atelier_sampling_patch"


def has_sampling_patch(patcher: Any) -> bool:
    """Whether ComfyUI's MODEL carries an Atelier sampling patch (Faster Diffusion, ...)."""
    return any(key == SAMPLING_PATCH_KEY for wrappers in patcher.wrappers.values() for key in wrappers)


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


def comfy_noise_schedule(model: Any) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of ComfyUI's MODEL (a ``ModelPatcher``), read from its ``model_sampling``.

    ᾱ = 1/(1 + σ²) from the 1000 training sigmas ComfyUI keeps (float32, so ᾱ agrees with the float64 betas' to
    about 1e-7 relative); the prediction type from the sampling's class (EPS, V_PREDICTION, X0).

    Raises:
        ValueError: the model is not on a discrete timestep schedule (flow and EDM models, LCM's 50-step table).
    """
    model_sampling = model.get_model_object("model_sampling")
    sampling = comfy_module("comfy.model_sampling")
    if (not isinstance(model_sampling, sampling.ModelSamplingDiscrete)
            or model_sampling.sigmas.shape[0] != model_sampling.num_timesteps):
        raise ValueError("this needs a model on a discrete timestep schedule (SD1, SD2, SDXL); got one whose "
                         f"model_sampling is {type(model_sampling).__name__}")
    # V_PREDICTION and X0 derive from EPS, so they are asked first.
    prediction_types = ((sampling.V_PREDICTION, "v_prediction"), (sampling.X0, "sample"), (sampling.EPS, "epsilon"))
    prediction_type = next((name for cls, name in prediction_types if isinstance(model_sampling, cls)), None)
    if prediction_type is None:
        raise ValueError(f"this needs an epsilon, v or x0 prediction model; got model_sampling "
                         f"{type(model_sampling).__name__}")
    sigmas = model_sampling.sigmas.detach().to("cpu", torch.float64)
    return NoiseSchedule(1 / (1 + sigmas ** 2), prediction_type)


def comfy_model_family(model: Any) -> str:
    """Atelier's family name (``"sd1"``, ``"sd2"``, ``"sdxl"``) of ComfyUI's MODEL, from its model config's class.

    Raises:
        ValueError: a model of another family (SD3, Flux, ...).
    """
    config = model.model.model_config
    supported = comfy_module("comfy.supported_models")
    families = (((supported.SDXL, supported.SDXLRefiner), "sdxl"), (supported.SD20, "sd2"), (supported.SD15, "sd1"))
    family = next((name for classes, name in families if isinstance(config, classes)), None)
    if family is None:
        raise ValueError(f"this needs an SD1, SD2 or SDXL model; got a {type(config).__name__} model")
    return family
