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

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from comfyui_host import COMFYUI_PATH_VARIABLE, comfyui_source
from nodes.common.denoiser import NoiseSchedule
from nodes.sampling import k_samplers
from nodes.sampling.k_samplers import (
    COMFYUI_SAMPLER_NAMES,
    SAMPLER_NAMES,
    Sampler,
    ancestral_step,
    prepare_mask,
    run_sampler,
)
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


def test_from_scheduler_config_computes_the_schedule_in_float64_like_comfyui():
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
              "prediction_type": "v_prediction"}
    sampling = DiscreteModelSampling.from_scheduler_config(config)
    assert sampling.prediction_type == "v_prediction" and torch.equal(sampling.sigmas, SD.sigmas)
    assert DiscreteModelSampling.from_scheduler_config(config, "epsilon").prediction_type == "epsilon"
    zsnr = DiscreteModelSampling.from_scheduler_config({**config, "rescale_betas_zero_snr": True})
    assert zsnr.zero_terminal_snr and float(zsnr.sigma_max) > 4000
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DiscreteModelSampling.from_scheduler_config({**config, "beta_schedule": "squaredcos_cap_v2"})


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


def test_apply_model_feeds_the_network_the_vp_latent_and_the_nearest_integer_timestep():
    seen = {}

    def network(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in, dtype=torch.float16)

    x = torch.ones(SHAPE)
    sigma = torch.stack([SD.sigmas[500] * 0.6 + SD.sigmas[501] * 0.4, SD.sigmas[20]])
    denoised = SD.apply_model(network, x, sigma)
    assert seen["t"].tolist() == [500.0, 20.0] and seen["t"].dtype == torch.float32
    torch.testing.assert_close(seen["x_in"], x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt())
    assert denoised.dtype == torch.float32 and torch.equal(denoised, x)  # ε = 0: x̂₀ = x
    with pytest.raises(ValueError, match="sigma must have shape"):
        SD.apply_model(network, x, sigma[:1])


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
    decay = math.exp(-h)  # e^{-h} with h = λ_next − λ = log(σ/σ_next)
    expected = s1 / s0 * decay * x + (1 - decay ** 2) * denoised + s1 * math.sqrt(1 - decay ** 2) * noise
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        result = one_step(name, [s0, s1], x, noise_sampler=fixed_noise_sampler(noise))
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_gradient_estimation_extrapolates_the_slope_from_the_second_step():
    x = start_point(sigma=3.0)
    sigmas = torch.tensor([3.0, 1.5, 0.5])
    ones = torch.ones(2)

    def d(x, s):
        return (x - gaussian_denoiser(x, s * ones)) / s

    x1 = x + d(x, sigmas[0]) * (sigmas[1] - sigmas[0])
    d1, dt = d(x1, sigmas[1]), sigmas[2] - sigmas[1]
    expected = x1 + d1 * dt + (2.5 - 1) * (d1 - d(x, sigmas[0])) * dt  # Permenter & Yuan 2024, γ = 2.5
    result = one_step("gradient_estimation", sigmas.tolist(), x, ge_gamma=2.5)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_deis_coefficients_are_the_integrals_of_its_weighted_lagrange_basis():
    sigmas = karras_sigmas(6, 0.03, 14.6)
    # DEIS's VP-SDE σ(t) = √(exp(½β_d·t² + β_min·t) − 1) through σ = 0.002 at t = 1e-3 and σ = 80 at t = 1.
    beta_d = 2 * (math.log(0.002 ** 2 + 1) / 1e-3 - math.log(80 ** 2 + 1)) / (1e-3 - 1)
    beta_min = math.log(80 ** 2 + 1) - 0.5 * beta_d
    times = [(math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(float(s) ** 2 + 1)) - beta_min) / beta_d for s in sigmas]

    def integrand(tau):
        alpha = math.exp(-0.5 * tau ** 2 * beta_d - tau * beta_min)
        return 0.5 * (tau * beta_d + beta_min) / math.sqrt(alpha * (1 - alpha))

    coefficients = k_samplers.deis_coefficients(sigmas, max_order=3)
    assert coefficients[0] == [] and len(coefficients[1]) == 2 and len(coefficients[3]) == 3
    i, nodes_ = 3, [times[3], times[2], times[1]]
    for j, coefficient in enumerate(coefficients[3]):
        def weighted(tau):
            others = [node for k, node in enumerate(nodes_) if k != j]
            return integrand(tau) * math.prod((tau - o) / (nodes_[j] - o) for o in others)

        expected = scipy.integrate.quad(weighted, times[i], times[i + 1])[0]
        assert abs(float(coefficient) - expected) < 5e-5 * abs(expected), (j, float(coefficient), expected)


ODE_SAMPLERS = ("euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "res_multistep", "ddim",
                "uni_pc", "uni_pc_bh2", "dpm_fast", "deis")
SECOND_ORDER = ("heun", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "res_multistep", "uni_pc", "uni_pc_bh2",
                "dpm_fast", "deis")


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


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_meets_a_tighter_tolerance_with_more_evaluations(order):
    sigmas = karras_sigmas(11, 0.05, 14.6)[:-1]  # only the ends matter
    x = start_point(sigma=14.6)

    def run(**tolerances):
        calls = []

        def counting_denoiser(x, sigma):
            calls.append(sigma)
            return gaussian_denoiser(x, sigma)

        result = k_samplers.sample_dpm_adaptive(counting_denoiser, x, sigmas, order=order, **tolerances)
        return float((result - exact_ode_solution(x, 14.6, 0.05)).abs().max()), len(calls)

    loose_error, loose_calls = run()
    tight_error, tight_calls = run(rtol=1e-3, atol=1e-4)
    assert tight_error < 0.01 and tight_error < loose_error / 4 and tight_calls > loose_calls


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "sa_solver", "sa_solver_pece"])
def test_sde_samplers_with_eta_zero_solve_the_ode(name):
    sigmas = karras_sigmas(31, 0.05, 14.6)[:-1]
    x = start_point(sigma=14.6)
    options = {"tau_func": no_noise} if name.startswith("sa_solver") else {"eta": 0.0}
    result = k_samplers.SAMPLING_FUNCTIONS[name](gaussian_denoiser, x, sigmas, **options)
    assert float((result - exact_ode_solution(x, 14.6, 0.05)).abs().max()) < 0.01


def no_noise(sigma):
    """SA-Solver's τ(σ) for an ODE run."""
    return 0.0


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm",
                                  "res_multistep_ancestral", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"])
def test_stochastic_samplers_end_on_the_data_distribution(name):
    """Whatever noise they add, exact-denoiser samples must end with the data's mean and variance (up to the
    discretisation error of 80 steps: the first-order ancestral samplers are the slowest, 0.228 for 0.25)."""
    latent = torch.zeros(8, 4, 32, 32)
    sigmas = ksampler_sigmas(SD, "karras", 80, sampler_name=name)
    result = run_sampler(name, gaussian_denoiser, SD, sigmas, prepare_noise(latent, 0), latent, seed=0)
    assert abs(float(result.mean()) - DATA_MEAN) < 0.02
    assert abs(float(result.var()) - DATA_VAR) < 0.03, float(result.var())
    without_noise = {"ddpm": None, "sa_solver": {"tau_func": no_noise}, "sa_solver_pece": {"tau_func": no_noise}}
    deterministic = run_sampler(name, gaussian_denoiser, SD, sigmas, prepare_noise(latent, 0), latent, seed=0,
                                options=without_noise.get(name, {"eta": 0.0}))
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
    without_seed = run_sampler("ddim", mixing_model, SD, sigmas, noise, latent, seed=None, denoise_mask=mask)
    torch.testing.assert_close(without_seed, run_sampler("ddim", mixing_model, SD, sigmas, noise, latent, seed=41,
                                                         denoise_mask=mask))  # ComfyUI's fallback seed


def test_prepare_mask_resizes_to_the_latent_and_repeats_channels_and_batch():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1
    prepared = prepare_mask(mask, (3, 4, 8, 8))
    assert prepared.shape == (3, 4, 8, 8)
    assert torch.equal(prepared[:, :, :, :3], torch.zeros(3, 4, 8, 3))
    assert torch.equal(prepared[:, :, :, 5:], torch.ones(3, 4, 8, 3))
    assert prepare_mask(prepared, (3, 4, 8, 8)) is prepared
    assert torch.equal(prepare_mask(mask.bool(), (3, 4, 8, 8)), prepared)
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
        Sampler.from_name("dpm_slow")
    with pytest.raises(NotImplementedError, match="ComfyUI's sampler 'euler_cfg_pp' is not available"):
        Sampler.from_name("euler_cfg_pp")


def test_sampler_names_are_comfyuis_and_cover_the_issue():
    required = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"}
    assert required <= set(SAMPLER_NAMES)
    assert SAMPLER_NAMES == tuple(name for name in COMFYUI_SAMPLER_NAMES if name in SAMPLER_NAMES)  # its order


# --------------------------------------------------------------------------------- against ComfyUI's own functions

# One toy network, the exact ε of Gaussian data plus a nonlinear term, run through each side's model sampling:
# DiscreteModelSampling.apply_model here, ComfyUI's BaseModel.apply_model steps written out (toy_denoiser) there.
TOY_NETWORK = '''
def toy_network(x_in, t, sigma_of):
    sigma = sigma_of(t).reshape(-1, *([1] * (x_in.ndim - 1)))
    x = x_in * (1 + sigma ** 2) ** 0.5
    mean = torch.tensor([0.3, -0.2, 0.1, 0.0]).reshape(1, 4, 1, 1)
    eps = sigma * (x - mean) / (0.25 + sigma ** 2)
    return eps + 0.05 * torch.tanh(3 * x_in.roll(1, dims=-1) + t.reshape(sigma.shape) / 1000)


def toy_denoiser(sampling):  # ComfyUI's BaseModel.apply_model, written out
    def model(x, sigma, **ignored):
        x_in = sampling.calculate_input(sigma, x)
        t = sampling.timestep(sigma).float()
        return sampling.calculate_denoised(sigma, toy_network(x_in, t, sampling.sigma).float(), x)
    return model
'''

# Runs in a subprocess on ComfyUI's source with Atelier's venv: reads the cases (torch.load), writes ComfyUI's
# results (torch.save). torchvision and av are imported by ComfyUI modules these functions never use: an empty
# placeholder module stands in for each.
COMFY_SCRIPT = '''
import importlib.abc, importlib.util, sys, types
comfyui, cases_path, results_path = sys.argv[1:4]
sys.path.insert(0, comfyui)
sys.argv = [sys.argv[0], "--cpu"]


class Placeholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    ROOTS = {"torchvision", "av"}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.ROOTS:
            return importlib.util.spec_from_loader(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(Placeholder())
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.k_diffusion.sampling
import comfy.model_sampling
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy_extras.nodes_custom_sampler as custom_sampler
import comfy_extras.nodes_model_advanced as model_advanced

cases = torch.load(cases_path)
exec(cases["toy_network"])
TYPES = {"epsilon": comfy.model_sampling.EPS, "v_prediction": comfy.model_sampling.V_PREDICTION,
         "sample": comfy.model_sampling.X0, "lcm": model_advanced.LCM}


def sampling_for(prediction, zsnr=False):
    base = comfy.model_sampling.ModelSamplingDiscrete
    if prediction == "lcm":
        base = model_advanced.ModelSamplingDiscreteDistilled

    class Sampling(base, TYPES[prediction]):
        pass
    return Sampling(None, zsnr=zsnr)


class Patcher:  # what samplers ask the model patcher for
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


class BaseModel:  # what KSAMPLER and the inpaint wrapper ask the model for
    def __init__(self, sampling):
        self.model_sampling = sampling

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
        shape = [sigma.shape[0]] + [1] * (len(noise.shape) - 1)
        return self.model_sampling.noise_scaling(sigma.reshape(shape), noise, latent_image)


class Guider:  # CFGGuider's place: the model, returning the guided x0
    def __init__(self, sampling):
        self.inner_model = BaseModel(sampling)
        self.model_patcher = Patcher(sampling)
        self.denoise = toy_denoiser(sampling)

    def __call__(self, x, sigma, model_options={}, seed=None):
        return self.denoise(x, sigma)


results = {"names": (list(comfy.samplers.SAMPLER_NAMES), list(comfy.samplers.SCHEDULER_NAMES))}
for key, (prediction, zsnr, name, steps) in cases["schedulers"].items():
    results[key] = comfy.samplers.calculate_sigmas(sampling_for(prediction, zsnr), name, steps)
for key, (scheduler, steps, denoise, sampler) in cases["ksampler_sigmas"].items():
    results[key] = comfy.samplers.KSampler(Patcher(sampling_for("epsilon")), steps, "cpu", sampler, scheduler,
                                           denoise).sigmas
for key, (scheduler, steps, denoise) in cases["basic_scheduler"].items():
    results[key] = custom_sampler.BasicScheduler().get_sigmas(Patcher(sampling_for("epsilon")), scheduler, steps,
                                                              denoise)[0]
for key, (steps, denoise) in cases["sd_turbo"].items():
    results[key] = custom_sampler.SDTurboScheduler().get_sigmas(Patcher(sampling_for("epsilon")), steps, denoise)[0]
for key, (sigmas, denoise) in cases["split_denoise"].items():
    results[key] = custom_sampler.SplitSigmasDenoise().get_sigmas(sigmas, denoise)
for key, (prediction, zsnr, timesteps, sigmas, percents) in cases["model_sampling"].items():
    sampling = sampling_for(prediction, zsnr)
    results[key] = (sampling.sigmas, sampling.timestep(sigmas), sampling.sigma(timesteps),
                    torch.tensor([sampling.percent_to_sigma(p) for p in percents]))
for key, (shape, seed, batch_index) in cases["noise"].items():
    results[key] = comfy.sample.prepare_noise(torch.zeros(shape), seed, batch_index)
for key, (shape, sigma_min, sigma_max, seed, queries) in cases["brownian"].items():
    tree = comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(torch.zeros(shape), torch.tensor(sigma_min),
                                                               torch.tensor(sigma_max), seed=seed, cpu=True)
    results[key] = [tree(torch.tensor(a), torch.tensor(b)) for a, b in queries]
for key, case in cases["samplers"].items():
    guider = Guider(sampling_for(case["prediction"]))
    noise = case["noise"]
    mask = case["mask"]
    if mask is not None:
        mask = comfy.sampler_helpers.prepare_mask(mask, noise.shape, "cpu")
    sampler = comfy.samplers.sampler_object(case["sampler"])
    extra_args = {"model_options": {}, "seed": case["seed"]}
    results[key] = sampler.sample(guider, case["sigmas"].clone(), extra_args, None, noise.clone(), case["latent"],
                                  mask, True)
torch.save(results, results_path)
'''


def _comparison_cases() -> dict:
    """The cases both sides run, keyed by a readable id."""
    cases = {"toy_network": TOY_NETWORK, "schedulers": {}, "ksampler_sigmas": {}, "basic_scheduler": {},
             "sd_turbo": {}, "split_denoise": {}, "model_sampling": {}, "noise": {}, "brownian": {}, "samplers": {}}
    for prediction, zsnr in (("epsilon", False), ("lcm", False), ("epsilon", True)):
        for name in SCHEDULER_NAMES:
            for steps in (1, 2, 3, 7, 20, 50):
                if name == "kl_optimal" and steps == 1:
                    continue  # ComfyUI divides by zero there (NaN); ours starts at σ_max
                cases["schedulers"][f"scheduler-{prediction}-zsnr{zsnr}-{name}-{steps}"] = (prediction, zsnr, name,
                                                                                          steps)
    for scheduler in ("normal", "karras", "simple", "ddim_uniform", "beta"):
        for denoise in (1.0, 0.6, 0.35, 0.0):
            for sampler in ("euler", "dpm_2", "uni_pc"):
                cases["ksampler_sigmas"][f"ksampler-{scheduler}-{denoise}-{sampler}"] = (scheduler, 12, denoise,
                                                                                         sampler)
            cases["basic_scheduler"][f"basic-{scheduler}-{denoise}"] = (scheduler, 12, denoise)
    for steps, denoise in ((1, 1.0), (4, 1.0), (10, 1.0), (2, 0.5), (4, 0.33)):
        cases["sd_turbo"][f"sd_turbo-{steps}-{denoise}"] = (steps, denoise)
    for denoise in (0.0, 0.3, 0.5, 1.0):
        cases["split_denoise"][f"split-{denoise}"] = (scheduler_sigmas(SD, "karras", 10), denoise)
    for prediction, zsnr in (("epsilon", False), ("lcm", False), ("v_prediction", True)):
        cases["model_sampling"][f"model_sampling-{prediction}-{zsnr}"] = (
            prediction, zsnr, torch.tensor([0.0, 0.4, 19.0, 123.25, 500.5, 998.9, 999.0, 1200.0]),
            torch.tensor([0.01, 0.0292, 0.5, 1.0, 3.3, 14.6146, 20.0]), [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    for shape, seed, batch_index in (((1, 4, 8, 8), 0, None), ((3, 4, 6, 5), 12345, None),
                                     ((3, 4, 6, 5), 2 ** 40 + 7, [4, 0, 4]), ((1, 4, 2, 2), 99, [3])):
        cases["noise"][f"noise-{shape}-{seed}-{batch_index}"] = (shape, seed, batch_index)
    queries = [(14.6, 9.0), (9.0, 3.5), (3.5, 3.4), (3.4, 0.4), (0.4, 0.03), (14.6, 0.03), (2.0, 5.0)]
    for shape, seed in (((2, 4, 8, 8), 42), ((1, 4, 3, 3), 7)):
        cases["brownian"][f"brownian-{shape}-{seed}"] = (shape, 0.03, 14.6, seed, queries)

    def add_run(label, sampler, prediction, sigmas, *, img2img=False, masked=False, batch=2):
        latent = prepare_noise(torch.zeros(batch, 4, 8, 8), 100) * 0.8 if img2img else torch.zeros(batch, 4, 8, 8)
        mask = None
        if masked:
            mask = torch.zeros(1, 64, 64)
            mask[:, 8:40, 16:56] = 1.0
            mask[:, :, 56:] = 0.5
        cases["samplers"][f"sampler-{label}-{sampler}"] = {
            "sampler": sampler, "prediction": prediction, "sigmas": sigmas, "seed": 31337,
            "noise": prepare_noise(torch.zeros(batch, 4, 8, 8), 31337), "latent": latent, "mask": mask}

    epsilon = DiscreteModelSampling.from_beta_schedule("epsilon")
    for sampler in SAMPLER_NAMES:
        add_run("txt2img-normal-8", sampler, "epsilon", ksampler_sigmas(epsilon, "normal", 8, sampler_name=sampler))
        add_run("img2img-karras-6-0.6", sampler, "epsilon",
                ksampler_sigmas(epsilon, "karras", 6, 0.6, sampler_name=sampler), img2img=True)
        add_run("inpaint-exponential-5-0.9", sampler, "epsilon",
                ksampler_sigmas(epsilon, "exponential", 5, 0.9, sampler_name=sampler), img2img=True, masked=True)
    for sampler in ("euler", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "dpmpp_sde", "euler_ancestral"):
        add_run("txt2img-v-karras-1", sampler, "v_prediction", ksampler_sigmas(epsilon, "karras", 1,
                                                                               sampler_name=sampler))
        add_run("txt2img-v-sgm_uniform-5", sampler, "v_prediction",
                ksampler_sigmas(epsilon, "sgm_uniform", 5, sampler_name=sampler), batch=1)
    for sampler in ("euler", "dpmpp_2m"):
        add_run("txt2img-x0-simple-4", sampler, "sample", ksampler_sigmas(epsilon, "simple", 4))
    lcm = DiscreteModelSampling.from_beta_schedule("lcm")
    for sampler in ("lcm", "euler", "euler_ancestral"):
        add_run("txt2img-lcm-sgm_uniform-4", sampler, "lcm", ksampler_sigmas(lcm, "sgm_uniform", 4))
    add_run("txt2img-sd_turbo-1", "euler_ancestral", "epsilon", sd_turbo_sigmas(epsilon, 1))
    return cases


COMPARISON_CASES = _comparison_cases()


def _ours(key: str):
    """Atelier's result for a comparison case."""
    for group, by_key in COMPARISON_CASES.items():
        if isinstance(by_key, dict) and key in by_key:
            case = by_key[key]
            break
    if group == "schedulers":
        prediction, zsnr, name, steps = case
        return scheduler_sigmas(DiscreteModelSampling.from_beta_schedule(prediction, zero_terminal_snr=zsnr), name,
                                steps)
    if group == "ksampler_sigmas":
        scheduler, steps, denoise, sampler = case
        return ksampler_sigmas(SD, scheduler, steps, denoise, sampler_name=sampler)
    if group == "basic_scheduler":
        return basic_scheduler_sigmas(SD, *case)
    if group == "sd_turbo":
        return sd_turbo_sigmas(SD, *case)
    if group == "split_denoise":
        return split_sigmas_denoise(*case)
    if group == "model_sampling":
        prediction, zsnr, timesteps, sigmas, percents = case
        sampling = DiscreteModelSampling.from_beta_schedule(prediction, zero_terminal_snr=zsnr)
        return (sampling.sigmas, sampling.timestep(sigmas), sampling.sigma(timesteps),
                torch.tensor([sampling.percent_to_sigma(p) for p in percents]))
    if group == "noise":
        shape, seed, batch_index = case
        return prepare_noise(torch.zeros(shape), seed, batch_index)
    if group == "brownian":
        shape, sigma_min, sigma_max, seed, queries = case
        tree = BrownianTreeNoiseSampler(torch.zeros(shape), torch.tensor(sigma_min), torch.tensor(sigma_max), seed=seed)
        return [tree(torch.tensor(a), torch.tensor(b)) for a, b in queries]
    namespace = {"torch": torch}
    exec(TOY_NETWORK, namespace)
    sampling = DiscreteModelSampling.from_beta_schedule(case["prediction"])

    def model(x, sigma):  # ComfyUI's side runs the same network through its BaseModel.apply_model steps
        return sampling.apply_model(lambda x_in, t: namespace["toy_network"](x_in, t, sampling.sigma), x, sigma)

    return run_sampler(case["sampler"], model, sampling, case["sigmas"], case["noise"], case["latent"], case["seed"],
                       denoise_mask=case["mask"])


@pytest.fixture(scope="module")
def comfyui_results(tmp_path_factory):
    """ComfyUI's results for every comparison case, from one subprocess run."""
    source = comfyui_source()
    if source is None or not os.path.isfile(os.path.join(source, "comfy", "samplers.py")):
        pytest.skip(f"no ComfyUI tree to compare with: set {COMFYUI_PATH_VARIABLE} to ComfyUI v0.3.64's source "
                    "(.ci/run does when ../shared/comfyui exists)")
    # What ComfyUI's sampling modules import beyond Atelier's own runtime needs: einops (requirements-test.txt);
    # psutil and yaml come with peft and transformers.
    for module in ("einops", "psutil", "yaml"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"ComfyUI's sampling modules import {module}, which this venv lacks (pip install -r "
                        "requirements-test.txt)")
    folder = tmp_path_factory.mktemp("comfyui_k_samplers")
    cases_path, results_path, script_path = folder / "cases.pt", folder / "results.pt", folder / "comfy_side.py"
    torch.save(COMPARISON_CASES, cases_path)
    script_path.write_text(COMFY_SCRIPT)
    completed = subprocess.run([sys.executable, str(script_path), source, str(cases_path), str(results_path)],
                               capture_output=True, text=True, timeout=600, cwd=str(folder))
    assert completed.returncode == 0, f"ComfyUI's side failed:\n{completed.stderr[-4000:]}"
    return torch.load(results_path)


def _assert_agree(ours, theirs, key):
    if isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs), key
        for index, (mine, reference) in enumerate(zip(ours, theirs)):
            _assert_agree(mine, reference, f"{key}[{index}]")
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (key, ours.shape, theirs.shape)
    if theirs.numel():
        scale = max(1.0, float(theirs.abs().max()))
        difference = float((ours.double() - theirs.double()).abs().max())
        assert difference <= 1e-5 * scale, f"{key}: differs from ComfyUI by {difference:.3g} (scale {scale:.3g})"


def test_names_are_comfyuis_in_its_order(comfyui_results):
    samplers, schedulers = comfyui_results["names"]
    assert COMFYUI_SAMPLER_NAMES == tuple(samplers) and SCHEDULER_NAMES == tuple(schedulers)


@pytest.mark.parametrize("key", [key for group, by_key in COMPARISON_CASES.items() if isinstance(by_key, dict)
                                 for key in by_key])
def test_agrees_with_comfyui(comfyui_results, key):
    _assert_agree(_ours(key), comfyui_results[key], key)


def test_a_sampler_reads_the_sigma_table_from_either_hosts_model_and_refuses_a_model_without_one():
    """run_sampler's denoiser carries model_sampling; ComfyUI's KSamplerX0Inpaint reaches it through its guider's
    ModelPatcher (a stand-in here; real ComfyUI runs TCD in test_comfy_pack_models.py)."""
    import types

    from nodes.sampling.k_samplers import sampler_model_sampling

    table = DiscreteModelSampling(beta_schedule_alphas_cumprod())
    assert sampler_model_sampling(types.SimpleNamespace(model_sampling=table)) is table
    patcher = types.SimpleNamespace(get_model_object=lambda name: table if name == "model_sampling" else None)
    comfy_wrapper = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_patcher=patcher))
    assert sampler_model_sampling(comfy_wrapper) is table
    with pytest.raises(ValueError, match="needs the model's sigma table"):
        sampler_model_sampling(lambda x, sigma: x)
