"""The sampler node's maths: one entry point, :func:`sample`, over diffusers' schedulers and the papers' samplers.

Every sampler steps on ε after guidance: the caller's ``eps_fn`` converts v- and x0-predictions with
``NoiseSchedule.eps_from_prediction``, so the diffusers schedulers are configured for ``"epsilon"`` and built from
the schedule's own ᾱ (any family, any number of training timesteps).

Valid combinations (``VALID_SCHEDULERS``); anything else is refused before any work:

=============== ======== ======== =========== =================================================================
sampler         normal   karras   f_scheduler what runs
=============== ======== ======== =========== =================================================================
euler           yes      yes      no          diffusers ``EulerDiscreteScheduler``
euler_ancestral yes      no       no          diffusers ``EulerAncestralDiscreteScheduler`` (no Karras option)
dpmpp_2m        yes      yes      yes         diffusers ``DPMSolverMultistepScheduler``; DPM++(2M) of
                                              ``dpm_solver.py`` on the F-scheduler's grid
ddim            yes      no       yes         diffusers ``DDIMScheduler`` (η = 0); DPM++(1S), which is DDIM, on
                                              the F-scheduler's grid
uni_pc          yes      yes      no          diffusers ``UniPCMultistepScheduler`` (bh2, order 2)
lcm             yes      no       no          diffusers ``LCMScheduler`` (its own skipping-step schedule)
tcd             yes      no       no          diffusers ``TCDScheduler`` (γ 0.3; its own schedule)
hb_plms         yes      no       no          HB on PLMS through DDIM's step; knob m (``momentum.py``)
ghvb            yes      no       no          GHVB through DDIM's step; knob m
hb_dpmpp_2m     yes      yes      yes         HB on DPM++(2M) (``dpm_solver.py``) on diffusers' 2M grid; knob β
=============== ======== ======== =========== =================================================================

Schedulers: ``normal`` spaces the timesteps evenly from the last training timestep (diffusers'
``timestep_spacing="trailing"``, which starts at pure noise: Lin et al. 2024, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", Table 2); ``karras`` uses Karras et al. 2022 sigmas (ρ 7) over the schedule's whole
range; ``f_scheduler`` is the truncated schedule of "Hyperparameters are all you need" (``schedules.py``), with
steps 5, 6 or 8, ending at a non-zero sigma. That paper runs ddim (= DPM++ 1S) at 5 and 6 steps and dpmpp_2m at 8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from ..common.denoiser import NoiseSchedule
from .dpm_solver import EpsFn, OnStep, dpmpp_sample
from .k_samplers import Sampler, sample_dpmpp_2m
from .momentum import GeneralizedHeavyBall, PLMSHeavyBall, sample_momentum
from .schedules import F_SCHEDULER_FAMILIES, F_SCHEDULER_STEPS, f_scheduler_schedule, vp_coefficients

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "ddim", "uni_pc", "lcm", "tcd", "hb_plms", "ghvb",
            "hb_dpmpp_2m")
SCHEDULERS = ("normal", "karras", "f_scheduler")
VALID_SCHEDULERS: dict[str, tuple[str, ...]] = {
    "euler": ("normal", "karras"),
    "euler_ancestral": ("normal",),
    "dpmpp_2m": ("normal", "karras", "f_scheduler"),
    "ddim": ("normal", "f_scheduler"),
    "uni_pc": ("normal", "karras"),
    "lcm": ("normal",),
    "tcd": ("normal",),
    "hb_plms": ("normal",),
    "ghvb": ("normal",),
    "hb_dpmpp_2m": ("normal", "karras", "f_scheduler"),
}
# Samplers that draw fresh noise every step, from the generator the caller passes.
STOCHASTIC_SAMPLERS = ("euler_ancestral", "lcm", "tcd")

# The one momentum knob per momentum sampler: (lowest excluded, highest included).
MOMENTUM_RANGES: dict[str, tuple[float, float]] = {
    "hb_plms": (0.0, 4.0),  # the momentum number m: order ⌈m⌉, β = m − ⌈m⌉ + 1 (momentum.order_and_beta)
    "ghvb": (0.0, 4.0),
    "hb_dpmpp_2m": (0.0, 1.0),  # β
}
# Suggested node defaults, techniques.md §4.3 (our choice, not a paper prescription): HB β 0.8 on DPM++2M;
# GHVB m 2.5. HB-PLMS m 3.8 is that β 0.8 on PLMS4, the order diffusers' PNDM runs.
MOMENTUM_DEFAULTS: dict[str, float] = {"hb_plms": 3.8, "ghvb": 2.5, "hb_dpmpp_2m": 0.8}

# diffusers' default original_inference_steps for LCMScheduler and TCDScheduler: the distillation schedule's
# length, out of which their timesteps are picked, so steps may not exceed it.
CONSISTENCY_ORIGINAL_STEPS = 50

_DIFFUSERS_SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "solver_type": "midpoint", "lower_order_final": True,
                                               "final_sigmas_type": "zero"}),
    # clip_sample defaults to True in DDIMScheduler, which would clamp latents' x0 to [-1, 1].
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}),
    "uni_pc": (UniPCMultistepScheduler, {"solver_order": 2, "predict_x0": True, "solver_type": "bh2",
                                         "final_sigmas_type": "zero"}),
    "lcm": (LCMScheduler, {"original_inference_steps": CONSISTENCY_ORIGINAL_STEPS, "clip_sample": False}),
    "tcd": (TCDScheduler, {"original_inference_steps": CONSISTENCY_ORIGINAL_STEPS, "clip_sample": False}),
}
# The diffusers scheduler each momentum sampler takes its grid (and, for PLMS/GHVB, its step) from.
_MOMENTUM_BASES = {"hb_plms": "ddim", "ghvb": "ddim", "hb_dpmpp_2m": "dpmpp_2m"}


def check_sampler_settings(sampler: str, scheduler: str, steps: int, *, denoise: float = 1.0,
                           momentum: float | None = None, family: str | None = None) -> None:
    """Refuse a sampler setting that :func:`sample` cannot run; the node's ``VALIDATE_INPUTS`` can call it.

    Args:
        sampler: one of ``SAMPLERS``.
        scheduler: one of ``VALID_SCHEDULERS[sampler]``.
        steps: number of steps, >= 1; 5, 6 or 8 for ``f_scheduler``; at most 50 for ``lcm`` and ``tcd``.
        denoise: in (0, 1], with int(steps·denoise) >= 1.
        momentum: only for the momentum samplers, within ``MOMENTUM_RANGES``; None means the default.
        family: ``f_scheduler``'s schedule depends on it (``"sd1"``, ``"sd2"``, ``"sdxl"``); None means not known
            yet (a node's validation, before the model arrives): building the schedule checks it then.
    Raises:
        ValueError: the message names the value and what is accepted.
    Example:
        >>> check_sampler_settings("dpmpp_2m", "karras", 20)
        >>> check_sampler_settings("euler_ancestral", "karras", 20)
        Traceback (most recent call last):
        ...
        ValueError: sampler 'euler_ancestral' runs with schedulers ('normal',); got 'karras'
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    if scheduler not in VALID_SCHEDULERS[sampler]:
        raise ValueError(f"sampler {sampler!r} runs with schedulers {VALID_SCHEDULERS[sampler]}; got {scheduler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if scheduler == "f_scheduler":
        if steps not in F_SCHEDULER_STEPS:
            raise ValueError(f"the f_scheduler supports steps in {F_SCHEDULER_STEPS}; got {steps}")
        if family is not None and family not in F_SCHEDULER_FAMILIES:
            raise ValueError(f"the f_scheduler needs the model family, one of {F_SCHEDULER_FAMILIES}; got {family!r}")
    if sampler in ("lcm", "tcd") and steps > CONSISTENCY_ORIGINAL_STEPS:
        raise ValueError(f"{sampler} picks its steps from a {CONSISTENCY_ORIGINAL_STEPS}-step schedule, so steps must "
                         f"be <= {CONSISTENCY_ORIGINAL_STEPS}; got {steps}")
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1]; got {denoise}")
    if int(steps * denoise) < 1:
        raise ValueError(f"denoise × steps must leave at least one step; got denoise={denoise}, steps={steps}")
    if momentum is not None:
        check_momentum(sampler, momentum)


def check_momentum(sampler: str, momentum: float) -> None:
    """Refuse a momentum knob outside ``MOMENTUM_RANGES[sampler]``, or one given to a sampler without momentum.

    Example:
        >>> check_momentum("hb_dpmpp_2m", 2.5)
        Traceback (most recent call last):
        ...
        ValueError: momentum for 'hb_dpmpp_2m' must be in (0.0, 1.0]; got 2.5
    """
    if sampler not in MOMENTUM_RANGES:
        raise ValueError(f"momentum applies to the samplers {tuple(MOMENTUM_RANGES)} only; got momentum="
                         f"{momentum} for {sampler!r}")
    low, high = MOMENTUM_RANGES[sampler]
    if not low < momentum <= high:
        raise ValueError(f"momentum for {sampler!r} must be in ({low}, {high}]; got {momentum}")


def momentum_sampler(method: str, momentum: float) -> Sampler:
    """A momentum sampler as a SAMPLER, in the k-diffusion convention (``k_samplers.py``), for any sigmas.

    HB-PLMS and GHVB step DDIM in the VE form with the momentum direction (:func:`~.momentum.sample_momentum`,
    knob m); HB-DPM++2M is ComfyUI's DPM-Solver++(2M) with the heavy ball on its estimate
    (:func:`~.k_samplers.sample_dpmpp_2m`, knob β).

    Args:
        method: one of ``MOMENTUM_RANGES`` (``"hb_plms"``, ``"ghvb"``, ``"hb_dpmpp_2m"``).
        momentum: the method's knob, within its range.
    Returns:
        The :class:`~.k_samplers.Sampler`; :meth:`~.k_samplers.Sampler.for_host` turns it into ComfyUI's.
    Raises:
        ValueError: an unknown method or a knob out of its range.
    Example:
        >>> momentum_sampler("hb_dpmpp_2m", 0.8).options
        {'beta': 0.8}
    """
    check_momentum(method, momentum)
    if method == "hb_dpmpp_2m":
        return Sampler(sample_dpmpp_2m, {"beta": momentum}, f"{method} (beta={momentum:g})")
    return Sampler(sample_momentum, {"method": method, "momentum": momentum}, f"{method} (m={momentum:g})")


@torch.no_grad()
def sample(eps_fn: EpsFn, schedule: NoiseSchedule, noise: torch.Tensor, steps: int, sampler: str, scheduler: str, *,
           latent: torch.Tensor | None = None, denoise: float = 1.0, generator: torch.Generator | None = None,
           momentum: float | None = None, family: str | None = None,
           on_step: OnStep | None = None) -> torch.Tensor:
    """Sample latents with one of ``SAMPLERS`` on one of ``SCHEDULERS``.

    Text-to-image (``latent=None``) starts from ``noise`` scaled as the scheduler expects (diffusers'
    ``init_noise_sigma``; σ_max for the F-scheduler, as its official code). Image-to-image starts part-way down the
    schedule, as diffusers' img2img pipelines do with ``strength``: of the ``steps``-step schedule only the last
    int(steps·denoise) steps run, from ``latent`` noised to the first of them.

    Args:
        eps_fn: ``eps_fn(x, t) -> ε`` after guidance, for latents x (B, C, h, w) as the denoiser sees them and
            timesteps t of shape (B,), float32 (fractional for Karras and F-scheduler grids).
        schedule: the model's noise schedule.
        noise: the initial Gaussian noise, (B, C, h, w); its dtype is the sampler state's (use float32).
        steps: number of steps of the full schedule (see :func:`check_sampler_settings`).
        sampler: one of ``SAMPLERS``.
        scheduler: one of ``VALID_SCHEDULERS[sampler]``.
        latent: the scaled start latent for image-to-image, shape of ``noise``; None for text-to-image.
        denoise: in (0, 1]; below 1 needs ``latent``.
        generator: seeds the per-step noise of ``STOCHASTIC_SAMPLERS`` (required for them); same seed, same bits.
        momentum: m for hb_plms and ghvb, β for hb_dpmpp_2m; None uses ``MOMENTUM_DEFAULTS``.
        family: the model family, needed by the f_scheduler.
        on_step: called once per step as ``on_step(done, total, x0)``, ``done`` in 1..total, with the step's x0
            estimate (B, C, h, w); :func:`~nodes.sampling.previews.progress_reporter` makes one that reports a
            preview and raises on an interrupt, which stops sampling.
    Returns:
        The sampled latents (B, C, h, w), scaled as the denoiser sees them: x0, or for the f_scheduler
        x0 + s_end·noise (its last sigma is not zero; the VAE decodes it as it is).
    Raises:
        ValueError: a setting is refused (message names it), or shapes do not match.
    Example:
        >>> betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        >>> schedule = NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")
        >>> noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> calls = []
        >>> out = sample(lambda x, t: calls.append(t) or x, schedule, noise, 5, "hb_dpmpp_2m", "f_scheduler",
        ...              family="sd1")
        >>> out.shape, len(calls), [round(float(c[0]), 1) for c in calls]
        (torch.Size([1, 4, 8, 8]), 5, [999.0, 772.5, 556.7, 354.2, 170.0])
    """
    # 1. Check inputs
    check_sampler_settings(sampler, scheduler, steps, denoise=denoise, momentum=momentum, family=family)
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape (B, C, h, w); got {tuple(noise.shape)}")
    if latent is not None and (latent.shape != noise.shape or latent.device != noise.device):
        raise ValueError(f"latent must match noise's shape {tuple(noise.shape)} and device {noise.device}; "
                         f"got {tuple(latent.shape)} on {latent.device}")
    if latent is None and denoise < 1:
        raise ValueError(f"denoise < 1 is image-to-image and needs a latent; got denoise={denoise} and no latent")
    if sampler in STOCHASTIC_SAMPLERS and generator is None:
        raise ValueError(f"{sampler!r} draws noise every step and needs a torch.Generator for determinism; got None")
    if momentum is None:
        momentum = MOMENTUM_DEFAULTS.get(sampler)
    # Of the full schedule, run its last int(steps·denoise) steps, as diffusers' img2img get_timesteps does.
    start = steps - int(steps * denoise)

    # 2. Run on the grid the scheduler names
    if scheduler == "f_scheduler":
        timesteps, sigmas = f_scheduler_schedule(schedule, steps, family)
        order = 1 if sampler == "ddim" else 2
        beta = momentum if sampler == "hb_dpmpp_2m" else 1.0
        x = _noised_start(noise, latent, float(sigmas[start]), text_noise_scale=None)
        return dpmpp_sample(eps_fn, x, timesteps[start:-1], sigmas[start:], order=order, beta=beta,
                            on_step=on_step)
    if sampler == "hb_dpmpp_2m":
        grid = _diffusers_scheduler(_MOMENTUM_BASES[sampler], scheduler, schedule)
        grid.set_timesteps(steps)
        sigmas = grid.sigmas[start:].to(torch.float64)
        x = _noised_start(noise, latent, float(sigmas[0]), text_noise_scale=float(grid.init_noise_sigma))
        return dpmpp_sample(eps_fn, x, grid.timesteps[start:], sigmas, order=2, beta=momentum, on_step=on_step)
    base = _diffusers_scheduler(_MOMENTUM_BASES.get(sampler, sampler), scheduler, schedule)
    direction = {"hb_plms": PLMSHeavyBall, "ghvb": GeneralizedHeavyBall}.get(sampler)
    return _run_diffusers(eps_fn, schedule, base, noise, latent, steps, start,
                          generator=generator if sampler in STOCHASTIC_SAMPLERS else None,
                          direction=None if direction is None else direction(momentum), on_step=on_step)


def _diffusers_scheduler(name: str, scheduler: str, schedule: NoiseSchedule) -> SchedulerMixin:
    """A fresh diffusers scheduler for ``name`` on ``schedule``'s ᾱ, configured for ε and the named spacing."""
    cls, options = _DIFFUSERS_SCHEDULERS[name]
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
    betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    if name not in ("lcm", "tcd"):  # they pick timesteps from their distillation schedule, not by spacing
        if scheduler == "karras":
            # Euler takes Karras' σ_min and σ_max from its spaced grid: "linspace" is the one that spans 999..0.
            options = {**options, "use_karras_sigmas": True, "timestep_spacing": "linspace"}
        else:
            options = {**options, "timestep_spacing": "trailing"}
    return cls(num_train_timesteps=schedule.num_train_timesteps, trained_betas=betas.tolist(),
               prediction_type="epsilon", **options)


def _noised_start(noise: torch.Tensor, latent: torch.Tensor | None, sigma: float,
                  text_noise_scale: float | None) -> torch.Tensor:
    """VP latents at VE sigma ``sigma``: α·latent + σ·noise, or for text-to-image noise × ``text_noise_scale``
    (None: × σ, so that the VE state is s_max·noise as k-diffusion-style code starts)."""
    alpha, sigma_vp = vp_coefficients(sigma)
    if latent is not None:
        return alpha * latent + sigma_vp * noise
    return noise * (sigma_vp if text_noise_scale is None else text_noise_scale)


def _run_diffusers(eps_fn: EpsFn, schedule: NoiseSchedule, scheduler: SchedulerMixin, noise: torch.Tensor,
                   latent: torch.Tensor | None, steps: int, start: int, *, generator: torch.Generator | None,
                   direction: Callable[[torch.Tensor], torch.Tensor] | None, on_step: OnStep | None) -> torch.Tensor:
    """The diffusers denoising loop, with an optional momentum ``direction`` fed to ``step`` in place of ε."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):  # DDIM has none: its step finds its place from the timestep
        scheduler.set_begin_index(start)
    if latent is None:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(latent, noise, timesteps[:1])
    step_options = {} if generator is None else {"generator": generator}
    batch, total = x.shape[0], len(timesteps)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t)
        t_model = torch.full((batch,), float(t), dtype=torch.float32, device=x.device)
        eps = eps_fn(model_input, t_model).to(x.dtype)
        x = scheduler.step(eps if direction is None else direction(eps), t, x, **step_options).prev_sample
        if on_step is not None:
            alpha_bar = float(schedule.alpha_bar(torch.tensor(float(t))))
            on_step(i + 1, total, (model_input - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5)
    return x
