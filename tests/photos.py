"""Natural test photos (scikit-image's), at the size the watermark issues set their targets at."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage import data

SIDE = 512  # natural test images, area-resized to the size the issue sets its PSNR target at


def natural(name: str) -> torch.Tensor:
    """A scikit-image photo, centre-cropped and area-resized to SIDE², as (1, 3, H, W) in [0, 1]."""
    rgb = getattr(data, name)()
    s = min(rgb.shape[:2])
    y0, x0 = (rgb.shape[0] - s) // 2, (rgb.shape[1] - s) // 2
    square = Image.fromarray(rgb[y0:y0 + s, x0:x0 + s]).resize((SIDE, SIDE), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)[None].float() / 255
