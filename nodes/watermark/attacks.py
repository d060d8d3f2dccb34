"""Image attacks for checking a watermark inside a workflow: JPEG compression, as a photo-sharing site applies it."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image JPEG-encoded at ``quality`` (PIL, 4:2:0 chroma) and decoded again.

    Args:
        image: (B, H, W, 3) in [0, 1] (ComfyUI's IMAGE).
        quality: 1..95, PIL's scale (the attack suites use 50 and 25).
    Returns:
        (B, H, W, 3) in [0, 1], 8-bit levels.
    Example:
        >>> jpeg_compress(torch.rand(1, 16, 16, 3), 50).shape
        torch.Size([1, 16, 16, 3])
    """
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (B, H, W, 3); got {tuple(image.shape)}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in [1, 95]; got {quality}")
    out = []
    for picture in image:
        buffer = io.BytesIO()
        pixels = (picture.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).float() / 255)
    return torch.stack(out).to(image.dtype)
