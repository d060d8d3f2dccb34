"""Deterministic DDIM on a :class:`~nodes.common.denoiser.Denoiser`, on LDM's own timestep grid: the step, a partial
inversion of clean latents to a depth of the grid, and the guided sampling back from there (``DDIMSampler.encode``
and ``decode`` of the LDM codebase that papers built on, e.g. NoiseDiffusion's).

Notation: ᾱ_t = ``schedule.alphas_cumprod[t]``; the grid t_0 < t_1 < … < t_{N−1} (:func:`ldm_ddim_timesteps`);
ᾱ_prev(i) = ᾱ_{t_{i−1}}, and ᾱ_0 (LDM's ``alphas_prev`` starts at the first training ᾱ, not 1) for i = 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ..common.denoiser import Conditioning, Denoiser, guided_eps
from ..common.progress import check_interrupt, progress


def ldm_ddim_timesteps(steps: int, total: int = 1000) -> torch.Tensor:
    """LDM's "uniform" DDIM grid, ⌊i·total/steps⌋ + 1 for i < steps: where ``steps`` divides ``total`` exactly
    LDM's own (``make_ddim_timesteps``: every total/steps-th timestep from 1); otherwise spread over the whole range
    the same way (LDM's would stop short of it or run past ``steps`` entries). At most ``total`` − 1 steps: the
    offset of 1 leaves no room for more (LDM's 1000-step grid ends at 1000, out of its table).

    Example:
        >>> ldm_ddim_timesteps(250)[:3].tolist(), int(ldm_ddim_timesteps(250)[-1]), len(ldm_ddim_timesteps(250))
        ([1, 5, 9], 997, 250)
        >>> int(ldm_ddim_timesteps(300)[-1]), int(ldm_ddim_timesteps(999)[-1])
        (997, 999)
    """
    if not 1 <= steps < total:
        raise ValueError(f"steps must be in [1, {total - 1}]; got {steps}")
    return torch.arange(steps) * total // steps + 1


def leading_ddim_timesteps(steps: int, total: int = 1000) -> torch.Tensor:
    """diffusers' ``DDIMScheduler`` grid with its defaults (``timestep_spacing="leading"``, ``steps_offset=0``),
    ascending: every ⌊total/steps⌋-th timestep from 0, what pipelines built on diffusers' DDIM sample on (e.g.
    MagicFace's); step i goes from ᾱ_{t_i} to ᾱ_{t_{i−1}}, and the last to ᾱ_0 (``set_alpha_to_one=False``).

    Example:
        >>> leading_ddim_timesteps(50)[:3].tolist(), int(leading_ddim_timesteps(50)[-1])
        ([0, 20, 40], 980)
    """
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}]; got {steps}")
    return torch.arange(steps) * (total // steps)


def trailing_timesteps(steps: int, total: int = 1000) -> torch.Tensor:
    """diffusers' ``timestep_spacing="trailing"`` grid, descending from the last training timestep:
    round(total − i·total/steps) − 1 for i < steps, computed as diffusers computes it (a float range, rounded half
    to even), what Hyper-SD's model card samples on (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2).

    Example:
        >>> trailing_timesteps(4).tolist(), trailing_timesteps(12)[:3].tolist()
        ([999, 749, 499, 249], [999, 916, 832])
    """
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}]; got {steps}")
    # The float range gains a last entry, timestep −1, for some step counts (61 of 1000): the first steps are the grid.
    grid = np.round(np.arange(total, 0, -total / steps)).astype(np.int64)[:steps] - 1
    return torch.from_numpy(grid)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM from ᾱ_from to ᾱ_to with noise estimate ε: √ᾱ_to·x̂_0 + √(1−ᾱ_to)·ε."""
    x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def ddim_alpha_bars(denoiser: Denoiser, timesteps: torch.Tensor) -> tuple[list[float], list[float]]:
    """ᾱ at each grid timestep (ascending) and at the one before it (ᾱ_0, the first training ᾱ, before the first):
    a sampling step i goes from the first to the second, an inversion step back."""
    table = denoiser.schedule.alphas_cumprod
    alphas = [float(table[t]) for t in timesteps.tolist()]
    return alphas, [float(table[0])] + alphas[:-1]


@torch.no_grad()
def ddim_invert_partial(denoiser: Denoiser, latent: torch.Tensor, conditioning: Conditioning,
                        timesteps: torch.Tensor, depth: int) -> torch.Tensor:
    """Clean latents (B, C, h, w), as the denoiser sees them, inverted ``depth`` steps up the grid, to t_{depth−1}:
    step i goes from ᾱ_prev(i) to ᾱ_{t_i} with ε(x, t_i) unguided (LDM's ``encode`` at guidance 1). Reports
    progress per step."""
    if not 1 <= depth <= len(timesteps):
        raise ValueError(f"depth must be in [1, {len(timesteps)}]; got {depth}")
    alphas, previous = ddim_alpha_bars(denoiser, timesteps)
    x = latent.float()
    for i in range(depth):
        check_interrupt()
        t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device)
        x = ddim_step(x, guided_eps(denoiser, x, t, conditioning, conditioning, 1.0), previous[i], alphas[i])
        progress(i + 1, depth)
    return x


@torch.no_grad()
def ddim_sample_partial(denoiser: Denoiser, latent: torch.Tensor, positive: Conditioning, negative: Conditioning,
                        cfg: float, timesteps: torch.Tensor, depth: int) -> torch.Tensor:
    """Latents at t_{depth−1} sampled down the grid with classifier-free guidance: step i (from depth − 1 to 0) goes
    from ᾱ_{t_i} to ᾱ_prev(i) with the guided ε(x, t_i) (LDM's ``decode``, η = 0). Reports progress per step."""
    if not 1 <= depth <= len(timesteps):
        raise ValueError(f"depth must be in [1, {len(timesteps)}]; got {depth}")
    alphas, previous = ddim_alpha_bars(denoiser, timesteps)
    x = latent.float()
    for done, i in enumerate(range(depth - 1, -1, -1)):
        check_interrupt()
        t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device)
        x = ddim_step(x, guided_eps(denoiser, x, t, positive, negative, cfg), alphas[i], previous[i])
        progress(done + 1, depth)
    return x
