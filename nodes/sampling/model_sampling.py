"""The k-diffusion (VE) view of a discrete VP schedule: what ComfyUI's samplers and schedulers see of a model.

A discrete VP model is trained on x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. Dividing by √ᾱ_t gives the variance-exploding form
x = x₀ + σ·ε with σ_t = √((1−ᾱ_t)/ᾱ_t) (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1, VP column), on which every k-diffusion sampler steps. :class:`DiscreteModelSampling`
holds the 1000 training sigmas (float32, ascending, as ComfyUI's ``ModelSamplingDiscrete`` keeps them, so that
schedulers that index or interpolate them give ComfyUI's values) and converts between the network's input/output
and the denoised estimate x̂₀:

- the network sees c_in·x with c_in = 1/√(σ² + σ_data²), σ_data = 1 (Karras et al. 2022, Table 1);
- ε-prediction: x̂₀ = x − σ·ε;
- v-prediction (Salimans & Ho 2022, "Progressive Distillation", §4): x̂₀ = x/(σ²+1) − v·σ/√(σ²+1);
- x₀-prediction ("sample"): x̂₀ is the output;
- LCM (Luo et al. 2023, "Latent Consistency Models", Eq. 7-8): x̂₀ = c_skip(t)·x + c_out(t)·(x − σ·ε), with
  c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²), σ_d = 0.5, on the 50-step skipping schedule it was
  distilled on (timesteps 19, 39, ..., 999).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..common.denoiser import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "lcm")
BETA_SCHEDULES = ("scaled_linear", "linear")
# The data standard deviation of Karras et al.'s preconditioning; 1 for Stable Diffusion's latents.
SIGMA_DATA = 1.0
# LCM's boundary-condition constants (Luo et al. 2023, Eq. 8, and their released scheduler): σ_data 0.5, and the
# timestep scaled by 10 so that c_skip(t) ≈ 1 only very near t = 0.
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0
# LCM was distilled on 50 timesteps out of 1000 ("skipping-step" schedule, Luo et al. 2023, §4.3).
LCM_ORIGINAL_STEPS = 50
# Lin et al. 2024's zero-terminal-SNR rescale leaves ᾱ_T = 0, whose σ is infinite; ComfyUI keeps the last ᾱ at
# this small value so that σ_T stays finite (≈ 4518.9).
ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def beta_schedule_alphas_cumprod(beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                                 beta_end: float = 0.012, num_train_timesteps: int = 1000,
                                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ᾱ_t = ∏(1 − β_s) of a DDPM beta schedule, in float64 (as ComfyUI's ``make_beta_schedule`` computes it) or in
    float32 (as diffusers' schedulers compute it).

    ``scaled_linear`` (Stable Diffusion 1.x, 2.x, SDXL; ComfyUI calls it "linear") spaces √β linearly from
    √beta_start to √beta_end; ``linear`` (the DDPM paper's) spaces β itself. diffusers' names are used here.

    Returns:
        ᾱ of shape (num_train_timesteps,), in ``dtype``.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {beta_schedule!r}")
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    return torch.cumprod(1.0 - betas, dim=0)


def one_step_x0(noisy: torch.Tensor, eps: torch.Tensor, timestep: int) -> torch.Tensor:
    """What diffusers' DDPM scheduler steps to in a one-step schedule from ``timestep`` on SD's scaled_linear
    betas (ᾱ in float32, as diffusers computes it): the x0 that the predicted noise ``eps`` implies. The step's
    variance term, √1e-20 of a fresh noise, is left out. One-step models read this way: DiffDIS, TVT.

    Example:
        >>> noisy = torch.ones(1)
        >>> round(float(one_step_x0(noisy, torch.zeros(1), 999)), 3)  # 1 / √ᾱ_999
        14.649
    """
    alpha_bar = float(beta_schedule_alphas_cumprod(dtype=torch.float32)[timestep])
    return (noisy - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5


def zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Rescale VE sigmas so that the last timestep has (almost) zero SNR.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift √ᾱ so
    that its last value is 0, then scale it so that its first value is unchanged. The last ᾱ is then set to
    :data:`ZERO_SNR_LAST_ALPHA_BAR` rather than 0, so that σ stays finite.
    """
    sqrt_alpha_bar = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    alpha_bar[-1] = ZERO_SNR_LAST_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """σ broadcastable against a (B, ...) tensor of ``ndim`` dims: a scalar stays a scalar, (B,) becomes (B, 1, ...)."""
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


class SigmaTable:
    """What the schedulers read of a sampling view: its ascending table of sigmas, ``sigmas`` (float32)."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> torch.Tensor:
        """The smallest sigma of the table (a 0-d float32 tensor)."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """The largest sigma of the table (a 0-d float32 tensor)."""
        return self.sigmas[-1]


class DiscreteModelSampling(SigmaTable):
    """The VE sigmas of a discrete VP schedule and the denoiser's pre- and post-conditioning on them.

    Equivalent to ComfyUI's ``ModelSamplingDiscrete`` with ``EPS``, ``V_PREDICTION`` or ``X0``, and, for
    ``prediction_type="lcm"``, to its ``ModelSamplingDiscreteDistilled`` with ``LCM`` (the ``ModelSamplingDiscrete``
    node's "lcm" option).

    Args:
        alphas_cumprod: ᾱ of shape (T,); float64 gives ComfyUI's sigmas to the last bit (see
            :func:`beta_schedule_alphas_cumprod`).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        zero_terminal_snr: rescale the sigmas as :func:`zero_terminal_snr_sigmas` (ComfyUI's ``zsnr``).

    Example:
        >>> sampling = DiscreteModelSampling(beta_schedule_alphas_cumprod(), "epsilon")
        >>> sampling.sigmas.shape, round(float(sampling.sigma_min), 4), round(float(sampling.sigma_max), 3)
        (torch.Size([1000]), 0.0292, 14.615)
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", *,
                 zero_terminal_snr: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if alphas_cumprod.ndim != 1 or alphas_cumprod.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 values; got {tuple(alphas_cumprod.shape)}")
        self.prediction_type = prediction_type
        self.zero_terminal_snr = zero_terminal_snr
        self.num_train_timesteps = alphas_cumprod.shape[0]
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if zero_terminal_snr:
            sigmas = zero_terminal_snr_sigmas(sigmas)
        self.skip_steps = 1
        if prediction_type == "lcm":
            self.skip_steps = self.num_train_timesteps // LCM_ORIGINAL_STEPS
            # Timesteps T−1, T−1−skip, ... (999, 979, ..., 19), ascending; taken from the float32 table.
            table = sigmas.float()
            sigmas = table[self.skip_steps - 1::self.skip_steps][-LCM_ORIGINAL_STEPS:]
        # The log table is taken before the float32 cast (ComfyUI's order): log σ of the float64 values, rounded.
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def noise_schedule(self) -> NoiseSchedule:
        """The training schedule this view samples on, ᾱ = 1/(1 + σ²) from its sigma table (as
        ``comfy_host.comfy_noise_schedule`` reads ComfyUI's), for the nodes that compute sigmas from a MODEL's
        schedule when a ref's override replaces the model's own.

        Raises:
            ValueError: an LCM view, whose table holds 50 of the training timesteps.
        """
        if self.skip_steps != 1:
            raise ValueError("an LCM sampling view holds 50 of the training timesteps, not the schedule")
        return NoiseSchedule(1 / (1 + self.sigmas.to(torch.float64) ** 2), self.prediction_type)

    @classmethod
    def from_noise_schedule(cls, schedule: NoiseSchedule, *, zero_terminal_snr: bool = False) -> DiscreteModelSampling:
        """The VE view of Atelier's :class:`~nodes.common.denoiser.NoiseSchedule` (same ᾱ, same prediction type).

        ComfyUI computes ᾱ in float64 from the betas; a schedule whose ᾱ went through float32 (diffusers keeps
        ``alphas_cumprod`` in float32) gives sigmas that differ in the last bits. Prefer
        :meth:`from_beta_schedule` when the betas are known.
        """
        return cls(schedule.alphas_cumprod.to(torch.float64), schedule.prediction_type,
                   zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def from_beta_schedule(cls, prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                           beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                           *, zero_terminal_snr: bool = False) -> DiscreteModelSampling:
        """From a diffusers-style beta schedule; the defaults are Stable Diffusion 1.x/2.x/SDXL's."""
        alphas_cumprod = beta_schedule_alphas_cumprod(beta_schedule, beta_start, beta_end, num_train_timesteps)
        return cls(alphas_cumprod, prediction_type, zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any],
                              prediction_type: str | None = None) -> DiscreteModelSampling:
        """From a diffusers scheduler's config, with ᾱ computed in float64 from its betas as ComfyUI does.

        diffusers keeps ``alphas_cumprod`` in float32, whose sigmas differ from ComfyUI's by up to 1.3e-5
        (relative); this gives ComfyUI's exactly. Reads ``beta_schedule``, ``beta_start``, ``beta_end``,
        ``num_train_timesteps``, ``prediction_type`` (unless given) and ``rescale_betas_zero_snr``.

        Raises:
            ValueError: a beta schedule other than :data:`BETA_SCHEDULES` (use :meth:`from_noise_schedule`).
        """
        return cls.from_beta_schedule(
            prediction_type or config.get("prediction_type", "epsilon"), config.get("beta_schedule", "linear"),
            config.get("beta_start", 0.0001), config.get("beta_end", 0.02), config.get("num_train_timesteps", 1000),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep whose sigma is nearest to ``sigma`` in log space (an integer tensor, same shape).

        For LCM, the nearest of its 50 distilled timesteps, counted on the 1000-step axis.
        """
        log_sigma = sigma.log()
        distances = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        index = distances.abs().argmin(dim=0).view(sigma.shape)
        return (index * self.skip_steps + (self.skip_steps - 1)).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ at (possibly fractional) training timesteps, interpolated linearly in log σ, clamped to the table."""
        position = timestep.float().to(self.log_sigmas.device)
        if self.skip_steps > 1:
            position = (position - (self.skip_steps - 1)) / self.skip_steps
        position = position.clamp(min=0, max=len(self.sigmas) - 1)
        low, high, weight = position.floor().long(), position.ceil().long(), position.frac()
        log_sigma = (1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """σ at a fraction of the sampling run (0 = start, pure noise; 1 = end), as timestep-range nodes use it.

        0 or less gives a sigma above any schedule's (999999999.9), 1 or more gives 0.
        """
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the network sees: c_in·x = x/√(σ² + σ_data²), the VP latent (Karras et al. 2022, Table 1).

        Args:
            sigma: () or (B,).
            x: (B, ...) VE latents.
        """
        sigma = _per_sample(sigma, x.ndim)
        return x / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the network's raw output at the VE latent ``x`` (module docstring for each prediction type).

        Args:
            sigma: () or (B,).
            model_output, x: (B, ...).
        """
        if self.prediction_type == "sample":
            return model_output
        sigma_b = _per_sample(sigma, model_output.ndim)
        if self.prediction_type == "v_prediction":
            variance = sigma_b ** 2 + SIGMA_DATA ** 2
            return x * SIGMA_DATA ** 2 / variance - model_output * sigma_b * SIGMA_DATA / variance ** 0.5
        denoised = x - model_output * sigma_b
        if self.prediction_type == "epsilon":
            return denoised
        timestep = self.timestep(sigma).reshape(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        scaled = timestep * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2)
        c_out = scaled / (scaled ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
        return c_out * denoised + c_skip * x

    def apply_model(self, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
        """x̂₀ from a network on discrete timesteps, as ComfyUI's ``BaseModel.apply_model`` runs one.

        The network sees the VP latent :meth:`calculate_input` (σ, x) and the *nearest integer* training timestep
        of σ (:meth:`timestep`, as a float), not a fractional one; its output, in float32, goes through
        :meth:`calculate_denoised`. Conditioning, extra input channels (inpainting models) and the network's dtype
        belong to ``network``.

        Args:
            network: (x_in (B, C, h, w), t (B,)) -> raw prediction of this model's prediction type.
            x: (B, C, h, w) VE latents.
            sigma: (B,).
        Returns:
            x̂₀ of shape (B, C, h, w).
        """
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must have shape ({x.shape[0]},) for x of shape {tuple(x.shape)}; "
                             f"got {tuple(sigma.shape)}")
        output = network(self.calculate_input(sigma, x), self.timestep(sigma).float())
        return self.calculate_denoised(sigma, output.float(), x)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The starting point x = latent + σ·noise of a run that begins at ``sigma``.

        With ``max_denoise`` (the run starts at the model's σ_max, so the latent is pure noise) the noise is scaled
        by √(1 + σ²) instead: the VE image of a unit-variance VP latent, x_T/√ᾱ_T (ComfyUI's convention).
        """
        sigma = _per_sample(sigma, noise.ndim)
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The sampler's result as a latent: the identity for VE models (a flow model would rescale here)."""
        return x

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """Whether a run over ``sigmas`` starts from pure noise: σ₀ ≥ σ_max, within a relative 1e-5."""
        max_sigma, first = float(self.sigma_max), float(sigmas[0])
        return math.isclose(max_sigma, first, rel_tol=1e-05) or first > max_sigma


def is_flow_sampling(sampling: object) -> bool:
    """Whether a sampling view (Atelier's or ComfyUI's ``model_sampling``) is a flow's: Atelier's
    :class:`RectifiedFlowSampling`, or ComfyUI's ``CONST`` models (SD3, Flux, the rectified-flow patch)."""
    return getattr(sampling, "prediction_type", None) == "flow" or any(
        cls.__name__ == "CONST" for cls in type(sampling).__mro__)


class RectifiedFlowSampling(SigmaTable):
    """The sampling view of a rectified-flow UNet (InstaFlow, 2-Rectified Flow; Liu et al. 2023, "InstaFlow: One
    Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation"), with the interface of
    :class:`DiscreteModelSampling`: ComfyUI's ``ModelSamplingDiscreteFlow`` (shift 1, multiplier 1000) with ``CONST``,
    except for the sign of the network's output.

    The latent at σ ∈ [0, 1] is x = (1 − σ)·x₀ + σ·noise and the network, told t = 1000·σ, predicts the velocity
    toward the data, v = x₀ − noise (InstaFlow's pipeline steps ``latents + dt·v`` from t = 1000 down); so
    x̂₀ = x + σ·v, where ComfyUI's CONST models (SD3, whose v is noise − x₀) subtract. Euler on these sigmas is the
    authors' sampler exactly: x + (σ_next − σ)·(x − x̂₀)/σ = x + (σ − σ_next)·v.

    Example:
        >>> sampling = RectifiedFlowSampling()
        >>> float(sampling.sigma_max), float(sampling.timestep(torch.tensor(0.5)))
        (1.0, 500.0)
    """

    prediction_type = "flow"
    num_train_timesteps = 1000
    multiplier = 1000.0

    def __init__(self):
        # ComfyUI's table: σ at t = 1 … 1000, for the schedulers that read the table ("simple", ...)
        self.sigmas = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float32) / self.num_train_timesteps
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's (continuous) timestep, 1000·σ."""
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep / self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        """σ at a fraction of the run (0 = start): 1 − percent, clamped, as ComfyUI's flow sampling."""
        return 1.0 - min(max(percent, 0.0), 1.0)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + model_output * _per_sample(sigma, model_output.ndim)

    def apply_model(self, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the velocity network (x (B, C, h, w), t (B,)) at σ (B,)."""
        output = network(self.calculate_input(sigma, x), self.timestep(sigma).float())
        return self.calculate_denoised(sigma, output.float(), x)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The starting point σ·noise + (1 − σ)·latent (pure noise at σ = 1)."""
        sigma = _per_sample(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (1.0 - sigma)

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """Whether a run over ``sigmas`` starts from pure noise: σ₀ ≥ 1, within a relative 1e-5."""
        first = float(sigmas[0])
        return math.isclose(first, 1.0, rel_tol=1e-05) or first > 1.0
