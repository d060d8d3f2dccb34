"""ComfyUI's samplers, schedulers and seeded noise (nodes/sampling/{model_sampling,sigmas,noise,k_samplers}.py).

Three kinds of test:

1. Each rule against its published equation, written out here, on a toy model whose exact denoiser is known:
   Gaussian data x₀ ~ N(μ, s²), for which D(x, σ) = (s²·x + σ²·μ)/(s² + σ²) and the probability-flow ODE has the
   closed-form solution x(σ) = μ + (x(σ_T) − μ)·√((s² + σ²)/(s² + σ_T²)).
2. Properties that follow from the equations: convergence to that exact solution, SDE samplers ending on the data
   distribution, Brownian increments adding up.
3. Agreement with ComfyUI's own functions (within 1e-5), run in a subprocess on ComfyUI's source (its ``nodes``
   module would shadow ours here), on the same toy network, seeds and sigmas.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.stats
import torch

from comfyui_host import COMFYUI_PATH_VARIABLE, comfyui_source
from nodes.common.denoiser import NoiseSchedule
from nodes.sampling import k_samplers
from nodes.sampling.k_samplers import SAMPLER_NAMES, Sampler, ancestral_step, prepare_mask, run_sampler
from nodes.sampling.model_sampling import DiscreteModelSampling, beta_schedule_alphas_cumprod
from nodes.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler, prepare_noise
from nodes.sampling.sigmas import (
    SCHEDULER_NAMES,
    basic_scheduler_sigmas,
    exponential_sigmas,
    karras_sigmas,
    kl_optimal_sigmas,
    ksampler_sigmas,
    scheduler_sigmas,
    sd_turbo_sigmas,
    split_sigmas,
    split_sigmas_denoise,
    step_range,
)

SD = DiscreteModelSampling.from_beta_schedule("epsilon")
DATA_MEAN, DATA_VAR = 0.3, 0.25
SHAPE = (2, 4, 8, 8)


def gaussian_denoiser(x, sigma, **ignored):
    """The exact x̂₀ = E[x₀ | x] for x₀ ~ N(DATA_MEAN, DATA_VAR) and x = x₀ + σ·ε."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    return (DATA_VAR * x + sigma ** 2 * DATA_MEAN) / (DATA_VAR + sigma ** 2)


def exact_ode_solution(x_start, sigma_start, sigma_end):
    return DATA_MEAN + (x_start - DATA_MEAN) * math.sqrt((DATA_VAR + sigma_end ** 2) / (DATA_VAR + sigma_start ** 2))


def fixed_noise_sampler(noise):
    """A noise sampler that always returns ``noise``, so that an equation can use the same draw."""
    return lambda sigma, sigma_next: noise


def start_point(seed=0, sigma=None):
    sigma = float(SD.sigma_max) if sigma is None else sigma
    return prepare_noise(torch.zeros(SHAPE), seed) * sigma


# ------------------------------------------------------------------------------------------------ model sampling

def test_sigmas_are_the_ve_sigmas_of_sds_scaled_linear_schedule_in_float32():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)
    expected = np.sqrt((1 - alpha_bar) / alpha_bar)
    assert SD.sigmas.dtype == torch.float32 and SD.sigmas.shape == (1000,)
    np.testing.assert_allclose(SD.sigmas.numpy(), expected, rtol=1e-6)
    assert float(SD.sigma_min) == SD.sigmas[0] and float(SD.sigma_max) == SD.sigmas[-1]
    assert abs(float(SD.sigma_max) - 14.6146) < 1e-4 and abs(float(SD.sigma_min) - 0.0292) < 1e-4


def test_from_noise_schedule_matches_the_beta_schedule():
    schedule = NoiseSchedule(beta_schedule_alphas_cumprod(), "v_prediction")
    sampling = DiscreteModelSampling.from_noise_schedule(schedule)
    assert sampling.prediction_type == "v_prediction"
    assert torch.equal(sampling.sigmas, DiscreteModelSampling.from_beta_schedule("v_prediction").sigmas)


def test_timestep_and_sigma_invert_each_other_and_interpolate_in_log_sigma():
    timesteps = torch.tensor([0, 1, 250, 999])
    assert torch.equal(SD.timestep(SD.sigma(timesteps)), timesteps)
    halfway = SD.sigma(torch.tensor(500.5))
    expected = math.exp((math.log(SD.sigmas[500]) + math.log(SD.sigmas[501])) / 2)
    assert abs(float(halfway) - expected) < 1e-5 * expected
    assert abs(float(SD.sigma(torch.tensor(-3.0))) - float(SD.sigma_min)) < 1e-7  # clamped to the table
    assert SD.percent_to_sigma(0.0) > 1e8 and SD.percent_to_sigma(1.0) == 0.0
    assert abs(SD.percent_to_sigma(0.5) - float(SD.sigma(torch.tensor(499.5)))) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_calculate_denoised_recovers_x0_from_each_prediction_type(prediction_type):
    sampling = DiscreteModelSampling.from_beta_schedule(prediction_type)
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    sigma = torch.tensor([0.5, 7.0])
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps
    alpha, sigma_vp = 1 / (1 + s ** 2).sqrt(), s / (1 + s ** 2).sqrt()
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(sampling.calculate_denoised(sigma, output, x), x0, atol=2e-5, rtol=1e-5)
    # The network sees the VP latent x/√(1 + σ²) = α·x₀ + σ_VP·ε.
    torch.testing.assert_close(sampling.calculate_input(sigma, x), alpha * x0 + sigma_vp * eps)


def test_lcm_uses_its_50_distilled_timesteps_and_the_consistency_boundary_condition():
    lcm = DiscreteModelSampling.from_beta_schedule("lcm")
    assert lcm.sigmas.shape == (50,)
    assert lcm.timestep(lcm.sigmas).tolist() == list(range(19, 1000, 20))
    assert torch.equal(lcm.sigmas, SD.sigmas[19::20])
    sigma = lcm.sigmas[[10]]  # timestep 219
    x, eps = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    t = 219 * 10.0
    c_skip, c_out = 0.25 / (t ** 2 + 0.25), t / (t ** 2 + 0.25) ** 0.5
    expected = c_skip * x + c_out * (x - float(sigma) * eps)
    torch.testing.assert_close(lcm.calculate_denoised(sigma, eps, x), expected)


def test_noise_scaling_uses_sqrt_one_plus_sigma_squared_only_from_pure_noise():
    noise, latent = torch.ones(SHAPE), torch.full(SHAPE, 2.0)
    sigma = SD.sigma_max
    torch.testing.assert_close(SD.noise_scaling(sigma, noise, latent, max_denoise=True),
                               latent + noise * math.sqrt(1 + float(sigma) ** 2))
    torch.testing.assert_close(SD.noise_scaling(sigma, noise, latent), latent + noise * float(sigma))
    assert SD.is_max_denoise(ksampler_sigmas(SD, "karras", 5))
    assert not SD.is_max_denoise(ksampler_sigmas(SD, "karras", 5, denoise=0.5))


def test_zero_terminal_snr_keeps_the_first_sigma_and_makes_the_last_huge():
    zsnr = DiscreteModelSampling.from_beta_schedule(zero_terminal_snr=True)
    assert abs(float(zsnr.sigmas[0]) - float(SD.sigmas[0])) < 1e-6
    assert abs(float(zsnr.sigma_max) - math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08)) < 0.1


def test_model_sampling_rejects_unknown_prediction_types():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiscreteModelSampling(beta_schedule_alphas_cumprod(), "flow")


# ---------------------------------------------------------------------------------------------------- schedulers

def test_karras_exponential_and_kl_optimal_follow_their_formulas():
    n, lo, hi, rho = 7, 0.03, 14.6, 7.0
    ramp = np.linspace(0, 1, n)
    karras = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho  # Karras et al. 2022, Eq. 5
    np.testing.assert_allclose(karras_sigmas(n, lo, hi).numpy(), np.append(karras, 0), rtol=1e-5)
    np.testing.assert_allclose(exponential_sigmas(n, lo, hi).numpy(), np.append(np.exp(np.linspace(
        np.log(hi), np.log(lo), n)), 0), rtol=1e-5)
    kl = np.tan((1 - ramp) * np.arctan(hi) + ramp * np.arctan(lo))
    np.testing.assert_allclose(kl_optimal_sigmas(n, lo, hi).numpy(), np.append(kl, 0), rtol=1e-5)


def test_table_schedulers_pick_the_training_sigmas_their_rules_name():
    table = SD.sigmas
    steps = 4
    assert scheduler_sigmas(SD, "simple", steps).tolist() == [float(table[999 - 250 * i]) for i in range(4)] + [0.0]
    assert scheduler_sigmas(SD, "ddim_uniform", steps).tolist() == [float(table[i]) for i in (751, 501, 251, 1)] + [0.0]
    normal = scheduler_sigmas(SD, "normal", steps)
    expected = [float(SD.sigma(torch.tensor(t))) for t in np.linspace(999, 0, steps)] + [0.0]
    np.testing.assert_allclose(normal.numpy(), expected, rtol=1e-6)
    sgm = scheduler_sigmas(SD, "sgm_uniform", steps)
    expected = [float(SD.sigma(torch.tensor(t))) for t in np.linspace(999, 0, steps + 1)[:-1]] + [0.0]
    np.testing.assert_allclose(sgm.numpy(), expected, rtol=1e-6)
    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6)
    beta_expected = [float(table[int(t)]) for t in np.rint(quantiles * 999)] + [0.0]
    assert scheduler_sigmas(SD, "beta", steps).tolist() == beta_expected


def test_linear_quadratic_is_linear_then_quadratic_in_sigma_over_sigma_max():
    steps = 10
    u = 1 - scheduler_sigmas(SD, "linear_quadratic", steps).numpy().astype(np.float64) / float(SD.sigma_max)
    np.testing.assert_allclose(u[:5], np.arange(5) * 0.025 / 5, atol=1e-6)  # linear to the threshold
    assert abs(u[-1] - 1) < 1e-6
    second_differences = np.diff(u[5:], 2)
    np.testing.assert_allclose(second_differences, second_differences[0], rtol=1e-3)  # a quadratic


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_descends_from_about_sigma_max_to_zero(name):
    sigmas = scheduler_sigmas(SD, name, 10)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert len(sigmas) == 11 or name in ("ddim_uniform", "beta")


def test_ksampler_denoise_runs_the_tail_of_a_longer_schedule():
    full = scheduler_sigmas(SD, "karras", int(10 / 0.6))
    assert torch.equal(ksampler_sigmas(SD, "karras", 10, denoise=0.6), full[-11:])
    assert ksampler_sigmas(SD, "karras", 10, denoise=0.0).numel() == 0
    longer = scheduler_sigmas(SD, "normal", 11)
    discarded = ksampler_sigmas(SD, "normal", 10, sampler_name="dpm_2")
    assert torch.equal(discarded, torch.cat([longer[:-2], longer[-1:]])) and len(discarded) == 11
    assert torch.equal(basic_scheduler_sigmas(SD, "normal", 10, denoise=0.5), scheduler_sigmas(SD, "normal", 20)[-11:])
    with pytest.raises(ValueError, match="denoise must be in"):
        ksampler_sigmas(SD, "normal", 10, denoise=1.5)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        ksampler_sigmas(SD, "sigmoid", 10)


def test_sd_turbo_sigmas_are_the_sigmas_of_its_ten_timesteps():
    torch.testing.assert_close(sd_turbo_sigmas(SD, 1), torch.tensor([SD.sigmas[999], 0.0]))
    torch.testing.assert_close(sd_turbo_sigmas(SD, 2, denoise=0.5), torch.tensor([SD.sigmas[499], SD.sigmas[399], 0.0]))


def test_splitting_shares_the_boundary_sigma_and_step_range_cuts_like_ksampler_advanced():
    sigmas = scheduler_sigmas(SD, "normal", 10)
    first, second = split_sigmas(sigmas, 4)
    assert first[-1] == second[0] and len(first) + len(second) == len(sigmas) + 1
    high, low = split_sigmas_denoise(sigmas, 0.3)
    assert len(low) == 4 and high[-1] == low[0] == sigmas[-4]
    assert torch.equal(step_range(sigmas, 2, 6), sigmas[2:7])
    forced = step_range(sigmas, 0, 6, force_full_denoise=True)
    assert forced[-1] == 0 and sigmas[6] != 0  # the input is not changed
    assert step_range(sigmas, 10).numel() == 0


# --------------------------------------------------------------------------------------------------------- noise

def test_prepare_noise_is_one_manual_seed_and_one_randn_over_the_batch():
    latent = torch.zeros(3, 4, 5, 6)
    torch.manual_seed(1234)
    expected = torch.randn(3, 4, 5, 6)
    assert torch.equal(prepare_noise(latent, 1234), expected)


def test_prepare_noise_with_batch_index_takes_each_samples_own_draw():
    latent = torch.zeros(3, 4, 5, 6)
    generator = torch.manual_seed(7)
    draws = [torch.randn(1, 4, 5, 6, generator=generator) for _ in range(3)]
    assert torch.equal(prepare_noise(latent, 7, [2, 0, 2]), torch.cat([draws[2], draws[0], draws[2]]))
    with pytest.raises(ValueError, match="batch_index has 1 entries"):
        prepare_noise(latent, 7, [0])


def test_default_noise_sampler_draws_from_one_seeded_generator():
    x = torch.zeros(SHAPE)
    sampler = default_noise_sampler(x, seed=11)
    generator = torch.Generator().manual_seed(11)
    for _ in range(2):
        assert torch.equal(sampler(None, None), torch.randn(SHAPE, generator=generator))


def test_brownian_increments_are_unit_variance_seeded_and_add_up():
    x = torch.zeros(4, 4, 32, 32)
    sampler = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)
    a, b, c = torch.tensor(10.0), torch.tensor(4.0), torch.tensor(0.5)
    whole = sampler(a, c) * (a - c).sqrt()
    parts = sampler(a, b) * (a - b).sqrt() + sampler(b, c) * (b - c).sqrt()
    torch.testing.assert_close(whole, parts, atol=1e-4, rtol=1e-4)  # W(a→c) = W(a→b) + W(b→c)
    draw = sampler(a, b)
    assert abs(float(draw.std()) - 1) < 0.03 and abs(float(draw.mean())) < 0.03
    assert torch.equal(BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)(a, b), draw)
    assert not torch.equal(BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=6)(a, b), draw)


# ------------------------------------------------------------------------------------ update rules, one by one

def one_step(name, sigmas, x, **options):
    return k_samplers.SAMPLING_FUNCTIONS[name](gaussian_denoiser, x, torch.tensor(sigmas), **options)


def test_euler_heun_and_dpm_2_steps_are_their_equations():
    x = start_point(sigma=2.0)
    s0, s1 = torch.tensor(2.0), torch.tensor(0.8)
    ones = torch.ones(2)

    def d(x, s):
        return (x - gaussian_denoiser(x, s * ones)) / s

    torch.testing.assert_close(one_step("euler", [2.0, 0.8], x), x + d(x, s0) * (s1 - s0))
    x_euler = x + d(x, s0) * (s1 - s0)
    torch.testing.assert_close(one_step("heun", [2.0, 0.8], x), x + (d(x, s0) + d(x_euler, s1)) / 2 * (s1 - s0))
    s_mid = (s0 * s1).sqrt()
    x_mid = x + d(x, s0) * (s_mid - s0)
    torch.testing.assert_close(one_step("dpm_2", [2.0, 0.8], x), x + d(x_mid, s_mid) * (s1 - s0))


def test_ancestral_step_splits_the_variance_of_the_next_sigma():
    sigma_down, sigma_up = ancestral_step(torch.tensor(2.0), torch.tensor(1.0))
    assert abs(float(sigma_down ** 2 + sigma_up ** 2) - 1.0) < 1e-6
    assert abs(float(sigma_up) - math.sqrt(1.0 * (4.0 - 1.0) / 4.0)) < 1e-6
    assert ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=0.0) == (torch.tensor(1.0), 0.0)


def test_euler_ancestral_is_euler_to_sigma_down_plus_sigma_up_noise():
    x, noise = start_point(sigma=2.0), start_point(seed=9, sigma=1.0)
    s0, s1 = torch.tensor(2.0), torch.tensor(0.8)
    sigma_down, sigma_up = ancestral_step(s0, s1, eta=0.7)
    d = (x - gaussian_denoiser(x, s0 * torch.ones(2))) / s0
    expected = x + d * (sigma_down - s0) + noise * sigma_up
    result = one_step("euler_ancestral", [2.0, 0.8], x, eta=0.7, noise_sampler=fixed_noise_sampler(noise))
    torch.testing.assert_close(result, expected)


def test_dpmpp_2m_second_step_uses_the_multistep_correction():
    x = start_point(sigma=3.0)
    sigmas = torch.tensor([3.0, 1.5, 0.5])
    lam = -sigmas.log()
    ones = torch.ones(2)
    d0 = gaussian_denoiser(x, sigmas[0] * ones)
    x1 = (sigmas[1] / sigmas[0]) * x - torch.expm1(-(lam[1] - lam[0])) * d0  # DPM-Solver++(1), i.e. DDIM
    d1 = gaussian_denoiser(x1, sigmas[1] * ones)
    h, h_last = lam[2] - lam[1], lam[1] - lam[0]
    r = h_last / h
    estimate = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    expected = (sigmas[2] / sigmas[1]) * x1 - torch.expm1(-h) * estimate
    torch.testing.assert_close(one_step("dpmpp_2m", sigmas.tolist(), x), expected, atol=1e-5, rtol=1e-5)


def test_lms_second_step_is_variable_step_adams_bashforth_2():
    x = start_point(sigma=3.0)
    sigmas = torch.tensor([3.0, 1.5, 0.5])
    ones = torch.ones(2)

    def d(x, s):
        return (x - gaussian_denoiser(x, s * ones)) / s

    x1 = x + d(x, sigmas[0]) * (sigmas[1] - sigmas[0])
    h, h_prev = sigmas[2] - sigmas[1], sigmas[1] - sigmas[0]
    expected = x1 + h * (1 + h / (2 * h_prev)) * d(x1, sigmas[1]) - h ** 2 / (2 * h_prev) * d(x, sigmas[0])
    torch.testing.assert_close(one_step("lms", sigmas.tolist(), x), expected, atol=1e-5, rtol=1e-5)


def test_ddpm_step_is_the_posterior_mean_plus_posterior_noise_in_vp_form():
    x, noise = start_point(sigma=2.0), start_point(seed=4, sigma=1.0)
    s0, s1 = 2.0, 0.8
    alpha_bar, alpha_bar_next = 1 / (1 + s0 ** 2), 1 / (1 + s1 ** 2)
    alpha = alpha_bar / alpha_bar_next
    eps = (x - gaussian_denoiser(x, torch.full((2,), s0))) / s0
    z = x / math.sqrt(1 + s0 ** 2)
    mean = (z - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)  # Ho et al. 2020, Eq. 11
    std = math.sqrt((1 - alpha) * (1 - alpha_bar_next) / (1 - alpha_bar))  # β̃, Eq. 7
    expected = (mean + std * noise) * math.sqrt(1 + s1 ** 2)
    result = one_step("ddpm", [s0, s1], x, noise_sampler=fixed_noise_sampler(noise))
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_lcm_step_jumps_to_x0_and_renoises_to_the_next_sigma():
    x, noise = start_point(sigma=2.0), start_point(seed=4, sigma=1.0)
    expected = gaussian_denoiser(x, torch.full((2,), 2.0)) + 0.8 * noise
    result = one_step("lcm", [2.0, 0.8], x, noise_sampler=fixed_noise_sampler(noise))
    torch.testing.assert_close(result, expected)


def test_dpmpp_2m_sde_first_step_is_the_exact_sde_solution_for_a_constant_x0():
    x, noise = start_point(sigma=2.0), start_point(seed=4, sigma=1.0)
    s0, s1 = 2.0, 0.8
    h = math.log(s0) - math.log(s1)
    denoised = gaussian_denoiser(x, torch.full((2,), s0))
    expected = s1 / s0 * math.exp(-h) * x + (1 - math.exp(-2 * h)) * denoised + s1 * math.sqrt(1 - math.exp(-2 * h)) * noise
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        result = one_step(name, [s0, s1], x, noise_sampler=fixed_noise_sampler(noise))
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


ODE_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ddim", "uni_pc", "uni_pc_bh2")
SECOND_ORDER = ("heun", "dpm_2", "lms", "dpmpp_2m", "ipndm", "uni_pc", "uni_pc_bh2")


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_converge_to_the_exact_probability_flow_solution(name):
    """Stopping at σ_min (no final jump to x̂₀) measures the integration error itself."""
    sigma_end = 0.05

    def error(steps):
        sigmas = torch.cat([karras_sigmas(steps + 1, sigma_end, 14.6)[:-1]])
        x = start_point(sigma=14.6)
        result = k_samplers.SAMPLING_FUNCTIONS[name](gaussian_denoiser, x, sigmas)
        return float((result - exact_ode_solution(x, 14.6, sigma_end)).abs().max())

    coarse, fine = error(10), error(40)
    assert fine < coarse / 3  # at least first order
    if name in SECOND_ORDER:
        assert fine < 0.01 and fine < coarse / 8, (coarse, fine)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_samplers_with_eta_zero_solve_the_ode(name):
    sigmas = karras_sigmas(31, 0.05, 14.6)[:-1]
    x = start_point(sigma=14.6)
    result = k_samplers.SAMPLING_FUNCTIONS[name](gaussian_denoiser, x, sigmas, eta=0.0)
    assert float((result - exact_ode_solution(x, 14.6, 0.05)).abs().max()) < 0.01


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm"])
def test_stochastic_samplers_end_on_the_data_distribution(name):
    """Whatever noise they add, exact-denoiser samples must end with the data's mean and variance (up to the
    discretisation error of 80 steps: the first-order ancestral samplers are the slowest, 0.228 for 0.25)."""
    latent = torch.zeros(8, 4, 32, 32)
    sigmas = ksampler_sigmas(SD, "karras", 80, sampler_name=name)
    result = run_sampler(name, gaussian_denoiser, SD, sigmas, prepare_noise(latent, 0), latent, seed=0)
    assert abs(float(result.mean()) - DATA_MEAN) < 0.02
    assert abs(float(result.var()) - DATA_VAR) < 0.03, float(result.var())
    deterministic = run_sampler(name, gaussian_denoiser, SD, sigmas, prepare_noise(latent, 0), latent, seed=0,
                                options={"eta": 0.0} if name != "ddpm" else None)
    assert name == "ddpm" or not torch.equal(result, deterministic)  # the noise is really added


# ------------------------------------------------------------------------------------------------ the entry point

def test_run_sampler_scales_the_noise_by_max_denoise_and_adds_the_latent():
    seen = []

    def recording_model(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    latent, noise = torch.full(SHAPE, 0.5), prepare_noise(torch.zeros(SHAPE), 1)
    sigmas = ksampler_sigmas(SD, "normal", 2)
    run_sampler("euler", recording_model, SD, sigmas, noise, latent, seed=1)
    torch.testing.assert_close(seen[0], latent + noise * math.sqrt(1 + float(sigmas[0]) ** 2))
    seen.clear()
    sigmas = ksampler_sigmas(SD, "normal", 2, denoise=0.5)
    run_sampler("euler", recording_model, SD, sigmas, noise, latent, seed=1)
    torch.testing.assert_close(seen[0], latent + noise * sigmas[0])


def test_run_sampler_keeps_the_unmasked_region_and_repaints_the_masked_one():
    latent = prepare_noise(torch.zeros(SHAPE), 2)
    noise = prepare_noise(latent, 3)
    sigmas = ksampler_sigmas(SD, "karras", 6)
    free = run_sampler("euler", gaussian_denoiser, SD, sigmas, noise, latent, seed=3)
    everywhere = run_sampler("euler", gaussian_denoiser, SD, sigmas, noise, latent, seed=3,
                             denoise_mask=torch.ones(1, 64, 64))
    torch.testing.assert_close(everywhere, free)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    half = run_sampler("euler", gaussian_denoiser, SD, sigmas, noise, latent, seed=3, denoise_mask=mask)
    torch.testing.assert_close(half[..., 4:], latent[..., 4:])  # kept: the final x̂₀ is the latent there
    assert (half[..., :3] - latent[..., :3]).abs().max() > 0.1

    def mixing_model(x, sigma):  # each pixel's x̂₀ depends on another's, so the kept region's noise matters
        return gaussian_denoiser(x.roll(4, dims=-1), sigma)

    euler = run_sampler("euler", mixing_model, SD, sigmas, noise, latent, seed=3, denoise_mask=mask)
    ddim = run_sampler("ddim", mixing_model, SD, sigmas, noise, latent, seed=3, denoise_mask=mask)
    assert (ddim - euler).abs().max() > 1e-3  # ddim re-noises the kept region with noise of its own
    torch.testing.assert_close(run_sampler("ddim", gaussian_denoiser, SD, sigmas, noise, latent, seed=3), free)


def test_prepare_mask_resizes_to_the_latent_and_repeats_channels_and_batch():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1
    prepared = prepare_mask(mask, (3, 4, 8, 8))
    assert prepared.shape == (3, 4, 8, 8)
    assert torch.equal(prepared[:, :, :, :3], torch.zeros(3, 4, 8, 3))
    assert torch.equal(prepared[:, :, :, 5:], torch.ones(3, 4, 8, 3))
    with pytest.raises(ValueError, match="mask must be"):
        prepare_mask(torch.zeros(1, 2, 3, 3), (1, 4, 8, 8))


def test_run_sampler_with_no_sigmas_returns_the_latent_and_reports_every_step():
    latent = torch.full(SHAPE, 0.25)
    assert run_sampler("euler", gaussian_denoiser, SD, torch.tensor([]), latent, latent, seed=0) is latent
    steps = []
    sigmas = ksampler_sigmas(SD, "normal", 4)
    run_sampler("dpmpp_2m", gaussian_denoiser, SD, sigmas, torch.zeros(SHAPE), torch.zeros(SHAPE), seed=0,
                callback=lambda info: steps.append((info["i"], float(info["sigma"]), info["denoised"].shape)))
    assert steps == [(i, float(sigmas[i]), torch.Size(SHAPE)) for i in range(4)]


def test_sampler_objects_carry_their_options_and_wrap_any_sampling_function():
    latent = torch.zeros(SHAPE)
    noise = prepare_noise(latent, 5)
    sigmas = ksampler_sigmas(SD, "karras", 5)
    no_eta = run_sampler(Sampler.from_name("euler_ancestral", eta=0.0), gaussian_denoiser, SD, sigmas, noise,
                         latent, seed=5)
    torch.testing.assert_close(no_eta, run_sampler("euler", gaussian_denoiser, SD, sigmas, noise, latent, seed=5))
    overridden = run_sampler("euler_ancestral", gaussian_denoiser, SD, sigmas, noise, latent, seed=5,
                             options={"eta": 0.0})
    torch.testing.assert_close(overridden, no_eta)
    wrapped = run_sampler(k_samplers.sample_dpmpp_2m, gaussian_denoiser, SD, sigmas, noise, latent, seed=5)
    torch.testing.assert_close(wrapped, run_sampler("dpmpp_2m", gaussian_denoiser, SD, sigmas, noise, latent, seed=5))
    with pytest.raises(ValueError, match="sampler must be one of"):
        Sampler.from_name("dpm_fast")


def test_sampler_names_are_comfyuis_and_cover_the_issue():
    required = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"}
    assert required <= set(SAMPLER_NAMES)
    assert SAMPLER_NAMES[-3:] == ("ddim", "uni_pc", "uni_pc_bh2")
