"""Momentum for diffusion sampling: Polyak's heavy ball (HB) and the generalised heavy ball (GHVB).

Both turn the model's ε (or, on DPM-Solver++, its data prediction) into the direction a first-order step takes,
so a base solver's own step applies them: DDIM's step for HB-PLMS and GHVB, DPM-Solver++'s first-order update for
HB-DPM++ (``dpm_solver.py``).

Notation (``techniques.md`` §4.3; paper → code):
    x̄ = z/√ᾱ_t, g_t = σ_t/√ᾱ_t        the coordinates in which DDIM is Euler on dx̄/dg = ε
    ε_n                               ``eps`` at step n
    v_n                               ``velocity``: v_n = (1−β)·v_{n−1} + β·(input), v_0 = input
    AB_k                              Adams–Bashforth combination of order k (``ADAMS_BASHFORTH``)
    B_k(v; β)                         GHVB's β-dependent combination of the last k velocities
    m                                 the one "momentum number" knob: order k = ⌈m⌉, β = m − k + 1

Source: Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", ICLR 2024;
official code ``momentum_scheduler.py`` (read for techniques.md §4.3; this module is written from the equations).
"""

from __future__ import annotations

import collections
import math

import torch

MAX_ORDER = 4  # the paper's highest GHVB/PLMS order; its B_4 coefficients are the last ones it gives

# Adams–Bashforth coefficients for equal steps, newest value first (PLMS, as in diffusers' PNDMScheduler).
ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def order_and_beta(momentum_number: float) -> tuple[int, float]:
    """Split the momentum number m into the multistep order k = ⌈m⌉ and the momentum β = m − k + 1.

    Integer m means no momentum (β = 1) at order m; m = 1 is DDIM.

    Args:
        momentum_number: m in (0, 4].
    Returns:
        ``(order, beta)`` with order in 1..4 and beta in (0, 1].
    Raises:
        ValueError: m out of range.
    Example:
        >>> [order_and_beta(m) for m in (0.5, 1.0, 1.5, 2.5, 4.0)]
        [(1, 0.5), (1, 1.0), (2, 0.5), (3, 0.5), (4, 1.0)]

    Source:
        techniques.md §4.3 ("one knob"): 0.5 = HB on DDIM with β 0.5, 1.5 = order 2 with β 0.5, 2.5 = order 3.
    """
    if not 0 < momentum_number <= MAX_ORDER:
        raise ValueError(f"the momentum number m must be in (0, {MAX_ORDER}]; got {momentum_number}")
    order = math.ceil(momentum_number)
    return order, momentum_number - order + 1


def ghvb_coefficients(order: int, beta: float) -> tuple[float, ...]:
    """GHVB's combination B_k of the last ``order`` velocities, newest first.

    With β = 1 they are the Adams–Bashforth coefficients; for every β they sum to 1.

    Args:
        order: k in 1..4.
        beta: β in (0, 1].
    Returns:
        ``order`` coefficients.
    Raises:
        ValueError: order or beta out of range.
    Example:
        >>> ghvb_coefficients(2, 1.0) == ADAMS_BASHFORTH[2]
        True
        >>> ghvb_coefficients(2, 0.5)
        (2.5, -1.5)

    Source:
        Wizadwongsa et al. 2024 (GHVB); coefficients as listed in techniques.md §4.3.
    """
    if order not in ADAMS_BASHFORTH or not 0 < beta <= 1:
        raise ValueError(f"GHVB needs order in 1..{MAX_ORDER} and beta in (0, 1]; got order={order}, beta={beta}")
    b = beta
    if order == 1:
        return (1.0,)
    if order == 2:
        return ((2 + b) / (2 * b), -(2 - b) / (2 * b))
    if order == 3:
        return ((18 + 5 * b) / (12 * b), -(24 - 8 * b) / (12 * b), (6 - b) / (12 * b))
    return ((46 + 9 * b) / (24 * b), -(78 - 19 * b) / (24 * b), (42 - 5 * b) / (24 * b), -(10 - b) / (24 * b))


class HeavyBall:
    """Polyak's heavy ball: v_n = (1−β)·v_{n−1} + β·d_n, starting at v_0 = d_0.

    β = 1 returns each input unchanged, bit for bit (0·v + 1·d is exact), which is what makes momentum 1 equal the
    base solver exactly.

    Example:
        >>> ball = HeavyBall(0.5)
        >>> [float(ball(torch.tensor(d))) for d in (2.0, 0.0, 0.0)]
        [2.0, 1.0, 0.5]
    """

    def __init__(self, beta: float) -> None:
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1]; got {beta}")
        self.beta = beta
        self.velocity: torch.Tensor | None = None

    def __call__(self, direction: torch.Tensor) -> torch.Tensor:
        if self.velocity is None:
            self.velocity = direction
        else:
            self.velocity = (1 - self.beta) * self.velocity + self.beta * direction
        return self.velocity


class _Multistep:
    """A linear combination of the last ``order`` inputs, newest first; with fewer, the highest order they allow."""

    def __init__(self, order: int, coefficients) -> None:
        self.coefficients = coefficients  # number of available inputs -> coefficients, newest first
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=order)

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        self.history.appendleft(value)
        weights = self.coefficients(len(self.history))
        if len(weights) == 1:  # the input itself, so that order 1 (DDIM) stays bit-exact
            return value
        return sum(weight * past for weight, past in zip(weights, self.history))


class PLMSHeavyBall:
    """HB-PLMS: the direction is v_n = (1−β)·v_{n−1} + β·AB_k(ε_n, ε_{n−1}, …), order and β from m.

    Feed it each step's ε; step DDIM with the returned direction. m = 1 returns ε itself (DDIM); integer m is
    plain PLMS of that order.

    Example:
        >>> direction = PLMSHeavyBall(2.0)  # PLMS2, no momentum
        >>> [float(direction(torch.tensor(e))) for e in (1.0, 3.0)]
        [1.0, 4.0]
    """

    def __init__(self, momentum_number: float) -> None:
        order, beta = order_and_beta(momentum_number)
        self._multistep = _Multistep(order, lambda available: ADAMS_BASHFORTH[available])
        self._ball = HeavyBall(beta)

    def __call__(self, eps: torch.Tensor) -> torch.Tensor:
        return self._ball(self._multistep(eps))


class GeneralizedHeavyBall:
    """GHVB: v_n = (1−β)·v_{n−1} + β·ε_n, and the direction is B_k(v_n, v_{n−1}, …; β), order and β from m.

    Example:
        >>> direction = GeneralizedHeavyBall(1.5)  # order 2, β 0.5
        >>> [float(direction(torch.tensor(e))) for e in (1.0, 3.0)]
        [1.0, 3.5]
    """

    def __init__(self, momentum_number: float) -> None:
        order, beta = order_and_beta(momentum_number)
        self._ball = HeavyBall(beta)
        self._multistep = _Multistep(order, lambda available: ghvb_coefficients(available, beta))

    def __call__(self, eps: torch.Tensor) -> torch.Tensor:
        return self._multistep(self._ball(eps))


MOMENTUM_METHODS = {"hb_plms": PLMSHeavyBall, "ghvb": GeneralizedHeavyBall}


@torch.no_grad()
def sample_momentum(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                    disable: bool | None = None, *, method: str = "ghvb", momentum: float = 2.5) -> torch.Tensor:
    """HB-PLMS or GHVB as a sampling function in the k-diffusion convention (a SAMPLER).

    DDIM is Euler in the VE latents x = x_VP/√ᾱ against σ (``dx/dσ = ε``), so each step is x ← x + (σ_next − σ)·d
    with the direction d that :class:`PLMSHeavyBall` or :class:`GeneralizedHeavyBall` makes of ε = (x − x̂₀)/σ;
    m = 1 is DDIM (ComfyUI's euler) exactly.

    Args:
        model: ``model(x, σ·ones(B), **extra_args)`` → guided x̂₀.
        x: the starting latents (B, C, h, w), already scaled to σ₀.
        sigmas: (n + 1,) descending; the last may be 0 (a full run) or not (a truncated schedule).
        callback: called each step with ``{"x", "i", "sigma", "sigma_hat", "denoised"}``.
        method: "hb_plms" or "ghvb".
        momentum: the momentum number m in (0, 4] (``order_and_beta``).
    """
    if method not in MOMENTUM_METHODS:
        raise ValueError(f"method must be one of {tuple(MOMENTUM_METHODS)}; got {method!r}")
    direction = MOMENTUM_METHODS[method](momentum)
    extra_args = extra_args or {}
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * direction((x - denoised) / sigmas[i])
    return x
