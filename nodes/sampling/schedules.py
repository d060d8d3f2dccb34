"""Sigma and timestep schedules that diffusers lacks: the F-scheduler's truncated schedule and its helpers, and
TCD's timestep grid.

Notation (``techniques.md`` §4): ᾱ_t = ``alphas_cumprod[t]``; the VE sigma s_t = √((1−ᾱ_t)/ᾱ_t); timesteps may be
fractional, with ᾱ linearly interpolated between the integer ones (:meth:`NoiseSchedule.alpha_bar`).
"""

from __future__ import annotations

import math

import torch

from ..common.denoiser import NoiseSchedule

F_SCHEDULER_STEPS = (5, 6, 8)
F_SCHEDULER_FAMILIES = ("sd1", "sd2", "sdxl")

# (points in the Karras ramp n_k, its ρ, index k of s_end in the ramp), keyed by (SDXL?, steps).
# Source: "Hyperparameters are all you need" (F-scheduler), official txt2img.py (SD1.5) and txt2imgXL.py (SDXL),
# as recorded in techniques.md §4.4: 8 steps n_k 12, ρ 7, k 9 ("full trick"; ρ 12, k 10 for SDXL);
# 5 and 6 steps n_k 8, ρ 5, k 6.
_F_RAMPS = {
    (False, 5): (8, 5.0, 6),
    (False, 6): (8, 5.0, 6),
    (False, 8): (12, 7.0, 9),
    (True, 5): (8, 5.0, 6),
    (True, 6): (8, 5.0, 6),
    (True, 8): (12, 12.0, 10),
}
# Source: same scripts; timesteps are spaced evenly in t^(1/1.2) between t_max and t_end.
F_TIME_WARP = 1.2


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float) -> torch.Tensor:
    """The Karras et al. (2022) ramp of ``n`` sigmas from ``sigma_max`` down to ``sigma_min``.

    Args:
        sigma_max, sigma_min: end points, sigma_max > sigma_min > 0.
        n: number of points, >= 2.
        rho: the ramp's exponent, > 0.
    Returns:
        Sigmas of shape (n,), float64, decreasing.
    Raises:
        ValueError: an argument out of range.
    Example:
        >>> [round(s, 4) for s in karras_sigmas(10.0, 0.1, 3, 7.0).tolist()]
        [10.0, 1.4507, 0.1]

    Source:
        Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Eq. 5.
    """
    if n < 2 or rho <= 0 or not sigma_max > sigma_min > 0:
        raise ValueError(f"karras_sigmas needs n >= 2, rho > 0 and sigma_max > sigma_min > 0; "
                         f"got n={n}, rho={rho}, sigma_max={sigma_max}, sigma_min={sigma_min}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def timestep_from_sigma(schedule: NoiseSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """The continuous timestep whose VE sigma is ``sigma``, by linear interpolation of log s_t over integer t.

    Args:
        schedule: the model's noise schedule.
        sigma: VE sigmas of any shape, within [s_0, s_{T-1}].
    Returns:
        Timesteps of the same shape, float64, in [0, T-1].
    Raises:
        ValueError: a sigma outside the schedule's range.
    Example:
        >>> betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        >>> schedule = NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")
        >>> float(timestep_from_sigma(schedule, schedule.ve_sigmas()[[999]]))
        999.0

    Source:
        k-diffusion's ``DiscreteSchedule.sigma_to_t`` interpolation, which the F-scheduler's scripts use.
    """
    log_table = schedule.ve_sigmas().log()  # increasing in t
    log_sigma = sigma.to(torch.float64).log()
    if (log_sigma < log_table[0] - 1e-9).any() or (log_sigma > log_table[-1] + 1e-9).any():
        raise ValueError(f"sigma must lie in the schedule's range [{float(log_table[0].exp()):.4f}, "
                         f"{float(log_table[-1].exp()):.4f}]; got {sigma.tolist()}")
    high = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    low = high - 1
    weight = (log_sigma - log_table[low]) / (log_table[high] - log_table[low])
    return (low + weight).clamp(0, len(log_table) - 1)


def sigma_from_timestep(schedule: NoiseSchedule, timestep: torch.Tensor) -> torch.Tensor:
    """VE sigmas s(t) = √((1−ᾱ(t))/ᾱ(t)) at possibly fractional timesteps (ᾱ interpolated linearly), float64."""
    alpha_bar = schedule.alpha_bar(timestep)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def f_scheduler_schedule(schedule: NoiseSchedule, steps: int, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The F-scheduler's truncated schedule: ``steps`` evaluated timesteps and one final, non-zero, end point.

    A Karras ramp fixes the end sigma s_end = ramp[k]; the timesteps from t_max to t(s_end) are spaced evenly in
    t^(1/1.2); their sigmas come from ᾱ interpolated linearly at the fractional timesteps.

    Args:
        schedule: the model's noise schedule.
        steps: number of model evaluations, one of ``F_SCHEDULER_STEPS`` (5, 6, 8).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; SDXL's 8-step ramp differs (ρ 12, k 10).
    Returns:
        ``(timesteps, sigmas)``, both of shape (steps + 1,), float64, decreasing: the model is evaluated at the
        first ``steps`` timesteps; the last entry is where sampling stops (s_end ≈ 0.13–0.15 for SD), not zero.
    Raises:
        ValueError: ``steps`` or ``family`` not accepted.
    Example:
        >>> betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        >>> schedule = NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")
        >>> timesteps, sigmas = f_scheduler_schedule(schedule, 5, "sd1")
        >>> [round(t, 1) for t in timesteps.tolist()]
        [999.0, 772.5, 556.7, 354.2, 170.0, 18.3]
        >>> [round(s, 3) for s in sigmas.tolist()]
        [14.615, 4.519, 1.962, 1.001, 0.502, 0.132]

    Source:
        "Hyperparameters are all you need" (v3: "F-scheduler"), official txt2img.py / txt2imgXL.py; the recipe and
        the table for SD1.5's betas are in techniques.md §4.4.
    """
    if steps not in F_SCHEDULER_STEPS:
        raise ValueError(f"the F-scheduler supports steps in {F_SCHEDULER_STEPS}; got {steps}")
    if family not in F_SCHEDULER_FAMILIES:
        raise ValueError(f"family must be one of {F_SCHEDULER_FAMILIES}; got {family!r}")
    ramp_points, rho, end_index = _F_RAMPS[(family == "sdxl", steps)]
    table = schedule.ve_sigmas()
    sigma_max, sigma_min = float(table[-1]), float(table[0])
    sigma_end = karras_sigmas(sigma_max, sigma_min, ramp_points, rho)[end_index]
    t_max = float(timestep_from_sigma(schedule, torch.tensor(sigma_max, dtype=torch.float64)))
    t_end = float(timestep_from_sigma(schedule, sigma_end))
    warp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    high, low = t_max ** (1 / F_TIME_WARP), t_end ** (1 / F_TIME_WARP)
    timesteps = (high + warp * (low - high)) ** F_TIME_WARP
    return timesteps, sigma_from_timestep(schedule, timesteps)


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(α, σ) of the VP process at VE sigma s: α = 1/√(s²+1), σ = s·α, so that x_VP = α·x0 + σ·ε.

    Example:
        >>> vp_coefficients(0.0)
        (1.0, 0.0)
    """
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


# Source: diffusers' TCDScheduler (original_inference_steps 50), as Hyper-SD's model card runs it.
TCD_ORIGINAL_STEPS = 50


def tcd_timesteps(steps: int, total: int = 1000, original_steps: int = TCD_ORIGINAL_STEPS) -> torch.Tensor:
    """TCD's inference grid, descending: ``steps`` evenly spaced entries (by index, from the first) of its
    distillation grid total−1, total−1−k, …, k−1 with k = total // original_steps (diffusers' ``TCDScheduler``).

    Example:
        >>> tcd_timesteps(1).tolist(), tcd_timesteps(4).tolist()
        ([999], [999, 759, 499, 259])
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be in [1, {original_steps}]; got {steps}")
    skip = total // original_steps
    distilled = torch.arange(original_steps, 0, -1) * skip - 1
    return distilled[torch.arange(steps) * original_steps // steps]


def timestep_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """SIGMAS (n + 1,) float32 for a sampler that visits the integer training ``timesteps`` (descending) of
    ``schedule``: their VE sigmas, then 0 (ComfyUI's schedules end there)."""
    sigmas = schedule.ve_sigmas()[timesteps].float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])
