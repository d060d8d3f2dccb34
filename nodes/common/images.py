"""ComfyUI's IMAGE layout and the one the maths uses: (B, H, W, C) on the sockets, (B, C, H, W) for torch ops.

Example:
    >>> image = torch.rand(2, 16, 24, 3)
    >>> to_channels_first(image).shape, torch.equal(to_channels_last(to_channels_first(image)), image)
    (torch.Size([2, 3, 16, 24]), True)
"""

from __future__ import annotations

import torch


def to_channels_first(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """An IMAGE (B, H, W, C) as a view (B, C, H, W); writing to the view writes the IMAGE.

    Raises:
        ValueError: not a 4-D tensor with 1 to 4 channels last.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not 1 <= image.shape[-1] <= 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be an IMAGE of shape (B, H, W, C); got {shape}")
    return image.permute(0, 3, 1, 2)


def to_channels_last(image: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) as a contiguous IMAGE (B, H, W, C)."""
    if image.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(image.shape)}")
    return image.permute(0, 2, 3, 1).contiguous()


def single_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """An IMAGE of one RGB image (1, H, W, 3) as a view (1, 3, H, W); a clear error naming the input otherwise."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be one RGB image of shape (1, H, W, 3); got {tuple(image.shape)}")
    return to_channels_first(image, name)


def mask_batch(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A MASK, (H, W) or (B, H, W), as (B, 1, H, W) in float; a clear error naming the input otherwise."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a MASK of shape (B, H, W) or (H, W); got {tuple(mask.shape)}")
    return mask[:, None].float()
