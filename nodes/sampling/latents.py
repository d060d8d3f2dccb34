"""Latent tensors: empty canvases, resizing, and the seeded starting noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
# A LATENT may carry the starting noise (B, C, h, w) under this key, which the sampler then uses instead of its
# seeded noise: the watermark injector (nodes.watermark) puts its marked noise there. Not a ComfyUI key.
INITIAL_NOISE_KEY = "initial_noise"


def latent_samples(latent: dict, name: str = "samples") -> torch.Tensor:
    """The samples (B, C, h, w) of a LATENT; a clear error naming the input when it is not one."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor) \
            or latent["samples"].ndim != 4:
        raise ValueError(f"{name} must be a LATENT with samples of shape (B, C, h, w)")
    return latent["samples"]


def empty_latent(batch_size: int, channels: int, height: int, width: int, downscale: int = 8) -> torch.Tensor:
    """Zeros of shape (batch_size, channels, height / downscale, width / downscale).

    Raises:
        ValueError: ``height`` or ``width`` not a positive multiple of ``downscale``.
    Example:
        >>> empty_latent(2, 4, 64, 96).shape
        torch.Size([2, 4, 8, 12])
    """
    for name, value in (("height", height), ("width", width)):
        if value < downscale or value % downscale:
            raise ValueError(f"{name} must be a positive multiple of {downscale}; got {value}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return torch.zeros(batch_size, channels, height // downscale, width // downscale)


def upscale_latent(samples: torch.Tensor, height: int, width: int, method: str) -> torch.Tensor:
    """Latents resized to (height, width) latent pixels.

    Example:
        >>> upscale_latent(torch.ones(1, 4, 8, 8), 16, 12, "bilinear").shape
        torch.Size([1, 4, 16, 12])
    """
    if samples.ndim != 4:
        raise ValueError(f"samples must have shape (B, C, h, w); got {tuple(samples.shape)}")
    if method not in LATENT_UPSCALE_METHODS:
        raise ValueError(f"method must be one of {LATENT_UPSCALE_METHODS}; got {method!r}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1; got {height}, {width}")
    antialias = method in ("bilinear", "bicubic")
    return F.interpolate(samples, size=(height, width), mode=method, antialias=antialias)


def seeded_noise(seed: int | torch.Generator, shape: tuple[int, ...], *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Generator]:
    """Gaussian noise from ``seed``, drawn on the CPU so a seed gives the same picture on every device, then moved
    to ``device``; and the generator that continues the same stream (for samplers that draw noise every step).

    ``seed`` may be a CPU generator already in use: the noise continues its stream.

    Example:
        >>> a, _ = seeded_noise(7, (1, 4, 2, 2))
        >>> b, generator = seeded_noise(7, (1, 4, 2, 2))
        >>> torch.equal(a, b), torch.equal(torch.randn(2, generator=generator), a.flatten()[:2])
        (True, False)
    """
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device), generator
