"""NoiseDiffusion (Zheng et al. 2024, "NoiseDiffusion: Correcting Noise for Image Interpolation with Diffusion
Models beyond Spherical Linear Interpolation", ICLR 2024; ``techniques.md`` §4.8), read from the official code
(``controlnet/cm.py``, ``interpolate_new``; SD2.1 in the ControlNet codebase, the method needs no ControlNet).

1. Images A and B are VAE-encoded (x_A, x_B, scaled as the denoiser sees them) and DDIM-inverted with the prompt at
   guidance 1 to step 140 of a 250-step grid (LDM's uniform grid; ``depth`` 0.56): l_A, l_B.
2. For a fraction λ: α = cos(λπ/2), β = sin(λπ/2), renormalised with the extra-noise weight γ so that
   α'² + β'² = 1 − γ² (α'/β' = α/β), and the image-injection weights μ = k·α'/(α'+β'), ν = k·β'/(α'+β')
   (k = ``inject``, the code's 1.2).
3. l_A, l_B clipped to ±c (c = ``clip``, the code's 2: the paper's "constraint on extreme values"), then
   z = α'·l_A + β'·l_B + (μ−α')·√ᾱ·x_A + (ν−β')·√ᾱ·x_B + γ·√(1−ᾱ)·ε, clipped to ±c again.
4. z is DDIM-sampled back from the inverted step with CFG 7.5 and the negative prompt.

The code's in-betweens are λ ∈ {0.17, 0.33, 0.5, 0.67, 0.83}; γ = 0 there (the paper's "subtle Gaussian noise" is
off). As in the code, the mixing's ᾱ is the grid's step after the inverted one (``timesteps[cur_step]``) while the
sampling starts at the inverted one. Departures: the weights are written α' = √(1−γ²)·cos(λπ/2),
β' = √(1−γ²)·sin(λπ/2), the code's formula without its division by β (so λ = 0 and 1 are defined: the ends);
the code's fixed seed (49) is the node's seed; images are encoded to their posterior's mean (the code draws a
sample). The code saves the two inputs as the sequence's ends; here the ends, when asked for, are the inputs'
reconstructions (inverted and sampled back unmixed at guidance 1), so the sequence is all of one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..common.denoiser import Conditioning, Denoiser, LatentCodec
from ..sampling.ddim import ddim_invert_partial, ddim_sample_partial, ldm_ddim_timesteps

# Source: official cm.py, interpolate_new: ddim_steps=250, cur_step=140, guide_scale=7.5, coef=2.0, gamma=0, 1.2
DEFAULT_STEPS, DEFAULT_DEPTH, DEFAULT_CFG = 250, 140 / 250, 7.5
DEFAULT_CLIP, DEFAULT_GAMMA, DEFAULT_INJECT = 2.0, 0.0, 1.2
# Source: idem, frac_list: five in-betweens, λ = i/6 rounded to two places
DEFAULT_FRAMES = 5
# In-betweens sampled in one batch (ours): memory stays that of eight, however many are asked for
FRAMES_PER_BATCH = 8


def mixing_weights(fraction: float, gamma: float = DEFAULT_GAMMA,
                   inject: float = DEFAULT_INJECT) -> tuple[float, float, float, float]:
    """(α', β', μ, ν) for fraction λ in [0, 1].

    Example:
        >>> alpha, beta, mu, nu = mixing_weights(0.5)
        >>> round(alpha ** 2 + beta ** 2, 12), round(mu + nu, 12), round(mu, 3)
        (1.0, 1.2, 0.6)
    """
    if not 0 <= fraction <= 1 or not 0 <= gamma < 1:
        raise ValueError(f"fraction must be in [0, 1] and gamma in [0, 1); got {fraction}, {gamma}")
    scale = math.sqrt(1 - gamma * gamma)
    alpha, beta = scale * math.cos(fraction * math.pi / 2), scale * math.sin(fraction * math.pi / 2)
    return alpha, beta, inject * alpha / (alpha + beta), inject * beta / (alpha + beta)


def noise_mix(inverted_a: torch.Tensor, inverted_b: torch.Tensor, clean_a: torch.Tensor, clean_b: torch.Tensor,
              noise: torch.Tensor, fraction: float, alpha_bar: float, gamma: float = DEFAULT_GAMMA,
              clip: float | None = DEFAULT_CLIP, inject: float = DEFAULT_INJECT) -> torch.Tensor:
    """z of step 3 for one λ (all latents (B, C, h, w) as the denoiser sees them); ``clip`` None: no clipping.

    Example:
        >>> l_a, l_b, x_a, x_b, eps = torch.randn(5, 1, 4, 2, 2).unbind(0)
        >>> torch.equal(noise_mix(l_a, l_b, x_a, x_b, eps, 0.0, 0.5, 0.0, None, 1.0), l_a)
        True
    """
    alpha, beta, mu, nu = mixing_weights(fraction, gamma, inject)
    if clip is not None:
        inverted_a, inverted_b = inverted_a.clamp(-clip, clip), inverted_b.clamp(-clip, clip)
    root = math.sqrt(alpha_bar)
    z = (alpha * inverted_a + beta * inverted_b + (mu - alpha) * root * clean_a + (nu - beta) * root * clean_b
         + gamma * math.sqrt(1 - alpha_bar) * noise)
    return z if clip is None else z.clamp(-clip, clip)


def fractions_of(frames: int) -> list[float]:
    """λ of ``frames`` evenly spaced in-betweens, i/(frames+1).

    Example:
        >>> [round(f, 2) for f in fractions_of(5)]
        [0.17, 0.33, 0.5, 0.67, 0.83]
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1; got {frames}")
    return [index / (frames + 1) for index in range(1, frames + 1)]


def noisediffusion_interpolate(denoiser: Denoiser, codec: LatentCodec, image_a: torch.Tensor,
                               image_b: torch.Tensor, positive: Conditioning, negative: Conditioning,
                               fractions: Sequence[float], generator: torch.Generator, include_ends: bool = False,
                               steps: int = DEFAULT_STEPS, depth: float = DEFAULT_DEPTH, cfg: float = DEFAULT_CFG,
                               gamma: float = DEFAULT_GAMMA, clip: float | None = DEFAULT_CLIP,
                               inject: float = DEFAULT_INJECT) -> torch.Tensor:
    """NoiseDiffusion's sequence between two images.

    Args:
        denoiser, codec: the model and its VAE.
        image_a, image_b: (1, 3, H, W) in 0..1, H and W multiples of the VAE's downscale.
        positive, negative: the prompt (inversion and sampling) and the negative prompt (sampling), batch 1.
        fractions: the λ of the in-betweens, each in [0, 1].
        generator: draws the mixing noise (one per λ; used where ``gamma`` > 0).
        include_ends: put A's and B's reconstruction first and last (their inverted latents sampled back unmixed
            at guidance 1, as they were inverted).
        steps, depth, cfg, gamma, clip, inject: the grid, the inverted share of it, the guidance, and the mixing's
            settings (``clip`` None: no clipping).
    Returns:
        Latents (len(fractions) [+ 2], C, H/f, W/f), unscaled as a LATENT holds them.
    Raises:
        ValueError: images of different sizes, not single, or not multiples of the downscale; no fractions.
    """
    if image_a.shape != image_b.shape or image_a.ndim != 4 or image_a.shape[0] != 1:
        raise ValueError(f"image_a and image_b must be single images of one size; got {tuple(image_a.shape)} and "
                         f"{tuple(image_b.shape)}")
    if image_a.shape[-2] % codec.downscale or image_a.shape[-1] % codec.downscale:
        raise ValueError(f"the images' sides must be multiples of {codec.downscale}; got "
                         f"{tuple(image_a.shape[-2:])}")
    if not fractions:
        raise ValueError("fractions must not be empty")
    timesteps = ldm_ddim_timesteps(steps, denoiser.schedule.num_train_timesteps)
    inverted_steps = max(1, round(steps * depth))
    # the official code mixes with ᾱ at timesteps[cur_step], the grid's step after the inverted one
    alpha_bar = float(denoiser.schedule.alphas_cumprod[timesteps[min(inverted_steps, steps - 1)]])
    clean = torch.cat([codec.encode(image.to(codec.device)) for image in (image_a, image_b)])
    clean = (clean - codec.shift_factor) * codec.scaling_factor
    inverted = ddim_invert_partial(denoiser, clean, positive, timesteps, inverted_steps)
    sampled = []
    for start in range(0, len(fractions), FRAMES_PER_BATCH):
        mixed = torch.cat([noise_mix(inverted[:1], inverted[1:], clean[:1], clean[1:],
                                     torch.randn(clean[:1].shape, generator=generator).to(clean), fraction,
                                     alpha_bar, gamma, clip, inject)
                           for fraction in fractions[start:start + FRAMES_PER_BATCH]])
        sampled.append(ddim_sample_partial(denoiser, mixed, positive, negative, cfg, timesteps, inverted_steps))
    sampled = torch.cat(sampled)
    if include_ends:
        ends = ddim_sample_partial(denoiser, inverted, positive, positive, 1.0, timesteps, inverted_steps)
        sampled = torch.cat([ends[:1], sampled, ends[1:]])
    return sampled / codec.scaling_factor + codec.shift_factor
