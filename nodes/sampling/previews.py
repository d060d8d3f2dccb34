"""Cheap latent → RGB previews (a per-family linear map, no VAE) and the step callback that reports them.

The sampler loop calls ``on_step(done, total, x0)``; :func:`progress_reporter` is the callback a node passes: it
turns the x0 estimate into a small image and hands it to the progress hook, which also raises on an interrupt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ..common.progress import progress

# Least-squares linear maps from a latent's 4 channels (as the denoiser sees them, i.e. scaled by the VAE's
# scaling factor) to RGB in [-1, 1], rows = latent channels, columns = R, G, B.
# Source: ComfyUI comfy/latent_formats.py, SD15.latent_rgb_factors and SDXL.latent_rgb_factors(_bias); SD2 shares
# SD1's VAE and so its map.
_SD1_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)
LATENT_RGB_MAPS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd1": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sd2": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
}


def latent_to_rgb(latent: torch.Tensor, family: str) -> torch.Tensor:
    """A rough RGB picture of scaled latents through the family's linear map, at latent resolution.

    Args:
        latent: (B, 4, h, w), scaled as the denoiser sees them (an x0 estimate during sampling).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    Returns:
        (B, 3, h, w) in [0, 1], on the latent's device and in its dtype.
    Raises:
        ValueError: unknown family, or a latent that is not (B, 4, h, w).
    Example:
        >>> latent_to_rgb(torch.zeros(2, 4, 8, 8), "sd1").shape
        torch.Size([2, 3, 8, 8])
        >>> latent_to_rgb(torch.zeros(1, 4, 1, 1), "sd1").flatten().tolist()  # zero latent: mid grey
        [0.5, 0.5, 0.5]
    """
    if family not in LATENT_RGB_MAPS:
        raise ValueError(f"family must be one of {tuple(LATENT_RGB_MAPS)}; got {family!r}")
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"latent must have shape (B, 4, h, w); got {tuple(latent.shape)}")
    factors, bias = LATENT_RGB_MAPS[family]
    matrix = torch.tensor(factors, dtype=latent.dtype, device=latent.device)
    offset = torch.tensor(bias, dtype=latent.dtype, device=latent.device).reshape(1, 3, 1, 1)
    rgb = torch.einsum("bchw,cr->brhw", latent, matrix) + offset
    return ((rgb + 1) / 2).clamp(0, 1)


def preview_image(latent: torch.Tensor, family: str) -> Image.Image:
    """The first latent of a batch as a small RGB image (latent resolution), for the progress hook.

    Example:
        >>> preview_image(torch.zeros(1, 4, 8, 6), "sdxl").size
        (6, 8)
    """
    rgb = latent_to_rgb(latent[:1].detach().float(), family)[0]
    pixels = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)  # (h, w, 3) uint8 is RGB


def progress_reporter(family: str) -> Callable[[int, int, torch.Tensor], None]:
    """The ``on_step`` callback for :func:`~nodes.sampling.samplers.sample`: progress with a preview every step.

    Reporting goes through :func:`nodes.common.progress.progress`, which raises ``InterruptedByUser`` when the user
    stops the prompt; the exception leaves the sampling loop, so sampling stops within one step.

    Raises:
        ValueError: unknown family (checked now, not at the first step).
    """
    if family not in LATENT_RGB_MAPS:
        raise ValueError(f"family must be one of {tuple(LATENT_RGB_MAPS)}; got {family!r}")

    def report(done: int, total: int, x0: torch.Tensor) -> None:
        progress(done, total, preview_image(x0, family))

    return report
