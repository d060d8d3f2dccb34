"""Hyper-SD (Ren et al. 2024, "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis"):
its published LoRAs and the sampler settings its model card gives each one.

ByteDance/Hyper-SD publishes one LoRA per step count, for SD1.5 and SDXL, named ``Hyper-SD15-…`` and
``Hyper-SDXL-…``. The card (huggingface.co/ByteDance/Hyper-SD, README) runs each with diffusers:

======================== ======================================== ===== =============================
file                     scheduler                                steps guidance (diffusers' scale)
======================== ======================================== ===== =============================
``…-1step-lora``         ``TCDScheduler``, eta 1.0 (the "unified"   1     0 (none)
                         LoRA: 1 to 8 steps, lower eta for detail)
``…-{2,4,8}steps-lora``  ``DDIMScheduler``, trailing spacing      N     0 (none)
``…-{8,12}steps-CFG-lora`` ``DDIMScheduler``, trailing spacing    N     5.0 (5 to 8; negative prompt)
======================== ======================================== ===== =============================

Here each becomes a ComfyUI SAMPLER and SIGMAS: deterministic DDIM is ComfyUI's "ddim" (Euler on the VE ODE)
on the trailing grid, TCD is :func:`~nodes.sampling.k_samplers.sample_tcd` on TCD's grid. diffusers' guidance
scale 0 ("no guidance") is ComfyUI's cfg 1, whose sampler then skips the negative prompt.

Departures: the schedules end at σ = 0, as ComfyUI's do; diffusers' last step with SD's scheduler configuration
(``set_alpha_to_one`` false) stops at ᾱ_0, leaving σ_min ≈ 0.029 of noise. For 12 steps diffusers' DDIM steps from
each timestep to t − ⌊1000/12⌋, one above the next grid timestep (83 is not 1000/12); ours steps to the next one.
The SDXL 1-step UNet (``Hyper-SDXL-1step-Unet.safetensors``) is not a LoRA: SDXL's whole UNet retrained, which the
card loads with a strict ``load_state_dict`` into SDXL's UNet and samples with ``LCMScheduler``, one step from the
given timestep 800, guidance 0. Here that is one step from that timestep's σ to 0 (ComfyUI's "lcm" sampler, whose one
step is the model's x̂₀: LCM's boundary terms at t = 800, c_skip = 0.25/(8000² + 0.25) ≈ 4e-9 and c_out ≈ 1 − 2e-9,
are left out), on the UNet loaded beside SDXL by Load Checkpoint + UNet File. The start departs as KOALA's does
(``koala.py``): SamplerCustom starts below the top of the schedule from σ·noise, diffusers' pipeline from unit
noise (2 % apart at t = 800).
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch
from safetensors import safe_open

from ..common.denoiser import NoiseSchedule
from ..sampling.ddim import trailing_timesteps
from ..sampling.schedules import tcd_timesteps, timestep_sigmas

AUTO_PRESET = "auto"
HYPER_SD_SAMPLERS = ("ddim", "tcd")
FAMILY_LABELS = {"sd1": "SD1.5", "sd2": "SD2", "sdxl": "SDXL"}
# The cross-attention width of a LoRA's to_k input tells the base model it was trained on.
PUBLISHED_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_label(family: str) -> str:
    """How messages name a model family: "SD1.5", "SDXL", …; a family without a label by its own name."""
    return FAMILY_LABELS.get(family, family)


@dataclasses.dataclass(frozen=True)
class HyperSDPreset:
    """The model card's inference settings for one Hyper-SD LoRA.

    Attributes:
        family: the base model's family, ``"sd1"`` or ``"sdxl"``.
        steps: the number of sampling steps.
        sampler: ``"ddim"`` (trailing grid) or ``"tcd"``.
        cfg: ComfyUI's guidance scale (1 = none: the card's guidance_scale 0).
        eta: TCD's γ (unused by ddim).
    """

    family: str
    steps: int
    sampler: str
    cfg: float
    eta: float = 0.0

    def describe(self, steps: int | None = None, eta: float | None = None) -> str:
        """The settings in words, with ``steps`` and ``eta`` where the user chose other ones."""
        eta = self.eta if eta is None else eta
        sampler = f"TCD (eta {eta:g})" if self.sampler == "tcd" else "DDIM, trailing timesteps"
        return f"{FAMILY_LABELS[self.family]}: {sampler}, {steps or self.steps} step(s), cfg {self.cfg:g}"


def _card_presets() -> dict[str, HyperSDPreset]:
    presets = {}
    for family, prefix in (("sd1", "Hyper-SD15"), ("sdxl", "Hyper-SDXL")):
        presets[f"{prefix}-1step-lora"] = HyperSDPreset(family, 1, "tcd", cfg=1.0, eta=1.0)
        for steps in (2, 4, 8):
            presets[f"{prefix}-{steps}steps-lora"] = HyperSDPreset(family, steps, "ddim", cfg=1.0)
        for steps in (8, 12):
            presets[f"{prefix}-{steps}steps-CFG-lora"] = HyperSDPreset(family, steps, "ddim", cfg=5.0)
    return presets


HYPER_SD_PRESETS = _card_presets()
HYPER_SDXL_UNET_TIMESTEP = 800  # the card's timesteps=[800] for Hyper-SDXL-1step-Unet


def preset_name_for_file(path: str) -> str:
    """The preset of a Hyper-SD LoRA file, from its name as published (any case; a suffix after it that starts
    with neither a letter nor a digit, such as a download's " (1)" or "_fp16", is allowed).

    Raises:
        ValueError: the name is none of the published ones.

    Example:
        >>> preset_name_for_file("loras/hyper-sd15-8steps-CFG-lora (1).safetensors")
        'Hyper-SD15-8steps-CFG-lora'
    """
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    matches = [name for name in HYPER_SD_PRESETS if re.match(re.escape(name.lower()) + r"(?![a-z0-9])", stem)]
    if not matches:
        raise ValueError(f"{os.path.basename(path)!r} is not named as a Hyper-SD LoRA is published "
                         f"({', '.join(HYPER_SD_PRESETS)}): choose its preset by hand, or keep the published name")
    return max(matches, key=len)


def lora_context_width(path: str) -> int | None:
    """The text-context width a LoRA file's cross-attention key projections take (768 SD1.5, 1024 SD2, 2048 SDXL),
    read from the file's header only; None when it adapts no cross-attention key projection.

    Handles the layouts the hosts read: kohya (``lora_unet_…attn2_to_k.lora_down.weight``), diffusers/PEFT
    (``….attn2.to_k.lora_A.weight``) and LDM-named kohya (``…_attn2_to_k.lora_down.weight``).
    """
    with safe_open(path, framework="pt") as file:
        for key in file.keys():
            flat = key.replace(".", "_")
            if "attn2_to_k" in flat and ("lora_down" in flat or "lora_A" in flat):
                return int(file.get_slice(key).get_shape()[-1])
    return None


def check_lora_family(path: str, preset_name: str, model_family: str) -> None:
    """Refuse a Hyper-SD LoRA the MODEL cannot take, naming the model it is for.

    Raises:
        ValueError: the preset is for another family than the MODEL's, or the file's cross-attention width is a
            published model's other than the preset's.
    """
    preset = HYPER_SD_PRESETS[preset_name]
    expected = FAMILY_LABELS[preset.family]
    if model_family != preset.family:
        other = next((name for name, other in HYPER_SD_PRESETS.items()
                      if other.family == model_family and name.split("-", 2)[2] == preset_name.split("-", 2)[2]),
                     None)
        hint = f": use {other}" if other else ""
        raise ValueError(f"{preset_name} is for {expected}-family models; this MODEL is "
                         f"{family_label(model_family)}{hint}")
    width = lora_context_width(path)
    found = PUBLISHED_CONTEXT_WIDTHS.get(width)
    if found is not None and found != preset.family:
        raise ValueError(f"{os.path.basename(path)!r} is a LoRA for {FAMILY_LABELS[found]} models (cross-attention "
                         f"width {width}), not the {expected} LoRA {preset_name} expects")


def hyper_sd_timesteps(sampler: str, steps: int, total: int = 1000) -> torch.Tensor:
    """The descending training timesteps a preset's sampler visits: the trailing grid for ddim, TCD's for tcd."""
    if sampler not in HYPER_SD_SAMPLERS:
        raise ValueError(f"sampler must be one of {HYPER_SD_SAMPLERS}; got {sampler!r}")
    return trailing_timesteps(steps, total) if sampler == "ddim" else tcd_timesteps(steps, total)


def hyper_sd_sigmas(schedule: NoiseSchedule, sampler: str, steps: int) -> torch.Tensor:
    """SIGMAS (steps + 1,) float32 for a preset's sampler on ``schedule``: the VE sigmas of its timesteps, then 0."""
    return timestep_sigmas(schedule, hyper_sd_timesteps(sampler, steps, schedule.num_train_timesteps))
