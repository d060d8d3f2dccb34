"""KOALA (Lee et al. 2024, "KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for
Text-to-Image Synthesis", ETRI): SDXL's UNet distilled into smaller ones, and their samplers.

The published models (huggingface.co/etri-vilab/koala-700m, koala-1b, koala-lightning-700m, koala-lightning-1b) are
SDXL diffusers folders whose UNet keeps SDXL's widths, heads and conditioning but has one ResNet per encoder level
(two per decoder level) and fewer transformer blocks at the lowest resolution: 5 and no mid block (700M), 6 with a
mid block of 6 (1B). The shipped configs (``nodes/models/configs/koala_700m``, ``koala_1b``) are SDXL's with those
changes: they count 782,822,724 and 1,161,184,324 parameters, the published UNet files' sizes in float32 (3.13 and
4.64 GB) and ComfyUI's detection table (``KOALA_700M``, ``KOALA_1B``).

Sampler settings from the authors' README (youngwanLEE/sdxl-koala): the KOALA models 25 steps at guidance 7.5 on
the folder's own scheduler (we take SDXL's, Euler on diffusers' leading grid with offset 1: unverified, the folder's
scheduler config was not readable); the Lightning models Euler on trailing timesteps, 10 steps, guidance 3.5.

Departure (ComfyUI's convention, which SamplerCustom follows in both hosts): a run starting at the top of the
schedule starts from √(1 + σ²)·noise, else from σ·noise; diffusers' Euler starts from σ·noise on the trailing grid
(0.2 % apart at SDXL's σ_max 14.6) and from √(1 + σ²)·noise on the leading one (0.4 % apart at its first σ, that
of t = 961). The steps from there are diffusers' own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..common.comfy_host import comfy_module
from ..models.model_configs import SHIPPED_CONFIGS, UNET_VARIANTS
from ..models.refs import ModelRef
from ..sampling.ddim import leading_ddim_timesteps, trailing_timesteps

# What sets each UNet apart from SDXL's (diffusers' UNet2DConditionModel config keys).
KOALA_UNETS: dict[str, dict[str, Any]] = {
    "koala_700m": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5], "mid_block_type": None},
    "koala_1b": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 6],
                 "mid_block_type": "UNetMidBlock2DCrossAttn"},
}
KOALA_LABELS = UNET_VARIANTS["sdxl"]  # the shipped KOALA configs by the names messages give them
SDXL_STEPS_OFFSET = 1  # SDXL's scheduler config
SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


@dataclasses.dataclass(frozen=True)
class KoalaPreset:
    """A published KOALA model: its UNet and the sampler settings of its card."""

    unet: str  # a key of KOALA_UNETS
    steps: int
    cfg: float
    spacing: str  # diffusers' timestep_spacing of its Euler: "leading" or "trailing"


KOALA_PRESETS = {
    "KOALA-700M": KoalaPreset("koala_700m", 25, 7.5, "leading"),
    "KOALA-1B": KoalaPreset("koala_1b", 25, 7.5, "leading"),
    "KOALA-Lightning-700M": KoalaPreset("koala_700m", 10, 3.5, "trailing"),
    "KOALA-Lightning-1B": KoalaPreset("koala_1b", 10, 3.5, "trailing"),
}


def koala_config_dir(unet: str) -> str:
    """The shipped diffusers config folder of a KOALA UNet (``unet/config.json`` inside)."""
    return os.path.join(SHIPPED_CONFIGS, unet)


def koala_unet_of_config(config: Mapping[str, Any]) -> str | None:
    """Which KOALA UNet a diffusers UNet config describes (SDXL's layout, at any width, with KOALA's depths), or
    None."""
    if config.get("addition_embed_type") != "text_time" or list(config.get("down_block_types", ())) != SDXL_DOWN:
        return None
    for name, differences in KOALA_UNETS.items():
        if all(_same(config.get(key), value) for key, value in differences.items()):
            return name
    return None


def _same(found: Any, expected: Any) -> bool:
    return list(found) == expected if isinstance(expected, list) and found is not None else found == expected


def koala_unet_of_keys(keys: Iterable[str]) -> str | None:
    """Which KOALA UNet a diffusers-named UNet state dict holds, from its keys alone, or None.

    KOALA's encoder levels have one ResNet (no ``down_blocks.*.resnets.1``); the lowest level's first transformer
    has 5 blocks (700M, no ``mid_block``) or 6 (1B, with a mid block).
    """
    keys = set(keys)
    if any(key.startswith("down_blocks.0.resnets.1.") for key in keys) or "add_embedding.linear_1.weight" not in keys:
        return None
    prefix = "down_blocks.2.attentions.0.transformer_blocks."
    depth = len({key[len(prefix):].split(".")[0] for key in keys if key.startswith(prefix)})
    has_mid = any(key.startswith("mid_block.") for key in keys)
    return {(5, False): "koala_700m", (6, True): "koala_1b"}.get((depth, has_mid))


def koala_unet_of_model(model: Any) -> str | None:
    """Which KOALA UNet what arrived on a MODEL socket runs: Atelier's by its UNet config, ComfyUI's by the model
    config its detection chose (``KOALA_700M``, ``KOALA_1B``); None for any other UNet."""
    if isinstance(model, ModelRef):
        return koala_unet_of_config(dict(model.model.unet.config))
    supported = comfy_module("comfy.supported_models")
    if supported is None:
        raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")
    config = model.model.model_config
    classes = {"koala_700m": supported.KOALA_700M, "koala_1b": supported.KOALA_1B}
    return next((name for name, cls in classes.items() if isinstance(config, cls)), None)


def koala_timesteps(preset: KoalaPreset, steps: int, total: int = 1000) -> torch.Tensor:
    """The descending timesteps of the preset's Euler: diffusers' trailing grid, or its leading grid with SDXL's
    offset of 1."""
    if preset.spacing == "trailing":
        return trailing_timesteps(steps, total)
    return leading_ddim_timesteps(steps, total).flip(0) + SDXL_STEPS_OFFSET
