"""InstaFlow and 2-Rectified Flow (Liu et al., "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation", ICLR 2024): SD1.5 UNets retrained as rectified flows, sampled by Euler on the flow.

The authors' ``RectifiedFlowPipeline`` (gnobitab/InstaFlow, ``code/pipeline_rf.py``) starts from unit noise and for
i < N tells the UNet t = (1 − i/N)·1000 and steps ``latents + (1/N)·v``, v the (guided) velocity toward the data;
guidance, when the scale is above 1, is v_neg + s·(v_text − v_neg). Here that is Euler (ComfyUI's "euler") on the
sigmas 1 − i/N, then 0, under :class:`~nodes.sampling.model_sampling.RectifiedFlowSampling` (t = 1000·σ,
x̂₀ = x + σ·v), exactly: Euler's step x + (σ_next − σ)·(x − x̂₀)/σ is x + (σ − σ_next)·v, and CFG on x̂₀ is CFG on v.

The published weights are diffusers folders (huggingface.co/XCLiu/instaflow_0_9B_from_sd_1_5 and
XCLiu/2_rectified_flow_from_sd_1_5): SD1.5's architecture and components, its UNet's weights retrained. Their
model cards' settings: InstaFlow-0.9B one step without guidance; 2-Rectified Flow 25 steps at guidance 1.5 (the
authors' example; 2 to 8 steps work, guidance best in [1, 2]).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from ..common.comfy_host import comfy_module


@dataclasses.dataclass(frozen=True)
class RectifiedFlowPreset:
    """A published rectified-flow model's sampler settings: Euler steps and ComfyUI's guidance scale (1 = none)."""

    steps: int
    cfg: float


RECTIFIED_FLOW_PRESETS = {
    "InstaFlow-0.9B": RectifiedFlowPreset(steps=1, cfg=1.0),
    "2-Rectified Flow": RectifiedFlowPreset(steps=25, cfg=1.5),
}


def rectified_flow_sigmas(steps: int) -> torch.Tensor:
    """(steps + 1,) float32: 1 − i/steps for i < steps, then 0 (the authors' t/1000).

    Example:
        >>> rectified_flow_sigmas(4).tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    return torch.cat([1.0 - torch.arange(steps, dtype=torch.float64) / steps, torch.zeros(1, dtype=torch.float64)]
                     ).float()


@functools.cache
def comfy_rectified_flow_class() -> type:
    """ComfyUI's flow sampling (``ModelSamplingDiscreteFlow`` with ``CONST``, shift 1, multiplier 1000) with the
    velocity's sign of InstaFlow's UNets: x̂₀ = x + σ·v. Inside ComfyUI only."""
    sampling = comfy_module("comfy.model_sampling")

    class RectifiedFlowVelocityToData(sampling.ModelSamplingDiscreteFlow, sampling.CONST):
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_input + model_output * sampling.reshape_sigma(sigma, model_output.ndim)

    return RectifiedFlowVelocityToData


def comfy_rectified_flow_model(model: Any) -> Any:
    """ComfyUI's MODEL with its ``model_sampling`` replaced by :func:`comfy_rectified_flow_class`'s (an object patch,
    as ComfyUI's ModelSamplingSD3 node makes)."""
    patched = model.clone()
    patched.add_object_patch("model_sampling", comfy_rectified_flow_class()(None))
    return patched
