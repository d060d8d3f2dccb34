"""Preserve the unmasked region (Asymmetric VQGAN's training-free part; Zhu et al. 2023, "Designing a Better
Asymmetric VQGAN for StableDiffusion", arXiv 2306.04632; ``techniques.md`` §4.12).

The VAE round trip of inpainting changes the pixels it should keep: the paper measures an error of 1082.8e-5 in the
unmasked region with SD's decoder (README, ImageNet 224), which its asymmetric decoder, conditioned on the masked
image, brings to 2.1e-5–5.7e-5. Without those weights the same aim is reached in pixels: the decoded picture is
composited onto the original through a feathered mask,

    out = m̃·decoded + (1 − m̃)·original,  m̃ = max(blur(dilate(mask, d), σ), mask),

so the region to generate is the decoded picture exactly (m̃ = 1 on it), every pixel farther than d + ⌈3σ⌉ from it
is the original exactly (the blur's kernel is finite), and the band between blends. The dilation covers the
decoder's bleed past the mask's edge; the blur hides the join. Dilation is square (max pooling), in pixels.
The defaults are ours (the paper has none): d = 8 (one latent pixel of SD's VAE) and σ = 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

DEFAULT_DILATE, DEFAULT_FEATHER = 8, 4.0


def feathered_mask(mask: torch.Tensor, dilate: int = DEFAULT_DILATE, feather: float = DEFAULT_FEATHER) -> torch.Tensor:
    """m̃ (B, 1, H, W) in 0..1 for a mask (B, 1, H, W) in 0..1 (1: generated): dilated by ``dilate`` pixels, blurred
    with a Gaussian of σ = ``feather`` pixels (kernel radius ⌈3σ⌉; 0: no blur), never below the mask itself.

    Example:
        >>> mask = torch.zeros(1, 1, 32, 32); mask[..., 12:20, 12:20] = 1
        >>> soft = feathered_mask(mask, dilate=2, feather=1.0)
        >>> bool(soft[..., 12:20, 12:20].eq(1).all()), float(soft[..., 0, 0]), bool(soft[..., 11, 15] > 0.9)
        (True, 0.0, True)
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W); got shape {tuple(mask.shape)}")
    if dilate < 0 or feather < 0:
        raise ValueError(f"dilate and feather must be >= 0; got {dilate} and {feather}")
    grown = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate) if dilate else mask
    if feather:
        radius = math.ceil(3 * feather)
        grown = gaussian_blur2d(grown, 2 * radius + 1, (feather, feather), border_type="replicate")
    return torch.maximum(grown, mask).clamp(0, 1)


def preserve_unmasked(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                      dilate: int = DEFAULT_DILATE, feather: float = DEFAULT_FEATHER) -> torch.Tensor:
    """The decoded images (B, C, H, W) inside the feathered mask and the originals (B or 1, C, H, W) outside it;
    ``mask`` (B or 1, 1, H, W), 1 where the picture was generated.

    Example:
        >>> original, decoded = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
        >>> mask = torch.zeros(1, 1, 16, 16); mask[..., :4, :4] = 1
        >>> out = preserve_unmasked(decoded, original, mask, dilate=1, feather=1.0)
        >>> float(out[..., :4, :4].min()), float(out[..., 10:, 10:].max())
        (1.0, 0.0)
    """
    if decoded.ndim != 4 or original.ndim != 4 or decoded.shape[1:] != original.shape[1:]:
        raise ValueError(f"decoded and original must be images (B, C, H, W) of one size; got shapes "
                         f"{tuple(decoded.shape)} and {tuple(original.shape)}")
    if mask.shape[-2:] != decoded.shape[-2:]:
        raise ValueError(f"the mask must have the images' size {tuple(decoded.shape[-2:])}; got "
                         f"{tuple(mask.shape[-2:])}")
    for name, batch in (("original", original.shape[0]), ("mask", mask.shape[0])):
        if batch not in (1, decoded.shape[0]):
            raise ValueError(f"{name} must have batch 1 or the decoded batch {decoded.shape[0]}; got {batch}")
    weight = feathered_mask(mask.to(decoded), dilate, feather)
    return torch.lerp(original.to(decoded).expand_as(decoded), decoded, weight.expand_as(decoded))
