"""SADA: stability-guided adaptive acceleration, step-wise (``techniques.md`` §4.5).

Inside each solver step n the sampler predicts the next state with a three-term multistep formula on the
probability-flow drift and compares it with the solver's real result. Where the residual runs against the drift's
second difference (the stability score M = r ⊙ Δ²f has mean ≤ 0), the trajectory is stable there, and the next
step's network call is skipped: its x̂₀ is extrapolated from the predicted state and the last ε. From
``lagrange_step`` on, every step that is not a multiple of ``lagrange_int`` is skipped instead, its x̂₀ a Lagrange
extrapolation through the x̂₀ kept every ``lagrange_int`` steps. Never more than ``max_interval`` skips in a row.

Notation (VP): z = x·α with α = 1/√(1 + σ²) the signal scale (√ᾱ) and σ_vp = σ·α the noise std; N the number of
steps, δ = 1/N; β_n the training beta at step n's timestep. The drift f_n = −½β_n·N·z_n + ½β_n·N·ε_n/σ_vp,n; the
prediction ẑ_{n+1} = z_n − δ(0.625 f_n + 0.75 f_{n−1} − 0.375 f_{n−2}); the residual r = x_{n+1} − ẑ_{n+1}/α_{n+1}.

Source: Jiang et al., "SADA: Stability-guided Adaptive Diffusion Acceleration", ICML 2025; official code
(Ting-Justin-Jiang/sada-icml, ``sada/solver.py``, ``sada/patch.py``): the criterion and its defaults (acc_range
(10, 47) of 50, its start at least 3; Lagrange from step 24 every 4 with 4 terms; max_interval 4), the Euler and
DPM-Solver++ variants (the Euler one keeps x̂₀/α for its Lagrange points and scales the extrapolation by α_{n+1};
the DPM++ one keeps x̂₀), a skipped step's ε the last computed one.

Departures: the drift takes ε from x̂₀ for every prediction type (the official code uses a v-model's raw output
there); the residual is measured in the k-diffusion view (x, VE) for both solvers, where the DPM++ code measures
it in z: the two differ by the positive factor α_{n+1}, which leaves the decision (the sign of a mean) as it is.
Token-wise sparsity is in :mod:`.tokens`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..sampling.k_samplers import _batch_sigma, _report, dpmpp_2m_step, sampler_model_sampling, to_d

logger = logging.getLogger(__name__)

SOLVERS = ("euler", "dpmpp_2m")
MIN_ACC_START = 3  # Source: patch.py, "we leveraged third order": three drift values are needed
# Source: the official README's apply_patch call (and techniques.md §4.5)
DEFAULTS = {"acc_start": 10, "acc_end": 47, "lagrange_int": 4, "lagrange_step": 24, "lagrange_term": 4,
            "max_interval": 4}


def lagrange_extrapolate(points: Sequence[float], values: Sequence[torch.Tensor], at: float) -> torch.Tensor:
    """The Lagrange polynomial through (points[k], values[k]) evaluated at ``at``.

    Example:
        >>> values = [torch.tensor(float(p) ** 3) for p in (1, 2, 3, 4)]
        >>> float(lagrange_extrapolate([1, 2, 3, 4], values, 5))
        125.0
    """
    result = torch.zeros_like(values[0])
    for i, (point, value) in enumerate(zip(points, values)):
        term = value
        for j, other in enumerate(points):
            if j != i:
                term = term * ((at - other) / (point - other))
        result = result + term
    return result


@dataclasses.dataclass(frozen=True)
class SadaSettings:
    """When SADA may skip (step indices of the run, from 0; the decision made at step n skips step n + 1): by the
    criterion from ``acc_start`` (at least 3) up to ``acc_end`` (exclusive); with ``lagrange_term`` > 0, by
    Lagrange from ``lagrange_step`` (a multiple of ``lagrange_int``) up to ``acc_end``, the criterion only before
    it. ``acc_start >= acc_end`` never skips: the plain solver."""

    acc_start: int = DEFAULTS["acc_start"]
    acc_end: int = DEFAULTS["acc_end"]
    lagrange_int: int = DEFAULTS["lagrange_int"]
    lagrange_step: int = DEFAULTS["lagrange_step"]
    lagrange_term: int = DEFAULTS["lagrange_term"]
    max_interval: int = DEFAULTS["max_interval"]

    def __post_init__(self) -> None:
        if min(self.acc_start, self.acc_end, self.lagrange_term) < 0 or self.max_interval < 1:
            raise ValueError(f"step indices and lagrange_term must be >= 0 and max_interval >= 1; got {self}")
        if self.lagrange_term and (self.lagrange_int < 1 or self.lagrange_step % self.lagrange_int
                                   or self.lagrange_term < 2):
            raise ValueError("with Lagrange skipping, lagrange_int must be >= 1, lagrange_step a multiple of it and "
                             f"lagrange_term >= 2; got {self.lagrange_int}, {self.lagrange_step}, "
                             f"{self.lagrange_term}")

    def skip_kind(self, step: int, stable: bool, skipped_in_a_row: int) -> str | None:
        """Whether the step after ``step`` is skipped: ``"extrapolate"`` (from ẑ and ε), ``"lagrange"``, or None."""
        start = max(self.acc_start, MIN_ACC_START)
        if skipped_in_a_row >= self.max_interval:
            return None
        lagrange = self.lagrange_term > 0
        if stable and start <= step < (self.lagrange_step if lagrange else self.acc_end):
            return "extrapolate"
        if lagrange and step % self.lagrange_int and max(start, self.lagrange_step) <= step < self.acc_end:
            return "lagrange"
        return None


def _training_betas(model_sampling: Any) -> torch.Tensor:
    """β_t = 1 − ᾱ_t/ᾱ_{t−1} of the model's training schedule, from its sigmas (ᾱ = 1/(1 + σ²))."""
    alphas_cumprod = 1 / (1 + model_sampling.sigmas.detach().double().cpu() ** 2)
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / previous


@torch.no_grad()
def sample_sada(model, x, sigmas, extra_args=None, callback=None, disable=None, solver: str = "euler",
                acc_start: int = DEFAULTS["acc_start"], acc_end: int = DEFAULTS["acc_end"],
                lagrange_int: int = DEFAULTS["lagrange_int"], lagrange_step: int = DEFAULTS["lagrange_step"],
                lagrange_term: int = DEFAULTS["lagrange_term"], max_interval: int = DEFAULTS["max_interval"],
                tokens: Any = None):
    """Euler or DPM-Solver++(2M) with SADA's step skipping (the module docstring), as a k-diffusion sampling
    function: ``model(x, σ)`` is the guided x̂₀, called once per step that is not skipped.

    ``tokens``: the :class:`~.tokens.TokenScores` that SADA's token pruning on the MODEL reads; the sampler records
    in it each computed step's unstable tokens and the skipped steps."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    settings = SadaSettings(acc_start, acc_end, lagrange_int, lagrange_step, lagrange_term, max_interval)
    extra_args = {} if extra_args is None else extra_args
    model_sampling = sampler_model_sampling(model)
    betas = _training_betas(model_sampling)
    ones = _batch_sigma(x)
    count = len(sigmas) - 1
    delta = 1 / count
    drifts: list[torch.Tensor] = []  # f_{n−2}, f_{n−1}
    lagrange_points: list[int] = []
    lagrange_values: list[torch.Tensor] = []
    old_denoised = eps = skipped = None
    in_a_row, skipped_steps = 0, []
    if tokens is not None:
        tokens.start_run()
    for i in range(count):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha, alpha_next = (1 + sigma ** 2) ** -0.5, (1 + sigma_next ** 2) ** -0.5
        if skipped is None:
            denoised = model(x, sigma * ones, **extra_args)
            eps = to_d(x, sigma, denoised)
        else:  # the network call is skipped: x̂₀ extrapolated, ε the last computed
            denoised, skipped = skipped, None
            skipped_steps.append(i)
        _report(callback, x, i, sigma, denoised)
        if settings.lagrange_term and i % settings.lagrange_int == 1:
            lagrange_points = (lagrange_points + [i])[-settings.lagrange_term:]
            kept = denoised / alpha if solver == "euler" else denoised
            lagrange_values = (lagrange_values + [kept])[-settings.lagrange_term:]
        if solver == "euler":
            x_next = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            x_next = dpmpp_2m_step(x, sigmas, i, denoised, old_denoised)
            old_denoised = denoised
        # the stability criterion (module docstring), in float64 scalars for the schedule's terms
        beta = float(betas[int(model_sampling.timestep(sigma.reshape(1)).round().item())])
        sigma_vp = sigma * alpha
        drift = -0.5 * beta * count * (x * alpha) + (0.5 * beta * count / sigma_vp) * eps
        if len(drifts) == 2:
            predicted = x * alpha - delta * (0.625 * drift + 0.75 * drifts[1] - 0.375 * drifts[0])
            score = (x_next - predicted / alpha_next) * ((drift - drifts[1]) - (drifts[1] - drifts[0]))
            kind = settings.skip_kind(i, bool(score.mean() <= 0), in_a_row)
            if kind is not None and i + 1 < count:
                in_a_row += 1
                if tokens is not None:
                    tokens.last_skipped = i + 1
                if kind == "extrapolate":
                    skipped = predicted / alpha_next - sigma_next * eps
                else:
                    skipped = lagrange_extrapolate(lagrange_points, lagrange_values, i + 1)
                    skipped = skipped * alpha_next if solver == "euler" else skipped
            else:
                in_a_row = 0
                if tokens is not None:
                    tokens.record(score)
        drifts = (drifts + [drift])[-2:]
        x = x_next
    logger.info("SADA skipped %d of %d network calls: steps %s", len(skipped_steps), count, skipped_steps)
    return x
