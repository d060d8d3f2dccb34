"""MagicFace's sampling loop (the official pipeline's): DDIM on diffusers' default grid, the target and its re-noised
references in one UNet call per step, guidance adapted per pixel. See :mod:`.attention`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..common.denoiser import Conditioning, Denoiser
from ..common.progress import check_interrupt
from ..sampling.ddim import ddim_alpha_bars, ddim_step, leading_ddim_timesteps
from .attention import DEFAULT_CFG, DEFAULT_STEPS, MagicFaceAttention, guidance_rate


@torch.no_grad()
def magicface_sample(denoiser: Denoiser, network: torch.nn.Module, noise: torch.Tensor, references: torch.Tensor,
                     positive: Conditioning, negative: Conditioning, reference_prompts: Sequence[Conditioning],
                     attention: MagicFaceAttention, generator: torch.Generator, steps: int = DEFAULT_STEPS,
                     cfg: float = DEFAULT_CFG, adaptive_guidance: bool = True,
                     on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """One target latent sampled from ``noise`` (1, C, h, w) with MagicFace.

    Each step: the references' clean latents (K, C, h, w) re-noised to the step's timestep with fresh noise from
    ``generator``; one call of ``denoiser`` (``network`` is its UNet, which ``attention`` hooks) on [target,
    references] with ``negative`` then [target, references] with ``positive`` and ``reference_prompts``; the
    target's ε = ε_u + cfg·rate·(ε_c − ε_u), rate from :func:`guidance_rate` (1 without ``adaptive_guidance``); a
    deterministic DDIM step. Latents are as the denoiser sees them (scaled).

    Returns:
        The sampled latent (1, C, h, w).
    """
    if noise.ndim != 4 or noise.shape[0] != 1 or references.shape[1:] != noise.shape[1:]:
        raise ValueError(f"noise must be (1, C, h, w) and references (K, C, h, w) alike; got shapes "
                         f"{tuple(noise.shape)} and {tuple(references.shape)}")
    if len(reference_prompts) != references.shape[0] or attention.group != 1 + references.shape[0]:
        raise ValueError(f"{references.shape[0]} references need as many prompts ({len(reference_prompts)}) and "
                         f"masks ({attention.group - 1})")
    if cfg < 1:
        raise ValueError(f"cfg must be >= 1 (the references' attention needs the guided half); got {cfg}")
    timesteps = leading_ddim_timesteps(steps, denoiser.schedule.num_train_timesteps).flip(0)
    alphas, previous = (values[::-1] for values in ddim_alpha_bars(denoiser, timesteps.flip(0)))
    group = attention.group
    conditioning = Conditioning.cat([negative.repeat_to(group), Conditioning.cat([positive, *reference_prompts])])
    x = noise.float()
    with attention.installed(network):
        for i, timestep in enumerate(timesteps.tolist()):
            check_interrupt()
            fresh = torch.randn(references.shape, generator=generator).to(references)
            noisy = alphas[i] ** 0.5 * references + (1 - alphas[i]) ** 0.5 * fresh
            batch = torch.cat([x, noisy.to(x)]).repeat(2, 1, 1, 1)
            t = torch.full((batch.shape[0],), float(timestep), device=x.device)
            attention.begin_call(i, tuple(x.shape[-2:]))
            eps = denoiser.schedule.eps_from_prediction(batch, t, denoiser(batch, t, conditioning))
            tokens, foreground = attention.end_call()
            eps_unguided, eps_guided = eps[:1], eps[group:group + 1]
            rate = guidance_rate(eps_unguided, eps_guided, tokens, foreground, cfg) if adaptive_guidance else 1.0
            eps = eps_unguided + cfg * rate * (eps_guided - eps_unguided)
            if on_step is not None:
                on_step(i + 1, len(timesteps), (x - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5)
            x = ddim_step(x, eps, alphas[i], previous[i])
    return x
