"""WS-PSNR and WS-SSIM: PSNR and SSIM of ERP images with each row weighted by the area it covers on the sphere.

Source: Sun, Lu, Yu, "Weighted-to-Spherically-Uniform Quality Evaluation for Omnidirectional Video" (IEEE SPL 2017)
for WS-PSNR; Zhou et al., "Weighted-to-Spherically-Uniform SSIM" (2018) for WS-SSIM. Weight
cos((j + ½ − H/2)·π/H), RGB, no border crop, as OmniSSR evaluates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Source: Wang et al., SSIM (2004): 11×11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(image: torch.Tensor, reference: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape != reference.shape:
        raise ValueError(f"image and reference must have the same shape (B, C, H, W); got {tuple(image.shape)} and "
                         f"{tuple(reference.shape)}")


def latitude_weights(height: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
                     ) -> torch.Tensor:
    """Area weight of each ERP row, cos((j + ½ − H/2)·π/H), shape (H, 1).

    Example:
        >>> latitude_weights(4).squeeze(1)
        tensor([0.3827, 0.9239, 0.9239, 0.3827], dtype=torch.float64)
    """
    rows = torch.arange(height, dtype=dtype, device=device)
    return torch.cos((rows + 0.5 - height / 2) * math.pi / height)[:, None]


def ws_psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """WS-PSNR in dB per image.

    Args:
        image, reference: (B, C, H, W) ERP images with values in [0, data_range].
        data_range: the peak value.
    Returns:
        (B,) WS-PSNR; +inf for identical images.
    Raises:
        ValueError: shapes differ or are not 4-D.
    Example:
        >>> x = torch.zeros(1, 3, 4, 8)
        >>> round(ws_psnr(x + 0.1, x).item(), 3)
        20.0
    """
    _check_pair(image, reference)
    weight = latitude_weights(image.shape[-2], image.dtype, image.device)
    error = ((image - reference) ** 2 * weight).sum((1, 2, 3)) / (weight.sum() * image.shape[1] * image.shape[-1])
    return 10 * torch.log10(data_range ** 2 / error)


def ws_ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """WS-SSIM per image: the SSIM map (Gaussian window, valid region) averaged with latitude weights.

    Args:
        image, reference: (B, C, H, W) ERP images, H and W at least 11, values in [0, data_range].
        data_range: the peak value.
    Returns:
        (B,) WS-SSIM in [-1, 1]; 1 for identical images.
    Raises:
        ValueError: shapes differ, are not 4-D or smaller than the window.
    Example:
        >>> x = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(0))
        >>> round(ws_ssim(x, x).item(), 4)
        1.0
    """
    _check_pair(image, reference)
    if min(image.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"image must be at least {SSIM_WINDOW}×{SSIM_WINDOW} for WS-SSIM; got "
                         f"{tuple(image.shape[-2:])}")
    channels = image.shape[1]
    taps = torch.arange(SSIM_WINDOW, dtype=image.dtype, device=image.device) - SSIM_WINDOW // 2
    kernel = torch.exp(-taps ** 2 / (2 * SSIM_SIGMA ** 2))
    kernel = (kernel / kernel.sum()).outer(kernel / kernel.sum()).expand(channels, 1, -1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(image), blur(reference)
    var_x = blur(image * image) - mu_x ** 2
    var_y = blur(reference * reference) - mu_y ** 2
    cov = blur(image * reference) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    # the valid map's row r is centred on image row r + W//2
    weight = latitude_weights(image.shape[-2], image.dtype, image.device)[SSIM_WINDOW // 2:][:ssim.shape[-2]]
    return (ssim * weight).sum((1, 2, 3)) / (weight.sum() * channels * ssim.shape[-1])
