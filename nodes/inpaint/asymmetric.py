"""Asymmetric VQGAN's decoder (Zhu et al. 2023, arXiv 2306.04632; ``techniques.md`` §4.12): the published decoders
see the masked original through a condition encoder and blend its features in before every up block and after the
last one, so the kept region comes out nearly unchanged. Loading is :func:`nodes.models.vae.load_asymmetric_vae`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.memory import MEMORY, runs_on


def asymmetric_decode(vae: Any, latent: torch.Tensor, image: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in 0..1 of raw latents (B, 4, h, w) by a diffusers ``AsymmetricAutoencoderKL``,
    conditioned on ``image`` (B or 1, 3, H, W) in 0..1 outside ``mask`` (B or 1, 1, H, W), 1 where the picture
    is generated, cut at 0.5 (the decoder was trained on hard masks; diffusers' pipeline binarizes them too);
    without them, the plain decode."""
    with torch.no_grad(), MEMORY.use_module(vae):
        device, dtype = runs_on(vae), vae.dtype
        conditioning = {}
        if image is not None and mask is not None:
            batch = latent.shape[0]
            conditioning = {"image": (image * 2 - 1).to(device, dtype).expand(batch, -1, -1, -1),
                            "mask": (mask >= 0.5).to(device, dtype).expand(batch, -1, -1, -1)}
        decoded = vae.decode(latent.to(device, dtype), **conditioning).sample
    return ((decoded.float() + 1) / 2).clamp(0, 1)
