"""Noise schedules in the k-diffusion convention: descending VE sigmas, one more than the steps, usually ending at 0.

Every scheduler of ComfyUI's KSampler (``SCHEDULER_NAMES``, in its order) is here, computed on the same dtype and
rounding path (Python floats and float32 tensors as ComfyUI has them), so that the same model, scheduler and step
count give the same float32 sigmas:

- ``simple``: every (T/n)-th training sigma from the top;
- ``sgm_uniform``/``normal``: timesteps spaced evenly from the last to the first (``normal`` includes the first;
  ``sgm_uniform`` stops one interval short of it, as Stability's sgm code does), σ by log-σ interpolation;
- ``karras``: Karras et al. 2022, Eq. 5, ρ = 7;
- ``exponential``: evenly spaced in log σ;
- ``ddim_uniform``: every ⌊T/n⌋-th training sigma from timestep 1 up (DDIM's "uniform" skip, Song et al. 2021);
- ``beta``: timesteps at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024, "Beta Sampling is All You Need",
  arXiv 2407.12173);
- ``linear_quadratic``: Genmo's Mochi schedule, linear then quadratic in σ/σ_max;
- ``kl_optimal``: evenly spaced in arctan σ (the KL-optimal schedule of Sabour et al. 2024, "Align Your Steps").
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.stats
import torch

from .model_sampling import DiscreteModelSampling

SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")
# KSampler runs these samplers on one step more and drops the penultimate sigma: their last step would otherwise
# be a second-order step into σ = 0 (ComfyUI's ``DISCARD_PENULTIMATE_SIGMA_SAMPLERS``).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset(("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"))
KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6
LINEAR_QUADRATIC_THRESHOLD = 0.025
# SD-Turbo was distilled on these 10 timesteps (Sauer et al. 2023, "Adversarial Diffusion Distillation").
SD_TURBO_TIMESTEPS = tuple(range(999, -1, -100))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0.

    Returns:
        (steps + 1,) float32.
    """
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ evenly spaced in log from σ_max to σ_min, then 0. Returns (steps + 1,) float32."""
    _check_steps(steps)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Align Your Steps' KL-optimal schedule: σ_i = tan((1 − i/(n−1))·atan σ_max + i/(n−1)·atan σ_min), then 0.

    Returns:
        (steps + 1,) float32.
    """
    _check_steps(steps)
    # One step would divide by zero in i/(n−1) (ComfyUI gives NaN there); a single step starts at σ_max.
    fraction = torch.arange(steps, dtype=torch.float32).div_(max(steps - 1, 1))
    sigmas = fraction.new_zeros(steps + 1)
    sigmas[:-1] = (fraction * math.atan(sigma_min) + (1 - fraction) * math.atan(sigma_max)).tan_()
    return sigmas


def simple_sigmas(model_sampling: DiscreteModelSampling, steps: int) -> torch.Tensor:
    """Training sigmas at indices T−1−⌊i·T/n⌋ for i < n, then 0."""
    _check_steps(steps)
    table = model_sampling.sigmas
    stride = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform_sigmas(model_sampling: DiscreteModelSampling, steps: int) -> torch.Tensor:
    """Training sigmas at indices 1, 1+k, 1+2k, ... (k = ⌊T/n⌋), reversed, then 0.

    A zero-SNR-free table's σ at index 1 is far from 0, so 0 is appended; a table whose σ₁ is already ≈ 0 (within
    1e-5) takes one index more instead.
    """
    _check_steps(steps)
    table = model_sampling.sigmas
    first_is_zero = math.isclose(float(table[1]), 0, abs_tol=0.00001)
    values = [] if first_is_zero else [0.0]
    stride = max(len(table) // (steps + 1 if first_is_zero else steps), 1)
    values += [float(table[index]) for index in range(1, len(table), stride)]
    return torch.FloatTensor(values[::-1])


def normal_sigmas(model_sampling: DiscreteModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """σ at timesteps spaced evenly between the timesteps of σ_max and σ_min, then 0.

    ``sgm=True`` ("sgm_uniform") spaces n+1 points and drops the last, so it never reaches σ_min. Without it,
    n points include both ends; when σ_min is already ≈ 0 it is the last sigma, with no 0 after it.
    """
    _check_steps(steps)
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    values = [float(model_sampling.sigma(t)) for t in timesteps]
    return torch.FloatTensor(values + [0.0] if append_zero else values)


def beta_sigmas(model_sampling: DiscreteModelSampling, steps: int, alpha: float = BETA_ALPHA,
                beta: float = BETA_BETA) -> torch.Tensor:
    """Training sigmas at timesteps round(F⁻¹(1 − i/n)·(T−1)), F the Beta(α, β) CDF, repeats dropped, then 0.

    Lee et al. 2024, arXiv 2407.12173: a U-shaped Beta density spends more steps at both ends of the run.
    """
    _check_steps(steps)
    last_index = len(model_sampling.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * last_index)
    values = []
    previous = -1
    for t in timesteps:
        if t != previous:
            values.append(float(model_sampling.sigmas[int(t)]))
        previous = t
    return torch.FloatTensor(values + [0.0])


def linear_quadratic_sigmas(model_sampling: DiscreteModelSampling, steps: int,
                            threshold_noise: float = LINEAR_QUADRATIC_THRESHOLD,
                            linear_steps: int | None = None) -> torch.Tensor:
    """Genmo's Mochi schedule on σ/σ_max: n/2 linear steps down to ``threshold_noise``, then a quadratic to 1.

    In "time" u = 1 − σ/σ_max: u_i = i·τ/L for i < L (L linear steps, τ the threshold), then
    u_i = a·i² + b·i + c for L ≤ i < n, with a, b, c chosen so that the quadratic continues the line at i = L and
    reaches 1 at i = n. The sigmas are (1 − u)·σ_max.
    """
    _check_steps(steps)
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_part = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic_part = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - u for u in linear_part + quadratic_part + [1.0]]
    return torch.FloatTensor(schedule) * model_sampling.sigma_max.cpu()


def scheduler_sigmas(model_sampling: DiscreteModelSampling, name: str, steps: int) -> torch.Tensor:
    """The sigmas of scheduler ``name`` (one of :data:`SCHEDULER_NAMES`) for ``steps`` steps.

    Returns:
        Descending float32 sigmas on the CPU, of shape (steps + 1,) (``ddim_uniform`` and ``beta`` may give fewer
        when indices coincide, as ComfyUI's do).
    """
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}; got {name!r}")
    if name in _RANGE_SCHEDULERS:
        return _RANGE_SCHEDULERS[name](steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))
    return _TABLE_SCHEDULERS[name](model_sampling, steps)


# Schedulers that need only the model's sigma range, and those that read its sigma table.
_RANGE_SCHEDULERS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "kl_optimal": kl_optimal_sigmas}
_TABLE_SCHEDULERS = {"simple": simple_sigmas, "sgm_uniform": functools.partial(normal_sigmas, sgm=True),
                     "ddim_uniform": ddim_uniform_sigmas, "beta": beta_sigmas, "normal": normal_sigmas,
                     "linear_quadratic": linear_quadratic_sigmas}


def _check_denoise(denoise: float) -> None:
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1]; got {denoise}")


def ksampler_sigmas(model_sampling: DiscreteModelSampling, scheduler: str, steps: int, denoise: float = 1.0,
                    sampler_name: str | None = None) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler node runs: ``steps`` steps, the last ``denoise`` fraction of a longer schedule.

    With denoise < 0.9999 the scheduler is asked for ⌊steps/denoise⌋ steps and the last steps+1 sigmas are kept
    (an img2img run starts part-way down); denoise 0 gives no sigmas (nothing to run). The samplers in
    :data:`DISCARD_PENULTIMATE_SIGMA_SAMPLERS` get one step more with the penultimate sigma dropped.

    Returns:
        (steps + 1,) float32 sigmas, or an empty tensor for denoise 0.
    """
    _check_steps(steps)
    _check_denoise(denoise)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total_steps = steps if denoise > 0.9999 else int(steps / denoise)
    discard_penultimate = sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = scheduler_sigmas(model_sampling, scheduler, total_steps + discard_penultimate)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas if denoise > 0.9999 else sigmas[-(steps + 1):]


def basic_scheduler_sigmas(model_sampling: DiscreteModelSampling, scheduler: str, steps: int,
                           denoise: float = 1.0) -> torch.Tensor:
    """The sigmas of ComfyUI's BasicScheduler node: as :func:`ksampler_sigmas`, but denoise < 1 (not < 0.9999)
    stretches the schedule, and no sampler drops a sigma (the SAMPLER is chosen elsewhere)."""
    _check_steps(steps)
    _check_denoise(denoise)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total_steps = steps if denoise >= 1.0 else int(steps / denoise)
    return scheduler_sigmas(model_sampling, scheduler, total_steps)[-(steps + 1):]


def sd_turbo_sigmas(model_sampling: DiscreteModelSampling, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI's SDTurboScheduler: σ at ``steps`` of SD-Turbo's timesteps 999, 899, ..., 99, then 0.

    A run with denoise < 1 skips the first 10 − ⌊10·denoise⌋ of them (img2img starts lower).

    Returns:
        (k + 1,) float32 sigmas, k = min(steps, timesteps left after the skip).
    """
    if not 1 <= steps <= len(SD_TURBO_TIMESTEPS):
        raise ValueError(f"steps must be in [1, {len(SD_TURBO_TIMESTEPS)}]; got {steps}")
    _check_denoise(denoise)
    start = len(SD_TURBO_TIMESTEPS) - int(len(SD_TURBO_TIMESTEPS) * denoise)
    timesteps = torch.tensor(SD_TURBO_TIMESTEPS[start:start + steps])
    return _append_zero(model_sampling.sigma(timesteps))


def split_sigmas(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's SplitSigmas: (σ_0..σ_step, σ_step..σ_end), the two runs sharing the sigma at ``step``."""
    _check_sigmas(sigmas)
    return sigmas[:step + 1], sigmas[step:]


def split_sigmas_denoise(sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's SplitSigmasDenoise: the last round(n·denoise) steps go to the second run, sharing one sigma."""
    _check_sigmas(sigmas)
    _check_denoise(denoise)
    total_steps = round(max(sigmas.shape[-1] - 1, 0) * denoise)
    # With no steps for the second run, sigmas[:-0] leaves the first run empty too, as in ComfyUI.
    return sigmas[:-total_steps], sigmas[-(total_steps + 1):]


def step_range(sigmas: torch.Tensor, start_step: int | None = None, last_step: int | None = None,
               force_full_denoise: bool = False) -> torch.Tensor:
    """The part of a schedule KSamplerAdvanced runs: steps start_step..last_step (ComfyUI's ``KSampler.sample``).

    A last step before the end cuts the schedule there; ``force_full_denoise`` then sets its final sigma to 0.
    A start step at or past the end leaves nothing to run: an empty tensor (the caller returns the latent as is).
    """
    _check_sigmas(sigmas)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return sigmas[:0]
        sigmas = sigmas[start_step:]
    return sigmas


def _check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D; got shape {tuple(sigmas.shape)}")
