"""ComfyUI's samplers, by its names, as update rules on the VE probability-flow ODE/SDE (the k-diffusion convention).

A sampling function is ``f(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x``:

- ``model(x, sigma * ones(B), **extra_args)`` returns the guided denoised estimate x̂₀ (B, C, h, w);
- ``x`` is the VE latent x = x₀ + σ·ε at ``sigmas[0]`` (already scaled by :meth:`noise_scaling`);
- ``sigmas`` (n+1,) float32, descending, usually ending at 0;
- ``extra_args["seed"]`` seeds the ancestral and SDE noise exactly as ComfyUI does (:mod:`.noise`);
- ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step, before the step;
- ``disable`` is kept for the convention (it turns off k-diffusion's progress bar); progress goes through
  ``callback`` here.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the ODE is
dx/dσ = d(x, σ) = (x − x̂₀(x, σ))/σ (their Eq. 3 with σ(t) = t). DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models") steps in λ = −log σ (the half log-SNR of the VE
form), with h = λ_next − λ.

:func:`run_sampler` is the one entry point the nodes call: it does what ComfyUI's ``KSAMPLER.sample`` does around the
sampling function (max-denoise detection, noise scaling, the inpaint mask blend, inverse noise scaling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ..common.comfy_host import comfy_module
from .model_sampling import DiscreteModelSampling, is_flow_sampling
from .momentum import HeavyBall
from .noise import BrownianTreeNoiseSampler, NoiseSampler, default_noise_sampler

StepCallback = Callable[[dict[str, Any]], None]


class Denoised(Protocol):
    """The model a sampling function steps with: the guided x̂₀ at VE latents ``x`` (B, ...) and sigmas (B,)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor: ...


class SamplingFunction(Protocol):
    def __call__(self, model: Denoised, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: StepCallback | None = None, disable: bool | None = None, **options: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------- shared pieces

def _batch_sigma(x: torch.Tensor) -> torch.Tensor:
    """ones(B): the per-sample sigma is sigma·ones(B)."""
    return x.new_ones([x.shape[0]])


def _append_dims(value: torch.Tensor, ndim: int) -> torch.Tensor:
    return value[(...,) + (None,) * (ndim - value.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's derivative dx/dσ = (x − x̂₀)/σ (Karras et al. 2022, Eq. 3 with σ(t) = t)."""
    return (x - denoised) / _append_dims(sigma, x.ndim)


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Split a step σ_from → σ_to into a deterministic step to σ_down and fresh noise of std σ_up.

    σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = √(σ_to² − σ_up²): with η = 1 this is DDPM's
    ancestral sampling in VE form (the posterior q(x_to | x_from, x₀) variance, Ho et al. 2020, Eq. 7), η = 0 is
    DDIM's deterministic step (Song et al. 2021, Eq. 16).
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _churn(x: torch.Tensor, sigmas: torch.Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise σ_i to σ̂ = (1 + γ)σ_i by adding fresh noise.

    γ = min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], else 0. The noise comes from the global generator, as in
    ComfyUI (churn is off by default).
    """
    gamma = 0.0
    if s_churn > 0 and s_tmin <= sigmas[i] <= s_tmax:
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1)
    sigma_hat = sigmas[i] * (gamma + 1) if gamma > 0 else sigmas[i]
    if gamma > 0:
        x = x + torch.randn_like(x) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _report(callback: StepCallback | None, x: torch.Tensor, i: int, sigma: torch.Tensor, denoised: torch.Tensor,
            sigma_hat: torch.Tensor | None = None) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def _seed(extra_args: Mapping[str, Any]) -> int | None:
    return extra_args.get("seed")


def sampler_model_sampling(model: Denoised) -> Any:
    """The sigma table of the model a sampling function steps with (``timestep(σ)``, ``sigma(t)``): the denoiser of
    :func:`run_sampler` carries it; inside ComfyUI, ``KSAMPLER``'s wrapper reaches it through its guider's
    ``ModelPatcher``, as ComfyUI's own samplers read it.

    Raises:
        ValueError: the model carries neither.
    """
    sampling = getattr(model, "model_sampling", None)
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    if sampling is None and patcher is not None:
        sampling = patcher.get_model_object("model_sampling")
    if sampling is None:
        raise ValueError("this sampler needs the model's sigma table: run it through run_sampler or a ComfyUI "
                         "sampler node")
    return sampling


def _check_discrete_vp(sampling: Any, name: str) -> None:
    """Refuse a sampling view the sampler's VE re-noising does not hold for: a flow's (CONST, Atelier's rectified
    flow) or a NoiseShift-patched one (its timestep(σ) is the shifted one, its sigma(t) is not)."""
    if getattr(sampling, "noise_shift", None) is not None:
        raise ValueError(f"{name} reads the model's timestep table, which NoiseShift shifts: sample the model from "
                         f"before NoiseShift Apply")
    if is_flow_sampling(sampling):
        raise ValueError(f"{name} re-noises on a diffusion model's VE sigmas; this model samples as a flow")


def _brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping[str, Any],
                    cpu: bool) -> NoiseSampler:
    """A Brownian tree over the run's positive sigma range, seeded with the run's seed."""
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=_seed(extra_args), cpu=cpu)


# --------------------------------------------------------------------------------------------- first order, Euler

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler steps x ← x + d(x, σ̂)·(σ_next − σ̂) (Karras et al. 2022, Algorithm 2 without the Heun correction)."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Euler to σ_down, then fresh noise of std σ_up (:func:`ancestral_step`); the last step to σ = 0 is x̂₀."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# ------------------------------------------------------------------------------------------ second order, one step

@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun's method (Karras et al. 2022, Algorithm 2): average the slopes at both ends; Euler into σ = 0."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * ones, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], denoised, sigma_hat)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, sigmas[i + 1] * ones, **extra_args))
            x = x + (d + d_next) / 2 * dt
    return x


def _log_midpoint(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """√(σ_from·σ_to): the midpoint in log σ (DPM-Solver-2's intermediate point, Lu et al. 2022, Algorithm 1)."""
    return sigma_from.log().lerp(sigma_to.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Midpoint steps: Euler to the log-midpoint σ_mid, then the full step with the slope there (DPM-Solver-2 in
    Karras et al.'s form, their Algorithm 2 with the midpoint rule); Euler into σ = 0."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * ones, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], denoised, sigma_hat)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * ones, **extra_args))
            x = x + d_mid * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """:func:`sample_dpm_2` to σ_down, then fresh noise of std σ_up (:func:`ancestral_step`)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * ones, **extra_args))
            x = x + d_mid * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# ---------------------------------------------------------------------------------------------- linear multistep

def linear_multistep_coeff(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, ℓ_j the Lagrange basis polynomial through σ_i, σ_{i−1}, ..., σ_{i−order+1}
    that is 1 at σ_{i−j}: the weight of d_{i−j} in the order-``order`` Adams–Bashforth step in σ.

    Integrated exactly (ComfyUI integrates numerically; both are exact to rounding for these cubics at most).
    """
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}: it needs {order - 1} earlier steps")
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep: Adams–Bashforth in σ on up to ``order`` past slopes, its weights integrated from the
    Lagrange basis on the actual (uneven) sigmas (k-diffusion's LMS); the last step to σ = 0 is x̂₀."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    sigmas_cpu = sigmas.detach().cpu().numpy().astype(np.float64)
    slopes = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        slopes.append(to_d(x, sigmas[i], denoised))
        if len(slopes) > order:
            slopes.pop(0)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current_order = min(i + 1, order)
            coeffs = [linear_multistep_coeff(current_order, sigmas_cpu, i, j) for j in range(current_order)]
            x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(slopes)))
    return x


# iPNDM's Adams–Bashforth weights for equal steps: (integer weights, newest slope first; common denominator).
IPNDM_WEIGHTS = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Improved PNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", §4):
    Adams–Bashforth steps in σ with the fixed weights of :data:`IPNDM_WEIGHTS`, warming up from Euler; the last
    step to σ = 0 is x̂₀."""
    if max_order not in IPNDM_WEIGHTS:
        raise ValueError(f"max_order must be one of {tuple(IPNDM_WEIGHTS)}; got {max_order}")
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    past_slopes: list[torch.Tensor] = []  # oldest first, at most max_order − 1
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            weights, denominator = IPNDM_WEIGHTS[min(max_order, i + 1)]
            slopes = [d] + past_slopes[::-1]
            combined = weights[0] * d
            for weight, slope in zip(weights[1:], slopes[1:]):
                combined = combined + weight * slope
            x_next = x + (sigmas[i + 1] - sigmas[i]) * combined / denominator
        past_slopes = (past_slopes + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


# ------------------------------------------------------------------------------------------------ DPM-Solver++

def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """λ = −log σ, the half log-SNR log(α/σ_VP) of the VE form."""
    return sigma.log().neg()


def _sigma_of_lambda(lam: torch.Tensor) -> torch.Tensor:
    return lam.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, r = 1/2) to σ_down, then fresh noise of std σ_up.

    With h = λ_down − λ and s = λ + h/2: u = (σ_s/σ)·x − (e^{−h/2} − 1)·x̂₀(x, σ), then
    x ← (σ_down/σ)·x − (e^{−h} − 1)·x̂₀(u, σ_s). Euler into σ = 0.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = _lambda(sigmas[i]), _lambda(sigma_down)
            h = lam_next - lam
            sigma_s = _sigma_of_lambda(lam + h / 2)
            x_mid = (sigma_s / _sigma_of_lambda(lam)) * x - (-h / 2).expm1() * denoised
            denoised_mid = model(x_mid, sigma_s * ones, **extra_args)
            x = (_sigma_of_lambda(lam_next) / _sigma_of_lambda(lam)) * x - (-h).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2, cpu_noise=True):
    """Stochastic DPM-Solver++ (Lu et al. 2022, singlestep 2S with the intermediate point at λ + r·h), each of its
    two substeps made ancestral with Brownian-tree noise.

    A substep from σ to a target σ' is split by :func:`ancestral_step` into σ'_down and σ'_up; with
    h' = λ(σ'_down) − λ(σ) it moves x ← e^{−h'}·x − (e^{−h'} − 1)·D (first-order DPM-Solver++, i.e. DDIM, to σ'_down)
    and adds σ'_up·s_noise of noise. The first substep goes to the intermediate σ_r = e^{−(λ + r·h)} with
    D = x̂₀(x, σ); the second to σ_next with D = (1 − 1/(2r))·x̂₀(x, σ) + 1/(2r)·x̂₀(x_r, σ_r). The VP factors
    α = σ·e^{λ} (1 in exact arithmetic) are kept as computed, for ComfyUI's rounding. The last step to σ = 0 is x̂₀.
    """
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_noise) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = lam_t - lam_s
        lam_mid = lam_s + r * h
        sigma_mid = _sigma_of_lambda(lam_mid)
        # α = σ·e^λ, which is 1 in the VE form up to rounding; kept as computed for ComfyUI's rounding.
        alpha_s, alpha_mid, alpha_t = sigmas[i] * lam_s.exp(), sigma_mid * lam_mid.exp(), sigmas[i + 1] * lam_t.exp()
        # Step 1: to the intermediate point.
        sigma_down, sigma_up = ancestral_step(_sigma_of_lambda(lam_s), _sigma_of_lambda(lam_mid), eta)
        h_down = _lambda(sigma_down) - lam_s
        x_mid = (alpha_mid / alpha_s) * (-h_down).exp() * x - alpha_mid * (-h_down).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_mid = x_mid + alpha_mid * noise_sampler(sigmas[i], sigma_mid) * s_noise * sigma_up
        denoised_mid = model(x_mid, sigma_mid * ones, **extra_args)
        # Step 2: the full step with the blended estimate.
        sigma_down, sigma_up = ancestral_step(_sigma_of_lambda(lam_s), _sigma_of_lambda(lam_t), eta)
        h_down = _lambda(sigma_down) - lam_s
        blend = 1 / (2 * r)
        denoised_blend = (1 - blend) * denoised + blend * denoised_mid
        x = (alpha_t / alpha_s) * (-h_down).exp() * x - alpha_t * (-h_down).expm1() * denoised_blend
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, beta=1.0):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x ← (σ_next/σ)·x − (e^{−h} − 1)·D, with
    D = (1 + 1/(2r))·x̂₀ − 1/(2r)·x̂₀_prev, r = h_prev/h (first order on the first step and into σ = 0).

    ``beta`` below 1 is HB-DPM++2M (Wizadwongsa et al. 2024): Polyak's heavy ball on the 2M estimate,
    D ← (1 − β)·D_prev + β·D, its velocity starting at the first 2M estimate, while the first-order steps take x̂₀
    as it is (the official ``MomentumDPMSolverMultistepScheduler``; :func:`~.dpm_solver.dpmpp_sample` on a VP grid).
    ``beta`` 1 is ComfyUI's dpmpp_2m, bit for bit (:class:`~.momentum.HeavyBall`).
    """
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    old_denoised = None
    heavy_ball = HeavyBall(beta)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = dpmpp_2m_step(x, sigmas, i, denoised, old_denoised, heavy_ball)
        old_denoised = denoised
    return x


def dpmpp_2m_step(x: torch.Tensor, sigmas: torch.Tensor, i: int, denoised: torch.Tensor,
                  old_denoised: torch.Tensor | None, heavy_ball: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """One DPM-Solver++(2M) step from ``sigmas[i]`` to ``sigmas[i + 1]`` (see :func:`sample_dpmpp_2m`); first order
    without a previous x̂₀ and into σ = 0. ``heavy_ball`` smooths the second-order estimate (HB-DPM++2M)."""
    lam, lam_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
    h = lam_next - lam
    if old_denoised is None or sigmas[i + 1] == 0:
        estimate = denoised
    else:
        r = (lam - _lambda(sigmas[i - 1])) / h
        estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        if heavy_ball is not None:
            estimate = heavy_ball(estimate)
    return (_sigma_of_lambda(lam_next) / _sigma_of_lambda(lam)) * x - (-h).expm1() * estimate


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", cpu_noise=True):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, Appendix: the SDE variant of multistep DPM-Solver++).

    With h = λ_next − λ and ĥ = (1 + η)·h, the first-order part is the exact solution of the data-prediction SDE
    for a constant x̂₀: x ← (σ_next/σ)·e^{−ηh}·x + (1 − e^{−ĥ})·x̂₀ + σ_next·√(1 − e^{−2ηh})·s_noise·n, n from the
    Brownian tree (η = 0 is DPM-Solver++(2M)'s ODE step). The second-order term, with r = h_prev/h and
    D = (x̂₀ − x̂₀_prev)/r, is ½(1 − e^{−ĥ})·D ("midpoint") or (1 − (1 − e^{−ĥ})/ĥ)·D ("heun").
    The last step to σ = 0 is x̂₀.
    """
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint'; got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_noise) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
            h = lam_next - lam
            h_eta = h * (eta + 1)
            alpha_next = sigmas[i + 1] * lam_next.exp()  # 1 in the VE form, up to rounding
            one_minus_decay = (-h_eta).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_next * one_minus_decay * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_next * (one_minus_decay / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_next * one_minus_decay * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, cpu_noise=True):
    """DPM-Solver++(3M) SDE: :func:`sample_dpmpp_2m_sde`'s first-order part plus φ₂·D1 − φ₃·D2.

    D1 and D2 are the first and second divided differences of x̂₀ in λ over the last three steps, scaled by h
    (Lu et al. 2022, multistep third order), with φ₂ = (e^{−ĥ} − 1)/ĥ + 1 and φ₃ = φ₂/ĥ − ½ (the h·φ-functions of
    the exponential integrator). The second step is second order, the first first order; the last step to σ = 0
    is x̂₀.
    """
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_noise) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
            h = lam_next - lam
            h_eta = h * (eta + 1)
            alpha_next = sigmas[i + 1] * lam_next.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_next * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_next * phi_2) * d1 - (alpha_next * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_next * phi_2) * d
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ------------------------------------------------------------------------------ DPM-Solver (singlestep, adaptive)

def _dpm_eps(model, x: torch.Tensor, lam: torch.Tensor, extra_args: Mapping[str, Any]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(ε, x̂₀) at λ: the noise prediction ε = (x − x̂₀)/σ that DPM-Solver steps with."""
    sigma = _sigma_of_lambda(lam)
    denoised = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
    return (x - denoised) / sigma, denoised


def _dpm_solver_1(x, lam, lam_next, eps):
    """DPM-Solver-1 (Lu et al. 2022, Eq. 3.7; DDIM): x − σ_next·(e^h − 1)·ε, h = λ_next − λ."""
    return x - _sigma_of_lambda(lam_next) * (lam_next - lam).expm1() * eps


def _dpm_solver_2(model, x, lam, lam_next, eps, extra_args, r1=1 / 2):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1): one evaluation at λ + r₁h. Returns (x_next, ε there)."""
    h = lam_next - lam
    s1 = lam + r1 * h
    u1 = x - _sigma_of_lambda(s1) * (r1 * h).expm1() * eps
    eps_1, _ = _dpm_eps(model, u1, s1, extra_args)
    sigma_next = _sigma_of_lambda(lam_next)
    return x - sigma_next * h.expm1() * eps - sigma_next / (2 * r1) * h.expm1() * (eps_1 - eps), eps_1


def _dpm_solver_3(model, x, lam, lam_next, eps, extra_args, eps_1=None, r1=1 / 3, r2=2 / 3):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2): evaluations at λ + r₁h (reused when given) and λ + r₂h."""
    h = lam_next - lam
    s1, s2 = lam + r1 * h, lam + r2 * h
    if eps_1 is None:
        u1 = x - _sigma_of_lambda(s1) * (r1 * h).expm1() * eps
        eps_1, _ = _dpm_eps(model, u1, s1, extra_args)
    sigma_2 = _sigma_of_lambda(s2)
    u2 = (x - sigma_2 * (r2 * h).expm1() * eps
          - sigma_2 * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
    eps_2, _ = _dpm_eps(model, u2, s2, extra_args)
    sigma_next = _sigma_of_lambda(lam_next)
    return x - sigma_next * h.expm1() * eps - sigma_next / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _dpm_range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ at σ_max, λ at σ_min) of a schedule: DPM-Solver spaces its own steps and never reaches σ = 0, so a
    final 0 is replaced by the sigma before it."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return _lambda(sigmas[0].clone()), _lambda(sigma_min.clone())


def _dpm_ancestral(lam, lam_next, lam_end, eta):
    """The target λ and the noise std of an ancestral DPM-Solver step (no noise when η = 0)."""
    if not eta:
        return lam_next, 0.0
    sigma_down, _ = ancestral_step(_sigma_of_lambda(lam), _sigma_of_lambda(lam_next), eta)
    lam_down = torch.minimum(lam_end, _lambda(sigma_down))
    return lam_down, (_sigma_of_lambda(lam_next) ** 2 - _sigma_of_lambda(lam_down) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                    noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, §3.4): n = len(sigmas) − 1 evaluations spent on ⌊n/3⌋ + 1 steps evenly
    spaced in λ between σ_max and σ_min (only the schedule's ends are used), third order but for the last one or
    two steps (orders [3, ..., 3, n mod 3] or [3, ..., 3, 2, 1]). It stops at σ_min."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    evaluations = len(sigmas) - 1
    lam_start, lam_end = _dpm_range(sigmas)
    steps = evaluations // 3 + 1
    lams = torch.linspace(lam_start, lam_end, steps + 1, device=x.device)
    orders = [3] * (steps - 2) + [2, 1] if evaluations % 3 == 0 else [3] * (steps - 1) + [evaluations % 3]
    for i, order in enumerate(orders):
        lam, lam_next = lams[i], lams[i + 1]
        lam_target, noise_std = _dpm_ancestral(lam, lam_next, lam_end, eta)
        eps, denoised = _dpm_eps(model, x, lam, extra_args)
        _report(callback, x, i, _sigma_of_lambda(lam), denoised)
        if order == 1:
            x = _dpm_solver_1(x, lam, lam_target, eps)
        elif order == 2:
            x, _ = _dpm_solver_2(model, x, lam, lam_target, eps, extra_args)
        else:
            x = _dpm_solver_3(model, x, lam, lam_target, eps, extra_args)
        x = x + noise_std * s_noise * noise_sampler(_sigma_of_lambda(lam), _sigma_of_lambda(lam_next))
    return x


class _PIDStepSize:
    """Step-size control by a digital PID filter on the error (Söderlind 2003, "Digital filters in adaptive
    time-stepping"): h ← h·κ(∏ (1/ε_k)^{b_k}) with κ(u) = 1 + atan(u − 1); a step is accepted when the factor is
    at least ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []

    def propose_step(self, error: torch.Tensor) -> bool:
        inverse_error = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse_error] * 3
        self.inverse_errors[0] = inverse_error
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0 ** self.b1 * e1 ** self.b2 * e2 ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[2], self.inverse_errors[1] = e1, e0
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0,
                        s_noise=1.0, noise_sampler=None):
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, Algorithm 4): each step runs orders p − 1 and p
    on the same evaluations, and their scaled difference ‖(x_low − x_high)/max(atol, rtol·|x|)‖/√N drives the
    step size (:class:`_PIDStepSize`). Only the schedule's ends are used; it stops at σ_min. The callback's
    ``"i"`` counts attempted steps, rejected ones included."""
    if len(sigmas) <= 1:
        return x
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3; got {order}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    lam, lam_end = _dpm_range(sigmas)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    x_prev = x
    controller = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    attempts = 0
    while lam < lam_end - 1e-5:
        lam_next = torch.minimum(lam_end, lam + controller.h)
        lam_target, noise_std = _dpm_ancestral(lam, lam_next, lam_end, eta)
        eps, denoised = _dpm_eps(model, x, lam, extra_args)
        if order == 2:
            x_low = _dpm_solver_1(x, lam, lam_target, eps)
            x_high, _ = _dpm_solver_2(model, x, lam, lam_target, eps, extra_args)
        else:
            x_low, eps_1 = _dpm_solver_2(model, x, lam, lam_target, eps, extra_args, r1=1 / 3)
            x_high = _dpm_solver_3(model, x, lam, lam_target, eps, extra_args, eps_1=eps_1)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if controller.propose_step(error):
            x_prev = x_low
            x = x_high + noise_std * s_noise * noise_sampler(_sigma_of_lambda(lam), _sigma_of_lambda(lam_next))
            lam = lam_next
        _report(callback, x, attempts, _sigma_of_lambda(lam), denoised)
        attempts += 1
    return x


# ------------------------------------------------------------------------------------------------------ DEIS

# DEIS's time change (Zhang & Chen 2023, the diff-solvers port ComfyUI uses): the VP-SDE time t whose
# σ(t) = √(exp(½β_d·t² + β_min·t) − 1) runs from EDM's σ_min = 0.002 at t = ε_s to σ_max = 80 at t = 1.
DEIS_EPSILON_S, DEIS_SIGMA_MIN, DEIS_SIGMA_MAX = 1e-3, 0.002, 80
DEIS_INTEGRATION_POINTS = 10000


def _deis_times(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(DEIS time t of each sigma, β₀, β₁): t(σ) = (√(β_min² + 2β_d·log(σ² + 1)) − β_min)/β_d, with
    β₀ = β_min and β₁ = β_min + β_d fitted to the two ends above (σ_min's term in float32, as the reference)."""
    log_low = ((torch.tensor(DEIS_SIGMA_MIN) ** 2 + 1).log() / DEIS_EPSILON_S).double()
    log_high = torch.tensor(math.log(DEIS_SIGMA_MAX ** 2 + 1), dtype=torch.float64)
    beta_d = 2 * (log_low - log_high) / (DEIS_EPSILON_S - 1)
    beta_min = log_high - 0.5 * beta_d
    sigmas = sigmas.detach().cpu()
    times = ((beta_min ** 2 + 2 * beta_d * (sigmas ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return times, beta_min, beta_d + beta_min


def deis_coefficients(sigmas: torch.Tensor, max_order: int) -> list[list[torch.Tensor]]:
    """tAB-DEIS's multistep weights (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator", Eq. 15): C_ij = ∫_{t_i}^{t_{i+1}} −½·(d log α/dτ)/√(α(1 − α))·ℓ_j(τ) dτ in DEIS time, with
    α(τ) = exp(−½τ²(β₁ − β₀) − τβ₀) and ℓ_j the Lagrange basis through the last ``order`` times, integrated by a
    Riemann sum on 10000 points (the reference's rule, kept for its values). Step i has min(i + 1, max_order)
    weights, none for order 1."""
    times, beta_0, beta_1 = _deis_times(sigmas)
    coefficients = []
    for i in range(len(times) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        t, t_next = times[i], times[i + 1]
        taus = torch.linspace(t, t_next, DEIS_INTEGRATION_POINTS)
        dtau = (t_next - t) / DEIS_INTEGRATION_POINTS
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -taus * (beta_1 - beta_0) - beta_0
        integrand = -0.5 * d_log_alpha.float() / torch.sqrt(alpha * (1 - alpha))
        previous = times[[i - k for k in range(order)]]
        step = []
        for j in range(order):
            basis = 1
            for k in range(order):
                if k != j:
                    basis = basis * (taus - previous[k]) / (previous[j] - previous[k])
            step.append(torch.sum(integrand * basis) * dtau)
        coefficients.append(step)
    return coefficients


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    """tAB-DEIS (Zhang & Chen 2023): x_{i+1} = x_i + Σ_j C_ij·d_{i−j} with :func:`deis_coefficients`, d the
    ODE slope (x − x̂₀)/σ; Euler on the first step and into σ = 0."""
    if max_order not in (2, 3, 4):
        raise ValueError(f"max_order must be 2, 3 or 4; got {max_order}")
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    coefficients = deis_coefficients(sigmas, max_order)
    past_slopes: list[torch.Tensor] = []  # oldest first, at most max_order − 1
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = 1 if sigmas[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            weights = [weight.to(x.device) for weight in coefficients[i]]
            x_next = x + weights[0] * d
            for weight, slope in zip(weights[1:], past_slopes[::-1]):
                x_next = x_next + weight * slope
        past_slopes = (past_slopes + [d])[-(max_order - 1):]
        x = x_next
    return x


# ------------------------------------------------------------------------------------------- DDPM and LCM steps

@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral steps (Ho et al. 2020, Eq. 11 with the posterior variance β̃, Eq. 7) in VP form.

    With ᾱ = 1/(σ² + 1), ᾱ' = 1/(σ_next² + 1), α = ᾱ/ᾱ' and ε = (x − x̂₀)/σ, on the VP latent z = x/√(1 + σ²):
    z' = (z − (1 − α)/√(1 − ᾱ)·ε)/√α + √((1 − α)(1 − ᾱ')/(1 − ᾱ))·noise, back to VE by √(1 + σ_next²).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        _report(callback, x, i, sigma, denoised)
        eps = (x - denoised) / sigma
        z = x / torch.sqrt(1.0 + sigma ** 2.0)
        alpha_bar, alpha_bar_next = 1 / (sigma * sigma + 1), 1 / (sigma_next * sigma_next + 1)
        alpha = alpha_bar / alpha_bar_next
        z = (1.0 / alpha).sqrt() * (z - (1 - alpha) * eps / (1 - alpha_bar).sqrt())
        if sigma_next > 0:
            posterior_std = ((1 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt()
            z = z + posterior_std * noise_sampler(sigma, sigma_next)
        x = z * torch.sqrt(1.0 + sigma_next ** 2.0) if sigma_next != 0 else z
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 3): jump to x̂₀, re-noise it to the
    next sigma with fresh noise (x = x̂₀ + σ_next·noise in VE form)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, gamma=0.3):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, "Trajectory
    Consistency Distillation", Algorithm 4; diffusers' ``TCDScheduler.step``), on the VE latent.

    From x at σ with estimate x̂₀ (ε = (x − x̂₀)/σ), the step goes back along the trajectory to the earlier
    timestep s = ⌊(1 − γ)·t(σ_next)⌋ and forward again to σ_next with fresh noise z:
    x_next = x̂₀ + σ_s·ε + √(σ_next² − σ_s²)·z. (diffusers' VP form √(ᾱ_prev/ᾱ_s)·x_s + √(1 − ᾱ_prev/ᾱ_s)·z,
    divided by √ᾱ_prev.) γ = 0 is DDIM; γ = 1 jumps to x̂₀ + σ_min·ε and re-noises, as LCM does. A final σ = 0
    gives x̂₀ (ComfyUI's schedules end there; diffusers' last step stops at t = 0, σ_min, without noise: give
    that σ last to follow it).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    sampling = sampler_model_sampling(model)
    _check_discrete_vp(sampling, "tcd")
    ones = _batch_sigma(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        t_next = sampling.timestep(sigma_next)
        t_s = torch.floor((1.0 - gamma) * t_next.float())
        stochastic = bool(t_s < t_next)
        sigma_s = torch.minimum(sampling.sigma(t_s).to(sigma_next), sigma_next) if stochastic else sigma_next
        x = denoised + sigma_s * (x - denoised) / sigma
        if stochastic:
            x = x + noise_sampler(sigma, sigma_next) * (sigma_next ** 2 - sigma_s ** 2).sqrt()
    return x


# ------------------------------------------------------------------------------------------------------- UniPC

def _vp_log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    """log α = ½·log ᾱ = ½·log(1/(σ² + 1)) of the VP form."""
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _vp_std(sigma: torch.Tensor) -> torch.Tensor:
    """σ_VP = √(1 − α²)."""
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log α − log σ_VP (= −log σ, computed through the VP form as UniPC does)."""
    log_alpha = _vp_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_bh_update(data_prediction, x, previous_x0, previous_t, t, order, variant, use_corrector):
    """One UniPC step with B(h) (Zhao et al. 2023, "UniPC", Algorithm 2 with data prediction, their Eq. 8-9).

    UniP (predictor) of order p from the last p data predictions, then, if ``use_corrector``, UniC: evaluate the
    model at the predicted point and correct with it (order p + 1 at no extra evaluation: the evaluation is reused
    by the next step). B(h) = h ("bh1") or e^h − 1 ("bh2"), h taken as −(λ_t − λ_prev) for data prediction.

    Args:
        data_prediction: (z, t) -> x̂₀ on the VP latent z at times (B,).
        x: (B, ...) VP latent at ``previous_t[-1]``.
        previous_x0, previous_t: the last data predictions and their times (B,), oldest first.
        t: (B,) the time to step to.
    Returns:
        (z at t, x̂₀ at t if the corrector evaluated it, else None).
    """
    dims = x.dim()
    t_prev_0, x0_prev_0 = previous_t[-1], previous_x0[-1]
    lam_prev_0, lam_t = _vp_lambda(t_prev_0), _vp_lambda(t)
    std_prev_0, std_t = _vp_std(t_prev_0), _vp_std(t)
    alpha_t = torch.exp(_vp_log_alpha(t))
    h = lam_t - lam_prev_0

    ratios, differences = [], []
    for k in range(1, order):
        r_k = ((_vp_lambda(previous_t[-(k + 1)]) - lam_prev_0) / h)[0]
        ratios.append(r_k)
        differences.append((previous_x0[-(k + 1)] - x0_prev_0) / r_k)
    ratios.append(1.0)
    ratios = torch.tensor(ratios, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)  # h·φ₁(h) = e^h − 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(ratios, k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    system = torch.stack(rows)
    rhs = torch.tensor(rhs, device=x.device)

    prediction = correction = 0
    if order > 1:
        differences = torch.stack(differences, dim=1)  # (B, K, ...)
        # Order 2's predictor weight is fixed at 1/2 (the paper's simplified UniP-2).
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(system[:-1, :-1], rhs[:-1])
        prediction = torch.tensordot(differences, rhos_p, dims=([1], [0]))

    x_first_order = (_append_dims(std_t / std_prev_0, dims) * x
                     - _append_dims(alpha_t * h_phi_1, dims) * x0_prev_0)
    x_t = x_first_order - _append_dims(alpha_t * b_h, dims) * prediction
    x0_t = None
    if use_corrector:
        # Order 1's corrector weight is fixed at 1/2 likewise.
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(system, rhs)
        x0_t = data_prediction(x_t, t)
        if order > 1:
            correction = torch.tensordot(differences, rhos_c[:-1], dims=([1], [0]))
        x_t = x_first_order - _append_dims(alpha_t * b_h, dims) * (correction + rhos_c[-1] * (x0_t - x0_prev_0))
    return x_t, x0_t


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """UniPC multistep (Zhao et al. 2023), data prediction, order min(3, n − 1), lower order on the first and last
    steps, in the VP form z = x/√(1 + σ²). A final sigma of 0 is replaced by 0.001 (log σ must stay finite); the
    result is divided by that point's α, x̂₀-like.

    ComfyUI converts the model to ε and back: ε = (x − x̂₀)/σ, x̂₀ = (z − σ_VP·ε)/α; done the same way here.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    times = sigmas.clone()
    if times[-1] == 0:
        times[-1] = 0.001
    steps = len(times) - 1

    def data_prediction(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _append_dims(t, z.ndim)
        x_ve = z * ((sigma ** 2 + 1.0) ** 0.5)
        eps = (x_ve - model(x_ve, t, **extra_args)) / sigma
        return (z - _append_dims(_vp_std(t), z.ndim) * eps) / _append_dims(torch.exp(_vp_log_alpha(t)), z.ndim)

    z = x / torch.sqrt(1.0 + times[0] ** 2.0)
    order = min(3, len(times) - 2)
    batch = z.shape[0]
    previous_x0: list[torch.Tensor] = []
    previous_t: list[torch.Tensor] = []
    for step_index in range(steps):
        if step_index == 0:
            t = times[0].expand(batch)
            previous_x0, previous_t = [data_prediction(z, t)], [t]
        elif step_index < order:  # warm-up: lower-order steps until `order` predictions are stored
            t = times[step_index].expand(batch)
            z, x0 = _unipc_bh_update(data_prediction, z, previous_x0, previous_t, t, step_index, variant, True)
            previous_x0.append(data_prediction(z, t) if x0 is None else x0)
            previous_t.append(t)
        else:
            # The last step also takes the final step to times[steps], without the corrector (no evaluation).
            for step in range(step_index, step_index + 1 + (step_index == steps - 1)):
                t = times[step].expand(batch)
                step_order = min(order, steps + 1 - step)
                z, x0 = _unipc_bh_update(data_prediction, z, previous_x0, previous_t, t, step_order, variant,
                                         use_corrector=step != steps)
                # Slide the window of the last `order` predictions; the final point needs none.
                previous_x0, previous_t = previous_x0[1:] + previous_x0[-1:], previous_t[1:] + [t]
                if step < steps:
                    previous_x0[-1] = data_prediction(z, t) if x0 is None else x0
        if callback is not None:
            sigma = times[step_index]
            callback({"x": z * torch.sqrt(1.0 + sigma ** 2.0), "i": step_index, "sigma": sigma, "sigma_hat": sigma,
                      "denoised": previous_x0[-1]})
    return z / torch.exp(_vp_log_alpha(times[-1]))


@torch.no_grad()
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """:func:`sample_unipc` with B(h) = e^h − 1."""
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, variant="bh2")


# ------------------------------------------------------------------------------------ more of ComfyUI's samplers

@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                   s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (the sd-webui-samplers-scheduler extension's "heunpp2"): a Heun step whose slopes are averaged with
    weights σ/(k·σ₀) instead of ½, over three points (x, the Euler step to σ_{i+1}, and a further Euler step to
    σ_{i+2}) while two steps remain, over two for the penultimate step, and plain Euler for the last."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    sigma_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * ones, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], denoised, sigma_hat)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == sigma_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * ones, **extra_args))
        if sigmas[i + 2] == sigma_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * ones, **extra_args))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable step sizes (Zhang & Chen 2023; the diff-solvers "ipndm_v"): the Adams–Bashforth weights
    of :func:`sample_ipndm` recomputed from the actual step lengths h_n = σ_{n+1} − σ_n, up to order 4."""
    if max_order not in IPNDM_WEIGHTS:
        raise ValueError(f"max_order must be one of {tuple(IPNDM_WEIGHTS)}; got {max_order}")
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    past_slopes: list[torch.Tensor] = []  # oldest first, at most max_order − 1
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            slopes = [d] + past_slopes[::-1]
            coefficients = _ipndm_v_coefficients(sigmas, i, order)
            combined = coefficients[0] * slopes[0]
            for coefficient, slope in zip(coefficients[1:], slopes[1:]):
                combined = combined + coefficient * slope
            x_next = x + (sigmas[i + 1] - sigmas[i]) * combined
        past_slopes = (past_slopes + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


def _ipndm_v_coefficients(sigmas: torch.Tensor, i: int, order: int) -> list:
    """The variable-step Adams–Bashforth weights of orders 1-4 (newest slope first), in the step ratios."""
    if order == 1:
        return [1.0]
    h_n, h_1 = sigmas[i + 1] - sigmas[i], sigmas[i] - sigmas[i - 1]
    if order == 2:
        return [(2 + (h_n / h_1)) / 2, -(h_n / h_1) / 2]
    h_2 = sigmas[i - 1] - sigmas[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_1)) * (h_n * (h_n + h_1)) / (h_1 * (h_1 + h_2))) / 2
    if order == 3:
        return [(2 + (h_n / h_1)) / 2 + temp1, -(h_n / h_1) / 2 - (1 + h_1 / h_2) * temp1, temp1 * h_1 / h_2]
    h_3 = sigmas[i - 2] - sigmas[i - 3]
    temp2 = (((1 - h_n / (3 * (h_n + h_1))) / 2 + (1 - h_n / (2 * (h_n + h_1))) * h_n / (6 * (h_n + h_1 + h_2)))
             * (h_n * (h_n + h_1) * (h_n + h_1 + h_2)) / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3)))
    ratio_21 = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
    return [(2 + (h_n / h_1)) / 2 + temp1 + temp2,
            -(h_n / h_1) / 2 - (1 + h_1 / h_2) * temp1 - (1 + (h_1 / h_2) + ratio_21) * temp2,
            temp1 * h_1 / h_2 + ((h_1 / h_2) + ratio_21 * (1 + h_2 / h_3)) * temp2,
            -temp2 * ratio_21 * h_1 / h_2]


@torch.no_grad()
def _res_multistep(model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta):
    """RES multistep (Zhang et al. 2023, "Improving Diffusion Inference with a Refined Exponential Solver",
    arXiv 2308.02157, the second-order multistep scheme): in λ with h = λ(σ_down) − λ(σ) and
    c₂ = (λ(σ_prev) − λ(σ_down,prev))/h, x ← e^{−h}·x + h·(b₁·x̂₀ + b₂·x̂₀_prev) with b₂ = φ₂(−h)/c₂,
    b₁ = φ₁(−h) − b₂, φ₁(t) = (e^t − 1)/t, φ₂(t) = (φ₁(t) − 1)/t; Euler on the first step and into σ_down = 0;
    then ancestral noise σ_up (η = 0: none)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)

    def phi_1(t):
        return torch.expm1(t) / t

    def phi_2(t):
        return (phi_1(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_old, lam_next = _lambda(sigmas[i]), _lambda(old_sigma_down), _lambda(sigma_down)
            h = lam_next - lam
            c2 = (_lambda(sigmas[i - 1]) - lam_old) / h
            # c₂ = 0 (a repeated sigma) makes both weights NaN; RES then drops to its first-order part.
            b1 = torch.nan_to_num(phi_1(-h) - phi_2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(phi_2(-h) / c2, nan=0.0)
            x = _sigma_of_lambda(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None):
    """:func:`_res_multistep` as an ODE solver (η = 0)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=0.0)


def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    """:func:`_res_multistep` with ancestral noise (η = 1 by default)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=eta)


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
    Optimization Perspective", Algorithm 2): Euler, plus (γ − 1)·(d − d_prev)·Δσ from the second step on, an
    extrapolated slope; the last step to σ = 0 is x̂₀."""
    extra_args = {} if extra_args is None else extra_args
    ones = _batch_sigma(x)
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def _er_sde_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    """ER-SDE-Solver's default noise scale function f(λ) = λ·(e^{λ^0.3} + 10) (Cui et al. 2023, §5)."""
    return x * ((x ** 0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDE for Diffusion
    Models", arXiv 2309.06169, Algorithm for VP data prediction) in the variable λ_ER = σ/α (= σ in the VE form):
    a first-order exponential step scaled by r = f(λ_t)/f(λ_s), plus second and third stages whose integrals of
    1/f are taken numerically on 200 points, plus noise α_t·√(λ_t² − λ_s²·r²)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    noise_scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    ones = _batch_sigma(x)
    num_points = 200.0
    point_index = torch.arange(0, num_points, dtype=torch.float32, device=x.device)
    er_lambdas = _sigma_of_lambda(_lambda(sigmas))  # σ/α, computed through λ as ComfyUI does
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = noise_scaler(lam_t) / noise_scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / num_points
                positions = lam_t + point_index * step
                scaled = noise_scaler(positions)
                integral = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + integral * noise_scaler(lam_t)) * denoised_d
                if stage >= 3:
                    integral_u = torch.sum((positions - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + integral_u * noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                noise_std = (lam_t ** 2 - lam_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * noise_std
        old_denoised = denoised
    return x


def _h_phi_2(h: torch.Tensor) -> torch.Tensor:
    """h·φ₂(h) = (e^h − 1 − h)/h of the exponential integrators."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion
    Models", arXiv 2305.14267, VP data prediction, two stages): an exponential SDE step to λ + r·h, then the full
    step with x̂₀ blended 1 − 1/(2r) : 1/(2r), the stage noises chained so that they form one Brownian path."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = torch.lerp(lam_s, lam_t, r)
        sigma_1 = _sigma_of_lambda(lam_1)
        alpha_1, alpha_t = sigma_1 * lam_1.exp(), sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_1 * torch.expm1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * ones, **extra_args)
        blended = torch.lerp(denoised, denoised_2, 1 / (2 * r))
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * torch.expm1(-h_eta) * blended
        if inject_noise:
            x = x + _chain_noise(sde_noise, (r - 1) * h * eta, noise_sampler(sigma_1, sigmas[i + 1])) * (
                sigmas[i + 1] * s_noise)
    return x


def _chain_noise(previous: torch.Tensor, segment: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The next stage's accumulated noise: the previous one decayed by e^{segment} plus fresh noise of the variance
    that keeps the total that of one path, √(1 − e^{2·segment}) (segment ≤ 0)."""
    return previous * segment.exp() + segment.mul(2).expm1().neg().sqrt() * fresh


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3 (Gonzalez et al. 2023, three stages at λ + r₁h and λ + r₂h), noise chained as in :func:`sample_seeds_2`.

    Stage weights: a₃₂ = (r₂/r₁)·hφ₂(−r₂ĥ), a₃₁ = hφ₁(−r₂ĥ) − a₃₂; b₃ = hφ₂(−ĥ)/r₂, b₁ = hφ₁(−ĥ) − b₃.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    ones = _batch_sigma(x)
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_1, sigma_2 = _sigma_of_lambda(lam_1), _sigma_of_lambda(lam_2)
        alpha_1, alpha_2 = sigma_1 * lam_1.exp(), sigma_2 * lam_2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_1 * torch.expm1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * ones, **extra_args)
        a3_2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a3_1 = torch.expm1(-r_2 * h_eta) - a3_2
        x_3 = sigma_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            sde_noise = _chain_noise(sde_noise, (r_1 - r_2) * h * eta, noise_sampler(sigma_1, sigma_2))
            x_3 = x_3 + sde_noise * sigma_2 * s_noise
        denoised_3 = model(x_3, sigma_2 * ones, **extra_args)
        b3 = _h_phi_2(-h_eta) / r_2
        b1 = torch.expm1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            sde_noise = _chain_noise(sde_noise, (r_2 - 1) * h * eta, noise_sampler(sigma_2, sigmas[i + 1]))
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# ------------------------------------------------------------------------------------------------- SA-Solver

# SA-Solver's default stochastic interval, as fractions of the run (ComfyUI's choice): noise between 20 % and 80 %.
SA_SOLVER_NOISE_INTERVAL = (0.2, 0.8)


def _sa_exponential_coefficients(lam_s: torch.Tensor, lam_t: torch.Tensor, order: int,
                                 tau: float) -> torch.Tensor:
    """(1 + τ²)·∫_{λ_s}^{λ_t} e^{(1+τ²)(λ − λ_t)}·λ^p dλ for p < ``order`` (Xue et al. 2023, Eq. 15's integrals),
    by repeated integration by parts: a lower-triangular matrix of ±p!/(q!·(1 + τ²)^{p−q}) applied to
    λ_t^q − λ_s^q·e^{−(1+τ²)h}."""
    tau_mul = 1 + tau ** 2
    powers = torch.arange(order, dtype=lam_s.dtype, device=lam_s.device)
    boundary_terms = lam_t ** powers - lam_s ** powers * (-tau_mul * (lam_t - lam_s)).exp()
    depth = powers.unsqueeze(1) - powers.unsqueeze(0)
    log_factorial = (powers + 1).lgamma()
    log_coefficients = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_coefficients = log_coefficients - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_coefficients.exp() * signs).tril() @ boundary_terms


def _sa_b_coefficients(sigma_next, lambdas, lam_s, lam_t, tau, simple_order_2, is_corrector):
    """SA-Solver's weights b_i of the past x̂₀ (Xue et al. 2023, Eqs. 15 and 18): α_t times the integrals of the
    Lagrange basis through ``lambdas`` against the exponential kernel; or, with ``simple_order_2`` and two points,
    the simplified order-2 weights of their Appendix D."""
    alpha_t = sigma_next * lam_t.exp()
    if simple_order_2 and lambdas.shape[0] == 2:
        tau_mul, h = 1 + tau ** 2, lam_t - lam_s
        if is_corrector:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h ** 2) / (lambdas[-2] - lam_s)
            b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
        return torch.stack([b_2, b_1])
    integrals = _sa_exponential_coefficients(lam_s, lam_t, lambdas.shape[0], tau)
    vandermonde = torch.vander(lambdas, lambdas.shape[0], increasing=True).T
    return alpha_t * torch.linalg.solve(vandermonde, integrals)


def sa_solver_noise_interval(model_sampling: DiscreteModelSampling, eta: float = 1.0) -> Callable[[Any], float]:
    """τ(σ) = η inside the middle of the run (:data:`SA_SOLVER_NOISE_INTERVAL`, in sigmas of ``model_sampling``),
    0 (an ODE step) outside it."""
    start = model_sampling.percent_to_sigma(SA_SOLVER_NOISE_INTERVAL[0])
    end = model_sampling.percent_to_sigma(SA_SOLVER_NOISE_INTERVAL[1])

    def tau(sigma) -> float:
        if eta <= 0:
            return 0.0
        sigma = sigma.item() if isinstance(sigma, torch.Tensor) else sigma
        return eta if start >= sigma >= end else 0.0

    return tau


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False):
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models"):
    stochastic Adams predictor (order ≤ 3) and corrector (order ≤ 4) in λ, data prediction, with SDE noise of
    strength τ(σ) (``tau_func``; by default :func:`sa_solver_noise_interval` of the model's sampling, which the
    model passed by :func:`run_sampler` carries). Orders drop near a final σ = 0; ``use_pece`` re-evaluates the
    corrected state (PECE)."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=_seed(extra_args)) if noise_sampler is None else noise_sampler
    if tau_func is None:
        tau_func = sa_solver_noise_interval(sampler_model_sampling(model))
    ones = _batch_sigma(x)
    lambdas = _lambda(sigmas)
    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau, noise = 0.0, 0.0, 0.0
    predictions: list[torch.Tensor] = []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * ones, **extra_args)
        _report(callback, x_pred, i, sigmas[i], denoised)
        predictions = (predictions + [denoised])[-max_order:]
        predictor_used = min(predictor_order, len(predictions))
        corrector_used = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order,
                                                                                        len(predictions))
        if lower_order_to_end:
            predictor_used = min(predictor_used, len(sigmas) - 2 - i)
            corrector_used = min(corrector_used, len(sigmas) - 1 - i)
        if corrector_used == 0:
            x = x_pred
        else:
            b = _sa_b_coefficients(sigmas[i], lambdas[i - corrector_used + 1:i + 1], lambdas[i - 1], lambdas[i], tau,
                                   simple_order_2, is_corrector=True)
            history = torch.stack(predictions[-corrector_used:], dim=1)  # (B, K, ...)
            x = sigmas[i] / sigmas[i - 1] * (-(tau ** 2) * h).exp() * x + torch.tensordot(history, b, dims=([1], [0]))
            if tau > 0 and s_noise > 0:
                x = x + noise  # the predictor's noise, shared by predictor and corrector
            if use_pece:
                denoised = model(x, sigmas[i] * ones, **extra_args)
                predictions[-1] = denoised
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            tau = tau_func(sigmas[i + 1])
            b = _sa_b_coefficients(sigmas[i + 1], lambdas[i - predictor_used + 1:i + 1], lambdas[i], lambdas[i + 1],
                                   tau, simple_order_2, is_corrector=False)
            history = torch.stack(predictions[-predictor_used:], dim=1)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = (sigmas[i + 1] / sigmas[i] * (-(tau ** 2) * h).exp() * x
                      + torch.tensordot(history, b, dims=([1], [0])))
            if tau > 0 and s_noise > 0:
                noise = (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * tau ** 2 * h).expm1().neg().sqrt() * s_noise)
                x_pred = x_pred + noise
    return x


# ---------------------------------------------------------------------------------------- names and entry point

# ComfyUI's ddim is its euler; what differs is the inpaint blend, which draws fresh noise (Sampler.fresh_inpaint_noise).
SAMPLING_FUNCTIONS: dict[str, SamplingFunction] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": functools.partial(sample_dpmpp_sde, cpu_noise=False),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": functools.partial(sample_dpmpp_2m_sde, cpu_noise=False),
    "dpmpp_2m_sde_heun": functools.partial(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": functools.partial(sample_dpmpp_2m_sde, solver_type="heun", cpu_noise=False),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": functools.partial(sample_dpmpp_3m_sde, cpu_noise=False),
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "gradient_estimation": sample_gradient_estimation,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": functools.partial(sample_sa_solver, use_pece=True),
    "ddim": sample_euler,
    "uni_pc": sample_unipc,
    "uni_pc_bh2": sample_unipc_bh2,
}
# In ComfyUI's SAMPLER_NAMES order (KSampler's dropdown).
SAMPLER_NAMES = tuple(SAMPLING_FUNCTIONS)
# ComfyUI v0.3.64's whole list, so that a node can accept every name a workflow file may hold. The ones missing from
# SAMPLER_NAMES are refused by name at run time: the *_cfg_pp samplers need the unguided x̂₀ next to the guided one.
COMFYUI_SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2")
# How many times each sampler calls the model per step, for those that call it as often at every step but the
# last ones (where a multi-stage step degenerates): the first call of step i is call i·n, right before the step's
# callback. A LoRA brought in between steps (SwiftDiffusion) needs this; the others (dpm_fast, dpm_adaptive,
# sa_solver_pece) vary, and a LoRA waits for its file before they start.
EVALUATIONS_PER_STEP = {
    **dict.fromkeys(("euler", "euler_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                     "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
                     "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_ancestral", "gradient_estimation",
                     "er_sde", "sa_solver", "ddim", "uni_pc", "uni_pc_bh2"), 1),
    **dict.fromkeys(("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
                     "seeds_2"), 2),
    **dict.fromkeys(("heunpp2", "seeds_3"), 3),
}
# Samplers whose inpaint blend re-noises the kept region with noise of its own (seed + 1), not the run's noise.
FRESH_INPAINT_NOISE_SAMPLERS = frozenset(("ddim",))
FALLBACK_INPAINT_SEED = 41


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What travels on a SAMPLER socket in the standalone app: a sampling function and its options.

    ``Sampler.from_name("euler_ancestral", eta=0.5)`` is what KSamplerSelect (and KSampler) build; any function
    that follows the convention in this module's docstring can be wrapped the same way (Atelier's own samplers).

    Attributes:
        function: the sampling function.
        options: keyword options for it (``eta``, ``s_noise``, ``solver_type`` ...).
        name: the name it was made from, for messages.
        fresh_inpaint_noise: the inpaint blend re-noises the kept region with its own noise (ComfyUI's ddim).
    """

    function: SamplingFunction
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""
    fresh_inpaint_noise: bool = False

    @classmethod
    def from_name(cls, name: str, **options: Any) -> Sampler:
        """The sampler ComfyUI calls ``name`` (one of :data:`SAMPLER_NAMES`), with ``options``."""
        if name in COMFYUI_SAMPLER_NAMES and name not in SAMPLING_FUNCTIONS:
            raise NotImplementedError(f"ComfyUI's sampler {name!r} is not available in Atelier yet; these are: "
                                      f"{', '.join(SAMPLER_NAMES)}")
        if name not in SAMPLING_FUNCTIONS:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}; got {name!r}")
        return cls(SAMPLING_FUNCTIONS[name], dict(options), name, name in FRESH_INPAINT_NOISE_SAMPLERS)

    def for_host(self) -> Any:
        """This sampler as the host's SAMPLER socket carries it: itself in the standalone app; inside ComfyUI, a
        ``comfy.samplers.KSAMPLER`` over the same function and options (``interop.md`` §4), which ComfyUI's
        KSampler family, SamplerCustom and SamplerCustomAdvanced run."""
        comfy_samplers = comfy_module("comfy.samplers")
        if comfy_samplers is None:
            return self
        return comfy_samplers.KSAMPLER(self.function, extra_options=dict(self.options),
                                       inpaint_options={"random": self.fresh_inpaint_noise})

    def sample(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               model_sampling: DiscreteModelSampling, sigmas: torch.Tensor, noise: torch.Tensor,
               latent_image: torch.Tensor, seed: int | None, *, denoise_mask: torch.Tensor | None = None,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Run this sampler as ComfyUI's ``KSAMPLER.sample`` does; see :func:`run_sampler`."""
        _check_run(sigmas, noise, latent_image)
        if sigmas.numel() == 0:
            return latent_image
        device = latent_image.device
        noise, sigmas = noise.to(device), sigmas.to(device)
        if denoise_mask is not None:
            denoise_mask = prepare_mask(denoise_mask, noise.shape).to(device)
        inpaint_noise = noise
        if self.fresh_inpaint_noise:
            # ComfyUI reads the seed as extra_args.get("seed", 41): 41 stands in for a run without one.
            generator = torch.manual_seed((FALLBACK_INPAINT_SEED if seed is None else seed) + 1)
            inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(device)
        model = _InpaintDenoiser(model_fn, model_sampling, latent_image, inpaint_noise, denoise_mask)
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, model_sampling.is_max_denoise(sigmas))
        x = self.function(model, x, sigmas, extra_args={"seed": seed}, callback=callback, disable=True,
                          **self.options)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)


def run_sampler(sampler: str | Sampler | SamplingFunction, model_fn: Callable[[torch.Tensor, torch.Tensor],
                torch.Tensor], model_sampling: DiscreteModelSampling, sigmas: torch.Tensor, noise: torch.Tensor,
                latent_image: torch.Tensor, seed: int | None, *, denoise_mask: torch.Tensor | None = None,
                callback: StepCallback | None = None, options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Sample as ComfyUI's ``comfy.samplers.sample`` with ``KSAMPLER.sample`` does, given a guided denoiser.

    1. A run starting at or above the model's σ_max is "max denoise": the noise is scaled by √(1 + σ₀²), else by σ₀,
       and added to the latent (:meth:`DiscreteModelSampling.noise_scaling`).
    2. With a ``denoise_mask`` (1 = repaint, 0 = keep), every model call sees x·m + (latent + σ·noise)·(1 − m) and
       returns x̂₀·m + latent·(1 − m): the kept region follows the input latent noised to the current σ
       (ComfyUI's ``KSamplerX0Inpaint``). ddim re-noises it with noise drawn from seed + 1.
    3. The sampling function runs with ``extra_args={"seed": seed}``, so ancestral and SDE noise follow the seed.

    Args:
        sampler: a name from :data:`SAMPLER_NAMES`, a :class:`Sampler`, or a sampling function.
        model_fn: (x (B, C, h, w) VE latents, σ (B,)) -> guided x̂₀; conditioning and CFG are inside it.
        model_sampling: the model's sigma table (for max denoise and the noise scaling).
        sigmas: (n + 1,) descending; empty means nothing to do (the latent comes back unchanged).
        noise: (B, C, h, w), from :func:`~.noise.prepare_noise` (zeros for "disable noise").
        latent_image: (B, C, h, w) the input latent as the model sees it (scaled by the VAE factor; zeros for
            text-to-image).
        seed: the run's seed; None draws ancestral noise from the global generator (ComfyUI's DisableNoise).
        denoise_mask: (B or 1, [1,] H, W) or any shape :func:`prepare_mask` accepts, values in [0, 1].
        callback: called once per step with ``{"x", "i", "sigma", "sigma_hat", "denoised"}``.
        options: extra keyword options for the sampling function (merged over a :class:`Sampler`'s own).
    Returns:
        (B, C, h, w) the sampled latent, as the model sees it.
    """
    if isinstance(sampler, str):
        sampler = Sampler.from_name(sampler)
    elif not isinstance(sampler, Sampler):
        sampler = Sampler(sampler, name=getattr(sampler, "__name__", ""))
    if options:
        sampler = dataclasses.replace(sampler, options={**sampler.options, **options})
    return sampler.sample(model_fn, model_sampling, sigmas, noise, latent_image, seed, denoise_mask=denoise_mask,
                          callback=callback)


def prepare_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A noise mask resized to latents of ``shape`` (B, C, h, w): bilinear to (h, w), repeated over the channels
    and over (or cut to) the batch, as ComfyUI's ``reshape_mask`` does. A mask already of ``shape`` is returned as
    it is, so preparing twice changes nothing.

    Args:
        mask: (H, W), (B, H, W), (B, 1, H, W) or ``shape``.
    Returns:
        (B, C, h, w).
    """
    if tuple(mask.shape) == tuple(shape):
        return mask
    if mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must be (H, W), (B, H, W), (B, 1, H, W) or the latent's {tuple(shape)}; got "
                         f"{tuple(mask.shape)}")
    batch, channels = shape[0], shape[1]
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if not mask.is_floating_point():  # a boolean or integer mask; interpolation needs floats
        mask = mask.float()
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    mask = mask.repeat(1, channels, 1, 1)
    if mask.shape[0] < batch:
        mask = mask.repeat(math.ceil(batch / mask.shape[0]), 1, 1, 1)
    return mask[:batch]


class _InpaintDenoiser:
    """The model a sampling function sees: ``model_fn`` with ComfyUI's inpaint blend around it (see run_sampler).

    It carries the model's ``model_sampling``, which samplers with model-dependent defaults read (sa_solver), as
    ComfyUI's samplers read it from their model.
    """

    def __init__(self, model_fn, model_sampling: DiscreteModelSampling, latent_image: torch.Tensor,
                 noise: torch.Tensor, denoise_mask: torch.Tensor | None):
        self.model_fn = model_fn
        self.model_sampling = model_sampling
        self.latent_image = latent_image
        self.noise = noise
        self.denoise_mask = denoise_mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        mask = self.denoise_mask
        if mask is None:
            return self.model_fn(x, sigma)
        keep = 1.0 - mask
        per_sample = sigma.reshape([sigma.shape[0]] + [1] * (x.ndim - 1))
        x = x * mask + self.model_sampling.noise_scaling(per_sample, self.noise, self.latent_image) * keep
        return self.model_fn(x, sigma) * mask + self.latent_image * keep


def _check_run(sigmas: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor) -> None:
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D; got shape {tuple(sigmas.shape)}")
    if noise.shape != latent_image.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and latent {tuple(latent_image.shape)} must have one shape")
    if latent_image.ndim != 4:
        raise ValueError(f"latent_image must be (B, C, h, w); got {tuple(latent_image.shape)}")
