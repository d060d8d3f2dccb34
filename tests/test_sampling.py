"""Samplers and schedules: identities with diffusers, momentum orders, the F-scheduler table, determinism, img2img,
previews and interrupts, on analytic Gaussian toys and a tiny random convolutional denoiser (no UNet)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from nodes.common.denoiser import Conditioning, NoiseSchedule, guided_eps
from nodes.common.progress import InterruptedByUser, use_sink
from nodes.sampling import momentum, previews
from nodes.sampling.samplers import (
    MOMENTUM_DEFAULTS,
    SAMPLERS,
    SCHEDULERS,
    STOCHASTIC_SAMPLERS,
    VALID_SCHEDULERS,
    check_sampler_settings,
    sample,
)
from nodes.sampling.schedules import f_scheduler_schedule

COMBINATIONS = [(sampler, scheduler) for sampler in SAMPLERS for scheduler in VALID_SCHEDULERS[sampler]]
MU, S0 = 0.5, 0.6  # the Gaussian toy's data: x0 ~ N(MU, S0²) per element


def sd_schedule() -> NoiseSchedule:
    """SD1.x/SDXL's scaled-linear schedule, with ᾱ exactly as diffusers computes it (float32)."""
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return NoiseSchedule(reference.alphas_cumprod.to(torch.float64), "epsilon")


SCHEDULE = sd_schedule()


def gaussian_eps(schedule: NoiseSchedule, mu: float = MU, s0: float = S0):
    """The exact ε = E[ε | x_t] for data x0 ~ N(mu, s0²): √(1−ᾱ)(x − √ᾱ·mu) / (ᾱ·s0² + 1 − ᾱ)."""

    def eps_fn(x, t):
        alpha_bar = schedule.alpha_bar(t).to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mu) / (alpha_bar * s0**2 + 1 - alpha_bar)

    return eps_fn


def exact_ode_end(schedule: NoiseSchedule, x_start: torch.Tensor, end_sigma: float = 0.0, mu: float = MU,
                  s0: float = S0) -> torch.Tensor:
    """The probability-flow ODE solved exactly for the Gaussian toy, from VP latents ``x_start`` at the last
    training timestep down to VE sigma ``end_sigma``: x̄ − mu grows as √(s0² + g²), with x̄ = x/√ᾱ."""
    alpha_bar = float(schedule.alphas_cumprod[-1])
    g_start = math.sqrt((1 - alpha_bar) / alpha_bar)
    return mu + (x_start / math.sqrt(alpha_bar) - mu) * math.sqrt(s0**2 + end_sigma**2) / math.sqrt(s0**2 + g_start**2)


def make_noise(seed: int = 1, shape=(2, 4, 8, 8), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def counting(eps_fn):
    """eps_fn that records every (x, t) it is called with."""
    calls = []

    def wrapped(x, t):
        calls.append((x.clone(), t.clone()))
        return eps_fn(x, t)

    return wrapped, calls


# --- identities with the base solvers -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 7])
def test_hb_plms_and_ghvb_with_momentum_one_equal_the_ddim_loop_exactly(steps):
    noise, eps_fn = make_noise(), gaussian_eps(SCHEDULE)
    ddim = sample(eps_fn, SCHEDULE, noise, steps, "ddim", "normal")
    assert torch.equal(sample(eps_fn, SCHEDULE, noise, steps, "hb_plms", "normal", momentum=1.0), ddim)
    assert torch.equal(sample(eps_fn, SCHEDULE, noise, steps, "ghvb", "normal", momentum=1.0), ddim)
    # and "ddim" is diffusers' DDIM (η = 0) loop, written out here independently
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    reference.set_timesteps(steps)
    x = noise.clone()
    for t in reference.timesteps:
        x = reference.step(eps_fn(x, t.float().expand(2)), t, x).prev_sample
    torch.testing.assert_close(ddim, x, atol=1e-5, rtol=0)
    # momentum below 1 is a different sampler, so the equalities above are not vacuous
    assert (sample(eps_fn, SCHEDULE, noise, steps, "hb_plms", "normal", momentum=0.8) - ddim).abs().max() > 1e-2


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("steps", [10, 7])
def test_hb_dpmpp_2m_with_beta_one_equals_diffusers_dpmsolver_multistep(scheduler, steps):
    noise, eps_fn = make_noise(), gaussian_eps(SCHEDULE)
    karras = scheduler == "karras"
    reference = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            use_karras_sigmas=karras,
                                            timestep_spacing="linspace" if karras else "trailing")
    reference.set_timesteps(steps)
    x = noise.clone()
    for t in reference.timesteps:
        x = reference.step(eps_fn(x, t.float().expand(2)), t, x).prev_sample
    ours = sample(eps_fn, SCHEDULE, noise, steps, "hb_dpmpp_2m", scheduler, momentum=1.0)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample(eps_fn, SCHEDULE, noise, steps, "dpmpp_2m", scheduler), x, atol=1e-5, rtol=0)
    assert (sample(eps_fn, SCHEDULE, noise, steps, "hb_dpmpp_2m", scheduler, momentum=0.8) - x).abs().max() > 1e-2


def test_constant_eps_gives_one_answer_for_every_momentum_and_both_methods():
    # With ε independent of x and t the ODE dx̄/dg = ε is a straight line that every consistent solver follows
    # exactly: x̄_end = x̄_start − g_start·ε. 10 steps divide the 1000 timesteps: otherwise diffusers' DDIM step,
    # which goes to t − 1000 // steps, lands a timestep off its own trailing grid (harmless, but not exact).
    noise, constant = make_noise(), make_noise(seed=2)
    alpha_bar = float(SCHEDULE.alphas_cumprod[-1])
    expected = noise / math.sqrt(alpha_bar) - math.sqrt((1 - alpha_bar) / alpha_bar) * constant
    runs = [("ddim", None), ("dpmpp_2m", None)]
    runs += [(name, m) for name in ("hb_plms", "ghvb") for m in (0.3, 1.0, 1.5, 2.0, 2.5, 3.5, 4.0)]
    runs += [("hb_dpmpp_2m", beta) for beta in (0.3, 0.8, 1.0)]
    for name, knob in runs:
        out = sample(lambda x, t: constant, SCHEDULE, noise, 10, name, "normal", momentum=knob)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5, msg=f"{name} momentum={knob}")


def uniform_g_schedule() -> NoiseSchedule:
    """A schedule whose g = √(1−ᾱ)/√ᾱ grows linearly in t (to 3.0), over 1280 timesteps: with the trailing grid and
    10·2^k steps every DDIM step has the same Δg, where multistep orders are textbook."""
    g = 3.0 * torch.arange(1, 1281, dtype=torch.float64) / 1280
    return NoiseSchedule(1 / (1 + g**2), "epsilon")


@pytest.mark.parametrize("sampler, knob, low, high", [
    ("hb_plms", 0.5, 0.8, 1.2),  # HB with β 0.5: first order
    ("hb_plms", 2.0, 1.8, 2.2),  # PLMS2, no momentum
    ("ghvb", 1.5, 1.8, 2.2),  # GHVB of order 2 keeps order 2 with β 0.5
    ("ghvb", 2.5, 2.7, 4.5),  # GHVB of order 3 (its lower-order start-up steps cost little here)
    ("hb_dpmpp_2m", 0.8, 0.7, 1.3),  # HB on DPM++2M: first order
])
def test_momentum_error_falls_at_the_expected_order_as_steps_double(sampler, knob, low, high):
    schedule = uniform_g_schedule()
    noise = make_noise(shape=(1, 1, 4, 4), dtype=torch.float64)
    eps_fn, exact = gaussian_eps(schedule, MU, 1.0), exact_ode_end(schedule, noise, mu=MU, s0=1.0)
    step_counts = (40, 80, 160) if sampler == "hb_dpmpp_2m" else (20, 40, 80)  # DPM++ reaches its order later
    errors = [(sample(eps_fn, schedule, noise, n, sampler, "normal", momentum=knob) - exact).abs().max().item()
              for n in step_counts]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(low <= order <= high for order in orders), f"errors {errors}, observed orders {orders}"


# --- the F-scheduler ------------------------------------------------------------------------------------------

# techniques.md §4.4, SD1.5's scaled-linear betas: timesteps (one decimal) and VE sigmas (three decimals),
# the last entry being where sampling stops.
F_TABLE = {
    5: ([999, 772.5, 556.7, 354.2, 170.0, 18.3], [14.615, 4.519, 1.962, 1.001, 0.502, 0.132]),
    6: ([999, 809.6, 627.3, 453.5, 290.4, 141.7, 18.3], [14.615, 5.341, 2.523, 1.388, 0.805, 0.437, 0.132]),
    8: ([999, 857.3, 719.4, 585.9, 457.2, 334.3, 218.7, 112.7, 22.7],
        [14.615, 6.712, 3.608, 2.172, 1.404, 0.937, 0.617, 0.373, 0.147]),
}


@pytest.mark.parametrize("steps", sorted(F_TABLE))
def test_f_scheduler_reproduces_the_table(steps):
    timesteps, sigmas = f_scheduler_schedule(SCHEDULE, steps, "sd1")
    table_timesteps, table_sigmas = F_TABLE[steps]
    # the table rounds timesteps to 0.1 and sigmas to 0.001
    torch.testing.assert_close(timesteps, torch.tensor(table_timesteps, dtype=torch.float64), atol=0.05 + 1e-3,
                               rtol=0)
    torch.testing.assert_close(sigmas, torch.tensor(table_sigmas, dtype=torch.float64), atol=1e-3, rtol=0)
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] > 0.1


def test_f_scheduler_sdxl_ends_lower_at_8_steps_only():
    sd1_8, sdxl_8 = f_scheduler_schedule(SCHEDULE, 8, "sd1")[1], f_scheduler_schedule(SCHEDULE, 8, "sdxl")[1]
    assert float(sdxl_8[-1]) < float(sd1_8[-1]) - 0.05  # ρ 12, k 10 on SDXL
    assert torch.equal(f_scheduler_schedule(SCHEDULE, 6, "sdxl")[1], f_scheduler_schedule(SCHEDULE, 6, "sd1")[1])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "hb_dpmpp_2m"])
@pytest.mark.parametrize("steps", sorted(F_TABLE))
def test_f_scheduler_calls_the_model_once_per_step_and_stops_at_its_last_sigma(sampler, steps):
    # Data concentrated at MU: the data prediction is MU exactly, so every DPM-Solver++ variant follows the ODE
    # exactly and the VE latent at s_end is MU·(1 − s_end/s_max) + s_end·noise, not fully denoised.
    noise = make_noise()
    eps_fn, calls = counting(gaussian_eps(SCHEDULE, MU, 0.0))
    out = sample(eps_fn, SCHEDULE, noise, steps, sampler, "f_scheduler", family="sd1")
    timesteps, sigmas = f_scheduler_schedule(SCHEDULE, steps, "sd1")
    assert len(calls) == steps
    torch.testing.assert_close(torch.stack([t[0] for _, t in calls]).double(), timesteps[:-1], atol=1e-4, rtol=0)
    s_end, s_max = float(sigmas[-1]), float(sigmas[0])
    torch.testing.assert_close(out, MU * (1 - s_end / s_max) + s_end * noise, atol=1e-5, rtol=1e-5)


def test_ddim_on_the_f_scheduler_grid_is_the_ddim_update_ending_in_a_ve_latent():
    noise, eps_fn = make_noise(), gaussian_eps(SCHEDULE)
    timesteps, _ = f_scheduler_schedule(SCHEDULE, 5, "sd1")
    alpha_bars = SCHEDULE.alpha_bar(timesteps)
    x = (1 - alpha_bars[0]).sqrt() * noise.double()  # VE s_max·noise, as the official code starts
    for i in range(5):
        eps = eps_fn(x, timesteps[i].expand(2))
        x0 = (x - (1 - alpha_bars[i]).sqrt() * eps) / alpha_bars[i].sqrt()
        x = alpha_bars[i + 1].sqrt() * x0 + (1 - alpha_bars[i + 1]).sqrt() * eps
    expected = x / alpha_bars[-1].sqrt()  # VP → VE at the last, non-zero sigma
    out = sample(eps_fn, SCHEDULE, noise.double(), 5, "ddim", "f_scheduler", family="sd1")
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # eps_fn sees float32 timesteps
    second_order = sample(eps_fn, SCHEDULE, noise.double(), 5, "dpmpp_2m", "f_scheduler", family="sd1")
    assert (second_order - out).abs().max() > 1e-3


# --- every sampler runs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, scheduler", COMBINATIONS)
def test_every_sampler_draws_from_the_gaussian_toy(sampler, scheduler):
    noise = make_noise(shape=(2, 4, 16, 16))
    steps = 8 if scheduler == "f_scheduler" else 20
    eps_fn, calls = counting(gaussian_eps(SCHEDULE))
    out = sample(eps_fn, SCHEDULE, noise, steps, sampler, scheduler, generator=torch.Generator().manual_seed(3),
                 family="sd1")
    assert out.shape == noise.shape and out.dtype == noise.dtype and len(calls) == steps
    if sampler in STOCHASTIC_SAMPLERS:  # fresh noise every step: compare the distribution, not the path
        assert abs(out.mean().item() - MU) < 0.05
        assert 0.5 * S0 < out.std().item() < 1.1 * S0
    else:  # an ODE solver: close to the exact ODE solution from the same noise
        end_sigma = float(f_scheduler_schedule(SCHEDULE, 8, "sd1")[1][-1]) if scheduler == "f_scheduler" else 0.0
        rms = (out - exact_ode_end(SCHEDULE, noise, end_sigma)).pow(2).mean().sqrt().item()
        assert rms < 0.1, rms


class TinyDenoiser(torch.nn.Module):
    """A random 3×3 convolution that reads t and the conditioning: a UNet-free stand-in for the Denoiser protocol."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x_t, t, conditioning):
        return self.conv(x_t) * (1 + t.reshape(-1, 1, 1, 1) / 1000) + conditioning.embeds.mean(dim=(1, 2)).reshape(
            -1, 1, 1, 1)


@pytest.mark.parametrize("sampler, scheduler", COMBINATIONS)
def test_same_seed_gives_identical_bits_through_guided_eps(sampler, scheduler):
    schedule = NoiseSchedule(SCHEDULE.alphas_cumprod, "v_prediction")
    denoiser = TinyDenoiser(schedule)
    positive = Conditioning(torch.full((1, 3, 8), 0.1))
    negative = Conditioning(torch.zeros(1, 2, 8))

    def eps_fn(x, t):
        return guided_eps(denoiser, x, t, positive, negative, 3.0)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(2, 4, 8, 8, generator=generator)
        return sample(eps_fn, schedule, noise, 6, sampler, scheduler, generator=generator, family="sd2")

    first, second, other = run(7), run(7), run(8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("sampler", STOCHASTIC_SAMPLERS)
def test_stochastic_samplers_differ_with_the_step_noise_alone(sampler):
    noise, eps_fn = make_noise(), gaussian_eps(SCHEDULE)
    outs = [sample(eps_fn, SCHEDULE, noise, 6, sampler, "normal", generator=torch.Generator().manual_seed(seed))
            for seed in (1, 1, 2)]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


# --- image-to-image -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, scheduler", [("ddim", "normal"), ("euler", "normal"), ("dpmpp_2m", "normal"),
                                                ("uni_pc", "normal"), ("lcm", "normal"), ("ghvb", "normal"),
                                                ("hb_dpmpp_2m", "normal"), ("ddim", "f_scheduler")])
def test_img2img_runs_the_tail_of_the_schedule_from_the_noised_latent(sampler, scheduler):
    noise, latent = make_noise(), make_noise(seed=5) * 0.5 + 0.2
    steps, denoise = (8, 0.5) if scheduler == "f_scheduler" else (10, 0.45)
    full_fn, full_calls = counting(gaussian_eps(SCHEDULE))
    sample(full_fn, SCHEDULE, noise, steps, sampler, scheduler, generator=torch.Generator().manual_seed(0),
           family="sd1")
    eps_fn, calls = counting(gaussian_eps(SCHEDULE))
    out = sample(eps_fn, SCHEDULE, noise, steps, sampler, scheduler, latent=latent, denoise=denoise,
                 generator=torch.Generator().manual_seed(0), family="sd1")
    run = int(steps * denoise)
    assert len(calls) == run < steps
    assert [float(t[0]) for _, t in calls] == [float(t[0]) for _, t in full_calls[steps - run:]]
    first_x, first_t = calls[0]
    alpha_bar = SCHEDULE.alpha_bar(first_t[:1]).float()
    # the model first sees the latent noised to the first kept timestep: √ᾱ·latent + √(1−ᾱ)·noise
    torch.testing.assert_close(first_x, alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise, atol=2e-4,
                               rtol=1e-4)
    assert out.shape == latent.shape


# --- previews and interrupts --------------------------------------------------------------------------------------


class StopAfter:
    """A progress sink whose user presses stop after ``count`` reported steps."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.calls = []

    def progress(self, step, total, preview):
        self.calls.append((step, total, preview))

    def interrupted(self):
        return len(self.calls) >= self.count


@pytest.mark.parametrize("sampler, scheduler", [("dpmpp_2m", "normal"), ("ghvb", "normal"),
                                                ("hb_dpmpp_2m", "karras"), ("dpmpp_2m", "f_scheduler")])
def test_an_interrupt_from_the_progress_hook_stops_sampling_within_one_step(sampler, scheduler):
    sink, (eps_fn, calls) = StopAfter(2), counting(gaussian_eps(SCHEDULE))
    steps = 8 if scheduler == "f_scheduler" else 10
    with use_sink(sink), pytest.raises(InterruptedByUser):
        sample(eps_fn, SCHEDULE, make_noise(shape=(1, 4, 8, 6)), steps, sampler, scheduler, family="sd1",
               on_step=previews.progress_reporter("sd1"))
    assert len(calls) == 3  # the third step's report raised; no fourth model call
    assert [(step, total) for step, total, _ in sink.calls] == [(1, steps), (2, steps)]
    assert all(isinstance(image, Image.Image) and image.size == (6, 8) for _, _, image in sink.calls)


def test_on_step_reports_every_step_with_the_x0_estimate():
    seen = []
    noise = make_noise()
    # data concentrated at MU: each step's x0 estimate is MU exactly
    sample(gaussian_eps(SCHEDULE, MU, 0.0), SCHEDULE, noise, 5, "euler", "normal",
           on_step=lambda done, total, x0: seen.append((done, total, x0)))
    assert [(done, total) for done, total, _ in seen] == [(i, 5) for i in range(1, 6)]
    for _, _, x0 in seen:
        torch.testing.assert_close(x0, torch.full_like(noise, MU), atol=1e-3, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("batch", [1, 3])
def test_latent_to_rgb_applies_the_family_matrix_per_channel(family, batch):
    factors, bias = previews.LATENT_RGB_MAPS[family]
    latent = torch.zeros(batch, 4, 5, 7)
    latent[:, 2, 1, 3] = 1.0  # channel 2 only, at one pixel
    rgb = previews.latent_to_rgb(latent, family)
    assert rgb.shape == (batch, 3, 5, 7)
    expected = (1 + torch.tensor(factors[2]) + torch.tensor(bias)) / 2
    torch.testing.assert_close(rgb[:, :, 1, 3], expected.expand(batch, 3))
    torch.testing.assert_close(rgb[:, :, 0, 0], ((1 + torch.tensor(bias)) / 2).expand(batch, 3))


def test_latent_to_rgb_refuses_unknown_family_and_wrong_channels():
    with pytest.raises(ValueError, match="'flux'"):
        previews.latent_to_rgb(torch.zeros(1, 4, 2, 2), "flux")
    with pytest.raises(ValueError, match=r"\(1, 16, 2, 2\)"):
        previews.latent_to_rgb(torch.zeros(1, 16, 2, 2), "sd1")


# --- momentum building blocks -------------------------------------------------------------------------------------


def test_ghvb_coefficients_sum_to_one_and_reduce_to_adams_bashforth():
    for order in range(1, momentum.MAX_ORDER + 1):
        for beta in (0.1, 0.5, 0.9, 1.0):
            assert math.isclose(sum(momentum.ghvb_coefficients(order, beta)), 1.0, abs_tol=1e-12)
        assert momentum.ghvb_coefficients(order, 1.0) == pytest.approx(momentum.ADAMS_BASHFORTH[order], abs=1e-12)


@pytest.mark.parametrize("m, expected", [(0.5, (1, 0.5)), (1.0, (1, 1.0)), (1.5, (2, 0.5)), (2.5, (3, 0.5)),
                                         (3.8, (4, 0.8)), (4.0, (4, 1.0))])
def test_momentum_number_splits_into_order_and_beta(m, expected):
    order, beta = momentum.order_and_beta(m)
    assert order == expected[0] and beta == pytest.approx(expected[1])


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="euler_a", scheduler="normal", steps=10), "'euler_a'"),
    (dict(sampler="euler_ancestral", scheduler="karras", steps=10), "'karras'"),
    (dict(sampler="lcm", scheduler="f_scheduler", steps=5), "'f_scheduler'"),
    (dict(sampler="hb_plms", scheduler="karras", steps=10), "'karras'"),
    (dict(sampler="dpmpp_2m", scheduler="f_scheduler", steps=7, family="sd1"), "got 7"),
    (dict(sampler="dpmpp_2m", scheduler="f_scheduler", steps=8, family="sd3"), "got 'sd3'"),
    (dict(sampler="ddim", scheduler="normal", steps=0), "got 0"),
    (dict(sampler="lcm", scheduler="normal", steps=60), "got 60"),
    (dict(sampler="ddim", scheduler="normal", steps=10, denoise=1.5), "got 1.5"),
    (dict(sampler="ddim", scheduler="normal", steps=10, denoise=0.05), "denoise=0.05"),
    (dict(sampler="euler", scheduler="normal", steps=10, momentum=0.8), "momentum=0.8"),
    (dict(sampler="ghvb", scheduler="normal", steps=10, momentum=4.5), "got 4.5"),
    (dict(sampler="hb_dpmpp_2m", scheduler="normal", steps=10, momentum=1.2), "got 1.2"),
    (dict(sampler="hb_plms", scheduler="normal", steps=10, momentum=0.0), "got 0.0"),
])
def test_refused_settings_name_the_bad_value(settings, message):
    with pytest.raises(ValueError, match=message):
        check_sampler_settings(**settings)
    with pytest.raises(ValueError, match=message):
        sample(gaussian_eps(SCHEDULE), SCHEDULE, make_noise(), **settings)


def test_an_unknown_family_waits_for_the_f_scheduler_schedule():
    check_sampler_settings("dpmpp_2m", "f_scheduler", 8)  # a node's validation: the model has not arrived yet
    with pytest.raises(ValueError, match="family"):
        sample(gaussian_eps(SCHEDULE), SCHEDULE, make_noise(), 8, "dpmpp_2m", "f_scheduler")


def test_sample_refuses_missing_generator_missing_latent_and_mismatched_shapes():
    eps_fn, noise = gaussian_eps(SCHEDULE), make_noise()
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        sample(eps_fn, SCHEDULE, noise, 5, "euler_ancestral", "normal")
    with pytest.raises(ValueError, match="needs a latent"):
        sample(eps_fn, SCHEDULE, noise, 5, "ddim", "normal", denoise=0.5)
    with pytest.raises(ValueError, match=r"got \(2, 4, 4, 4\)"):
        sample(eps_fn, SCHEDULE, noise, 5, "ddim", "normal", latent=torch.zeros(2, 4, 4, 4), denoise=0.5)
    with pytest.raises(ValueError, match=r"got \(4, 8, 8\)"):
        sample(eps_fn, SCHEDULE, noise[0], 5, "ddim", "normal")


def test_name_lists_cover_the_combinations():
    assert set(VALID_SCHEDULERS) == set(SAMPLERS)
    assert {scheduler for schedulers in VALID_SCHEDULERS.values() for scheduler in schedulers} == set(SCHEDULERS)
    assert set(MOMENTUM_DEFAULTS) == {"hb_plms", "ghvb", "hb_dpmpp_2m"}
    for sampler, knob in MOMENTUM_DEFAULTS.items():
        check_sampler_settings(sampler, "normal", 10, momentum=knob)


def official_momentum_dpmpp_2m(eps_fn, x_vp, timesteps, ve_sigmas, beta):
    """The official MomentumDPMSolverMultistepScheduler (momentum-diffusion, stable_diffusion/diffusion/
    momentum_scheduler.py) as diffusers steps it, written out: dpmsolver++, midpoint, lower_order_final. The first
    step and the last (fewer than 15 steps) are diffusers' plain first-order update; every other step is the 2M
    update with heavy-ball velocity v = (1 − β)·v + β·(D0 + D1/2), started at the first 2M step."""
    def vp(s):
        return 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)

    def lam(s):
        return math.inf if s == 0 else -math.log(s)  # λ = log(α/σ) = −log(VE sigma)

    steps, velocity, outputs, x = len(timesteps), None, [], x_vp
    for i in range(steps):
        s0, s_t = float(ve_sigmas[i]), float(ve_sigmas[i + 1])
        (alpha_s0, sigma_s0), (alpha_t, sigma_t) = vp(s0), vp(s_t)
        eps = eps_fn(x, torch.full((x.shape[0],), float(timesteps[i])))
        outputs.append((x - sigma_s0 * eps) / alpha_s0)
        h = lam(s_t) - lam(s0)
        if i == 0 or (i == steps - 1 and steps < 15):
            x = (sigma_t / sigma_s0) * x - alpha_t * (math.exp(-h) - 1.0) * outputs[-1]
        else:
            h_0 = lam(s0) - lam(float(ve_sigmas[i - 1]))
            d0, d1 = outputs[-1], (outputs[-1] - outputs[-2]) / (h_0 / h)
            diff = d0 + 0.5 * d1
            velocity = diff if velocity is None else (1 - beta) * velocity + beta * diff
            x = (sigma_t / sigma_s0) * x - alpha_t * (math.exp(-h) - 1.0) * velocity
    return x / vp(float(ve_sigmas[-1]))[0]


@pytest.mark.parametrize("steps, beta", [(8, 0.8), (8, 0.5), (12, 0.8)])
def test_hb_dpmpp_2m_follows_the_official_momentum_recurrence(steps, beta):
    from nodes.sampling.dpm_solver import dpmpp_sample

    noise, eps_fn = make_noise(), gaussian_eps(SCHEDULE)
    timesteps = torch.linspace(999, 999 // steps, steps).round()
    table = SCHEDULE.ve_sigmas()
    ve_sigmas = torch.cat([table[timesteps.long()], torch.tensor([float(table[0]) * 0.5])])  # ends above 0
    x_vp = noise * float(1 / math.sqrt(1 + ve_sigmas[0] ** 2))
    ours = dpmpp_sample(eps_fn, x_vp, timesteps, ve_sigmas, order=2, beta=beta)
    official = official_momentum_dpmpp_2m(eps_fn, x_vp, timesteps, ve_sigmas, beta)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)
    plain = dpmpp_sample(eps_fn, x_vp, timesteps, ve_sigmas, order=2, beta=1.0)
    assert (ours - plain).abs().max() > 1e-3  # the momentum does something
