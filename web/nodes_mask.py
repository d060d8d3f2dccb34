"""ComfyUI's core mask nodes that workflows use to draw a mask without a painter, and to save one: SolidMask,
MaskComposite and MaskToImage, with ComfyUI's names, sockets and results (``comfy_extras/nodes_mask.py`` is the
reference read; the code is ours).

A MASK is (B, H, W) float in 0..1, as in ComfyUI.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from nodes.common.limits import MAX_RESOLUTION

from .limits import DEFAULT_LIMITS, Limits, check_pixel_budget

COMPOSITE_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")
DEFAULT_MASK_SIZE = 512


class SolidMask:
    limits: ClassVar[Limits] = DEFAULT_LIMITS
    DESCRIPTION = "Makes a mask of one value everywhere."
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("MASK",)
    OUTPUT_TOOLTIPS = ("The mask, batch 1.",)
    FUNCTION = "solid"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.001,
                                "tooltip": "The mask's value (1: selected)."}),
            "width": ("INT", {"default": DEFAULT_MASK_SIZE, "min": 1, "max": MAX_RESOLUTION, "step": 1,
                              "tooltip": "Width in pixels."}),
            "height": ("INT", {"default": DEFAULT_MASK_SIZE, "min": 1, "max": MAX_RESOLUTION, "step": 1,
                               "tooltip": "Height in pixels."}),
        }}

    def solid(self, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        check_pixel_budget("SolidMask", 1, height, width, self.limits)
        return (torch.full((1, height, width), float(value)),)


def composite_masks(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str) -> torch.Tensor:
    """``source`` combined into ``destination`` (each (B, H, W) or (H, W)) with its top-left corner at (x, y);
    what falls outside the destination is dropped; the result is clamped to 0..1. The logical operations round
    both masks to 0/1 first.

    Example:
        >>> composite_masks(torch.zeros(1, 4, 4), torch.ones(1, 2, 2), 3, 1, "add")[0]
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 1.],
                [0., 0., 0., 1.],
                [0., 0., 0., 0.]])
    """
    if operation not in COMPOSITE_OPERATIONS:
        raise ValueError(f"operation must be one of {COMPOSITE_OPERATIONS}; got {operation!r}")
    output = destination.reshape(-1, *destination.shape[-2:]).clone().float()
    source = source.reshape(-1, *source.shape[-2:]).float()
    bottom, right = min(y + source.shape[-2], output.shape[-2]), min(x + source.shape[-1], output.shape[-1])
    if bottom <= y or right <= x:
        return output.clamp(0, 1)
    target = output[:, y:bottom, x:right]
    placed = source[:, :bottom - y, :right - x]
    if operation == "multiply":
        combined = target * placed
    elif operation == "add":
        combined = target + placed
    elif operation == "subtract":
        combined = target - placed
    else:
        logical = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
        combined = logical(target.round().bool(), placed.round().bool()).float()
    output[:, y:bottom, x:right] = combined
    return output.clamp(0, 1)


class MaskComposite:
    DESCRIPTION = ("Combines a source mask into a destination mask at a position: multiply, add, subtract, or the "
                   "logical and, or, xor of the rounded masks; the result is clamped to 0..1.")
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("MASK",)
    OUTPUT_TOOLTIPS = ("The combined mask, the destination's size.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "destination": ("MASK", {"tooltip": "The mask to combine into."}),
            "source": ("MASK", {"tooltip": "The mask placed on it."}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1,
                          "tooltip": "The source's left edge, in pixels from the destination's."}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1,
                          "tooltip": "The source's top edge, in pixels from the destination's."}),
            "operation": (list(COMPOSITE_OPERATIONS), {"tooltip": "How the two combine where they overlap."}),
        }}

    def combine(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                operation: str) -> tuple[torch.Tensor]:
        return (composite_masks(destination, source, x, y, operation),)


class MaskToImage:
    DESCRIPTION = "Turns a mask into a grey image (the mask's value in each of R, G and B), to save or preview it."
    CATEGORY = "mask"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The mask as an image, the mask's size.",)
    FUNCTION = "mask_to_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"mask": ("MASK", {"tooltip": "The mask."})}}

    def mask_to_image(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (mask.reshape(-1, *mask.shape[-2:]).unsqueeze(-1).expand(-1, -1, -1, 3),)


NODE_CLASSES = (SolidMask, MaskComposite, MaskToImage)
DISPLAY_NAMES = {"SolidMask": "SolidMask", "MaskComposite": "MaskComposite", "MaskToImage": "Convert Mask to Image"}
