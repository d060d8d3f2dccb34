"""The Preserve Unmasked node: an inpainted picture composited back onto its original outside the mask
(``interop.md``: IMAGE and MASK are plain tensors in both hosts). See :mod:`.preserve`."""

from __future__ import annotations

import torch

from ..common.images import to_channels_first, to_channels_last
from .preserve import DEFAULT_DILATE, DEFAULT_FEATHER, preserve_unmasked

CATEGORY = "atelier/inpaint"
MAX_DILATE, MAX_FEATHER = 256, 64.0


def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK, (H, W) or (B, H, W), as (B, 1, H, W)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be a MASK of shape (B, H, W) or (H, W); got {tuple(mask.shape)}")
    return mask[:, None].float()


class AtelierPreserveUnmasked:
    DESCRIPTION = ("Keeps the unmasked region exactly as it was after inpainting (Asymmetric VQGAN's aim, without "
                   "its weights): the decoded picture is used inside the mask, grown by 'dilate' pixels and "
                   "feathered, and the original everywhere else, so the VAE's round trip changes nothing outside.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded picture inside the feathered mask, the original outside it.",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "decoded": ("IMAGE", {"tooltip": "The inpainted picture, after VAE Decode."}),
            "original": ("IMAGE", {"tooltip": "The picture before inpainting (batch 1 or the decoded batch)."}),
            "mask": ("MASK", {"tooltip": "1 where the picture was generated, at the pictures' size."}),
            "dilate": ("INT", {"default": DEFAULT_DILATE, "min": 0, "max": MAX_DILATE, "step": 1,
                               "tooltip": "Grow the mask by this many pixels first (8: one latent pixel of SD's "
                                          "VAE, whose decode bleeds past the mask's edge)."}),
            "feather": ("FLOAT", {"default": DEFAULT_FEATHER, "min": 0.0, "max": MAX_FEATHER, "step": 0.5,
                                  "round": 0.01,
                                  "tooltip": "Blur of the grown mask's edge (Gaussian σ, pixels; 0: a hard edge). "
                                             "Pixels farther than dilate + 3·feather from the mask stay the "
                                             "original exactly."}),
        }}

    def composite(self, decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, dilate: int,
                  feather: float) -> tuple:
        result = preserve_unmasked(to_channels_first(decoded, "decoded"), to_channels_first(original, "original"),
                                   _mask_batch(mask).to(decoded.device), dilate, feather)
        return (to_channels_last(result),)


NODE_CLASS_MAPPINGS = {"AtelierPreserveUnmasked": AtelierPreserveUnmasked}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierPreserveUnmasked": "Preserve Unmasked"}
