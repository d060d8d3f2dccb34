"""Text-to-image and image-to-image sampling on a denoiser and its latent space.

This is the KSampler of the pack: seeded noise, classifier-free guidance in one batched call per step, a
sampler from :mod:`nodes.sampling`, and a preview through the progress hook every step. Latents come in and go
out unscaled, as ComfyUI keeps them in LATENT; the denoiser sees them scaled by the latent space's factor.
"""

from __future__ import annotations

import dataclasses

import torch

from ..common.denoiser import Conditioning, Denoiser, LatentSpace, guided_eps
from .previews import progress_reporter
from .samplers import STOCHASTIC_SAMPLERS, sample
from .latents import seeded_noise


def with_image_size(conditioning: Conditioning, height: int, width: int) -> Conditioning:
    """SDXL's time ids for an image of ``height`` × ``width``: original and target size, crop (0, 0)."""
    if conditioning.time_ids is None:
        return conditioning
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=conditioning.time_ids.dtype,
                            device=conditioning.time_ids.device).expand(conditioning.time_ids.shape[0], -1)
    return dataclasses.replace(conditioning, time_ids=time_ids)


def generate(denoiser: Denoiser, latent_space: LatentSpace, family: str, positive: Conditioning,
             negative: Conditioning, latent: torch.Tensor, seed: int, steps: int, cfg: float, sampler: str,
             scheduler: str, denoise: float = 1.0, momentum: float | None = None,
             initial_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample latents for ``positive`` against ``negative``.

    Args:
        denoiser: the model's denoiser.
        latent_space: its latents' layout and scaling (a :class:`LatentCodec`, the VAE, serves).
        family: "sd1", "sd2" or "sdxl" (previews and the F-scheduler depend on it).
        positive, negative: conditionings of batch 1 or the latent's batch.
        latent: unscaled latents (B, C, h, w) on the model's device: zeros for text-to-image, an encoded image
            for image-to-image.
        seed: the noise seed; the same seed and settings give bit-identical latents on one device.
        steps, cfg, sampler, scheduler, denoise, momentum: as :func:`nodes.sampling.samplers.sample` takes them;
            ``denoise`` 1 ignores ``latent``'s content (text-to-image), below 1 starts from it.
        initial_noise: the starting noise (unit variance, ``latent``'s shape) to use instead of the seeded one, as a
            watermarked latent carries it (LATENT key ``INITIAL_NOISE_KEY``); ``seed`` still seeds the per-step
            noise of stochastic samplers.
    Returns:
        Unscaled latents of ``latent``'s shape, on its device.
    """
    if latent.ndim != 4 or latent.shape[1] != latent_space.latent_channels:
        raise ValueError(f"latent must have shape (B, {latent_space.latent_channels}, h, w) for this model; "
                         f"got {tuple(latent.shape)}")
    device = latent.device
    height, width = latent.shape[-2] * latent_space.downscale, latent.shape[-1] * latent_space.downscale
    positive, negative = (with_image_size(c, height, width).to(device) for c in (positive, negative))
    scaled = (latent.float() - latent_space.shift_factor) * latent_space.scaling_factor
    # One stream: the step noise of stochastic samplers continues after the starting noise instead of repeating
    # it (two generators on one seed would make the first step's noise equal to x_T).
    noise, generator = seeded_noise(seed, tuple(latent.shape))
    if initial_noise is not None:
        if initial_noise.shape != latent.shape:
            raise ValueError(f"initial_noise must have the latent's shape {tuple(latent.shape)}; "
                             f"got {tuple(initial_noise.shape)}")
        noise = initial_noise.float()
    noise = noise.to(device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(denoiser, x, t.to(device), positive, negative, cfg)

    result = sample(eps_fn, denoiser.schedule, noise, steps, sampler, scheduler,
                    latent=scaled if denoise < 1 else None, denoise=denoise,
                    generator=generator if sampler in STOCHASTIC_SAMPLERS else None,
                    momentum=momentum, family=family, on_step=progress_reporter(family))
    return result / latent_space.scaling_factor + latent_space.shift_factor
