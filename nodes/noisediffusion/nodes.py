"""The NoiseDiffusion node: two images in, the interpolation sequence out as one LATENT batch, on either host's
MODEL and VAE (``interop.md`` §3). See :mod:`.interpolate`."""

from __future__ import annotations

from typing import Any

import torch

from ..common.images import single_image
from ..common.limits import MAX_CFG, MAX_SEED
from ..models.comfy_adapters import denoiser_and_codec, model_family
from ..sampling.generate import with_image_size
from ..sampling.guidance import to_conditioning
from .interpolate import (DEFAULT_CFG, DEFAULT_CLIP, DEFAULT_DEPTH, DEFAULT_FRAMES, DEFAULT_GAMMA, DEFAULT_INJECT,
                          DEFAULT_STEPS, fractions_of, noisediffusion_interpolate)

CATEGORY = "atelier/creative"
MAX_FRAMES = 64
MAX_GRID_STEPS = 999  # LDM's grid starts at timestep 1: room for 999 steps of SD's 1000


class AtelierNoiseDiffusion:
    DESCRIPTION = ("NoiseDiffusion (Zheng et al., ICLR 2024): in-between images of two pictures. Both are inverted "
                   "part of the way into noise (DDIM, 140 of 250 steps), their noises mixed for each fraction with "
                   "a little of each clean image injected and extreme values clipped, and sampled back with the "
                   "prompt. Gives the whole sequence as one batch, A to B.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("The sequence, one latent per fraction (with the ends: A's reconstruction first, B's last); "
                       "decode with VAE Decode.",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model: SD1 or SD2 (epsilon or v), and SDXL in the "
                                           "standalone app."}),
            "vae": ("VAE", {"tooltip": "The model's VAE."}),
            "image_a": ("IMAGE", {"tooltip": "The first picture (one RGB image; its sides multiples of 8)."}),
            "image_b": ("IMAGE", {"tooltip": "The second picture, the same size."}),
            "positive": ("CONDITIONING", {"tooltip": "A prompt describing both pictures (inversion and sampling)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (sampling)."}),
            "frames": ("INT", {"default": DEFAULT_FRAMES, "min": 1, "max": MAX_FRAMES, "step": 1,
                               "tooltip": "In-between pictures, at fractions i/(frames+1) (the authors' 5: 0.17 ... "
                                          "0.83)."}),
            "include_ends": ("BOOLEAN", {"default": True,
                                         "tooltip": "Also the ends: A's and B's reconstruction (inverted and sampled "
                                                    "back unmixed, at guidance 1)."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 2, "max": MAX_GRID_STEPS, "step": 1,
                              "tooltip": "The DDIM grid (the authors': 250; fewer is faster and coarser)."}),
            "depth": ("FLOAT", {"default": DEFAULT_DEPTH, "min": 0.01, "max": 1.0, "step": 0.01, "round": 0.001,
                                "tooltip": "How far into the noise the pictures are inverted, as a fraction of the "
                                           "grid (the authors': 140 of 250 = 0.56)."}),
            "cfg": ("FLOAT", {"default": DEFAULT_CFG, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance when sampling back (the authors': 7.5)."}),
            "gamma": ("FLOAT", {"default": DEFAULT_GAMMA, "min": 0.0, "max": 0.99, "step": 0.01, "round": 0.001,
                                "tooltip": "Weight of fresh Gaussian noise in the mix (the authors' code: 0)."}),
            "clip": ("FLOAT", {"default": DEFAULT_CLIP, "min": 0.0, "max": 10.0, "step": 0.1, "round": 0.01,
                               "tooltip": "Clip the inverted and mixed latents to ±this (the authors': 2; 0: no "
                                          "clipping)."}),
            "inject": ("FLOAT", {"default": DEFAULT_INJECT, "min": 0.0, "max": 3.0, "step": 0.05, "round": 0.001,
                                 "tooltip": "μ + ν, the share of the clean pictures in the mix (the authors': 1.2; "
                                            "1 with gamma 0 injects nothing)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                             "tooltip": "Seed of the mixing noise (used with gamma above 0)."}),
        }}

    def interpolate(self, model: Any, vae: Any, image_a: torch.Tensor, image_b: torch.Tensor, positive: list,
                    negative: list, frames: int, include_ends: bool, steps: int, depth: float, cfg: float,
                    gamma: float, clip: float, inject: float, seed: int) -> tuple[dict]:
        pixels_a, pixels_b = single_image(image_a, "image_a"), single_image(image_b, "image_b")
        if pixels_a.shape != pixels_b.shape:
            raise ValueError(f"image_a and image_b must be the same size; got {tuple(pixels_a.shape[-2:])} and "
                             f"{tuple(pixels_b.shape[-2:])}")
        family, (height, width) = model_family(model), pixels_a.shape[-2:]
        positive, negative = (with_image_size(to_conditioning(conditioning, family, name), height, width)
                              for conditioning, name in ((positive, "positive"), (negative, "negative")))
        with denoiser_and_codec(model, vae) as (denoiser, codec):
            samples = noisediffusion_interpolate(denoiser, codec, pixels_a, pixels_b, positive, negative,
                                                 fractions_of(frames), torch.Generator().manual_seed(seed),
                                                 include_ends, steps, depth, cfg, gamma, clip or None, inject)
        return ({"samples": samples.cpu()},)


NODE_CLASS_MAPPINGS = {"AtelierNoiseDiffusion": AtelierNoiseDiffusion}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierNoiseDiffusion": "NoiseDiffusion Interpolate"}
