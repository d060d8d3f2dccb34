"""DPM-Solver++ (1S and 2M) in data-prediction form on any sigma grid, with optional heavy-ball momentum.

diffusers' ``DPMSolverMultistepScheduler`` runs plain DPM++ 2M on its own grids; this module adds what it lacks:
heavy-ball momentum on the data prediction (HB-DPM++) and grids that end at a non-zero sigma at fractional
timesteps (the F-scheduler).

Notation (Lu et al. 2022, DPM-Solver++; code name → paper symbol):
    alpha, sigma        α_t, σ_t of the VP process, x_t = α_t·x0 + σ_t·ε; VE sigma s = σ/α
    lam                 λ_t = log(α_t/σ_t) = −log s
    h                   λ_{t_i+1} − λ_{t_i}
    r                   h_{i−1}/h_i
    x0                  the data prediction D_i = (x_i − σ_i·ε_i)/α_i
    direction           2M: D_i + (D_i − D_{i−1})/(2r); 1S: D_i; with HB it is the velocity v = (1−β)v + β·that
    update              x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·direction
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .momentum import HeavyBall
from .schedules import vp_coefficients

LOWER_ORDER_FINAL_STEPS = 15  # diffusers' lower_order_final: below this many steps the last one is first order
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OnStep = Callable[[int, int, torch.Tensor], None]


def dpmpp_sample(eps_fn: EpsFn, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor, *, order: int,
                 beta: float = 1.0, on_step: OnStep | None = None) -> torch.Tensor:
    """Run DPM-Solver++ of ``order`` 1 (1S, = DDIM) or 2 (2M) over a grid, with heavy-ball momentum ``beta``.

    The first step, and the last when it ends at sigma 0 or fewer than 15 steps run, are first order, as in
    diffusers (``lower_order_final``; the 2M correction divides by h, which is infinite at sigma 0). Momentum acts
    inside the 2M update only, as the official ``MomentumDPMSolverMultistepScheduler``: its velocity starts at the
    first 2M direction and the first-order steps take the plain data prediction. With ``beta == 1`` this is plain
    DPM-Solver++(2M), equal to diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
    midpoint) on the same grid up to float rounding.

    Args:
        eps_fn: ε(x_t, t) after guidance; called with VP latents and timesteps of shape (B,), float32.
        x: VP latents at the first grid point, (B, C, h, w).
        timesteps: the n timesteps the model is evaluated at, shape (n,); fractional values allowed.
        sigmas: VE sigmas, shape (n + 1,), decreasing; the last one (where sampling stops) may be zero or not.
        order: 1 or 2.
        beta: heavy-ball β in (0, 1]; 1 means no momentum.
        on_step: called after each step as ``on_step(done, n, x0)`` with the step's data prediction.
    Returns:
        VE latents x_VP / α at the last sigma, (B, C, h, w): x0 when it is 0, else x0 plus that sigma times noise.
    Raises:
        ValueError: the grid or an argument is malformed.
    Example:
        >>> out = dpmpp_sample(lambda x, t: torch.zeros_like(x), torch.ones(1, 4, 2, 2),
        ...                    torch.tensor([999.0, 500.0]), torch.tensor([10.0, 1.0, 0.0]), order=2)
        >>> round(float(out[0, 0, 0, 0]), 4)  # ε = 0: x is clean already, so x0 = x/α_0 = √(10² + 1)
        10.0499

    Source:
        Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022,
        Algorithm 2 (2M); HB on its data prediction: Wizadwongsa et al. 2024 (techniques.md §4.3).
    """
    steps = timesteps.shape[0]
    if timesteps.ndim != 1 or sigmas.shape != (steps + 1,) or steps < 1:
        raise ValueError(f"need timesteps of shape (n,) and sigmas of shape (n + 1,), n >= 1; "
                         f"got {tuple(timesteps.shape)} and {tuple(sigmas.shape)}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order}")
    sigma_list = [float(s) for s in sigmas]
    if any(later >= earlier for earlier, later in zip(sigma_list, sigma_list[1:])) or sigma_list[-1] < 0:
        raise ValueError(f"sigmas must decrease to a value >= 0; got {sigma_list}")
    momentum = HeavyBall(beta)  # over the 2M directions only: its velocity starts at the first 2M step
    batch = x.shape[0]
    previous_x0 = None
    for i in range(steps):
        s, s_next = sigma_list[i], sigma_list[i + 1]
        alpha, sigma = vp_coefficients(s)
        alpha_next, sigma_next = vp_coefficients(s_next)
        t = torch.full((batch,), float(timesteps[i]), dtype=torch.float32, device=x.device)
        eps = eps_fn(x, t).to(x.dtype)
        x0 = (x - sigma * eps) / alpha
        # diffusers' lower_order_final: the last step is first order when it ends at 0 or fewer than 15 run
        last_first_order = i == steps - 1 and (s_next == 0 or steps < LOWER_ORDER_FINAL_STEPS)
        if order == 2 and previous_x0 is not None and not last_first_order:
            r = math.log(sigma_list[i - 1] / s) / math.log(s / s_next)
            direction = momentum(x0 + (x0 - previous_x0) / (2 * r))
        else:
            direction = x0
        # e^{−h} = s_next/s, so α_next(1 − e^{−h}) stays finite (= 1) when s_next = 0.
        x = (sigma_next / sigma) * x + (alpha_next * (1 - s_next / s)) * direction
        previous_x0 = x0
        if on_step is not None:
            on_step(i + 1, steps, x0)
    return x / alpha_next
