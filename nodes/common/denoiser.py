"""The small seam every technique works through: a denoiser, its noise schedule, and a latent codec (the VAE).

A technique calls a denoiser with ``(x_t, t, conditioning)`` and gets the model's raw prediction, in the
family's prediction type; :class:`NoiseSchedule` converts it to the noise ε that samplers step with. diffusers
is the first implementation (:class:`DiffusersDenoiser`); ComfyUI's own MODEL and VAE stand behind the same two
protocols through ``nodes/models/comfy_adapters.py``, so keep them small.

Notation (as in ``techniques.md`` §4): ᾱ_t = ``alphas_cumprod[t]``; the VP noise std σ_t = √(1−ᾱ_t); the VE
sigma s_t = σ_t / √ᾱ_t; ε is the noise prediction after classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .memory import MEMORY, runs_on

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule and what the model predicts on it.

    Example:
        >>> betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
        >>> schedule = NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")
        >>> round(float(schedule.ve_sigmas()[999]), 3)
        14.615
    """

    alphas_cumprod: torch.Tensor  # (T,), float64
    prediction_type: str

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {self.prediction_type!r}")
        if self.alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D; got shape {tuple(self.alphas_cumprod.shape)}")

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def ve_sigmas(self) -> torch.Tensor:
        """s_t = √((1−ᾱ_t)/ᾱ_t) for every training timestep."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at (possibly fractional) timesteps, linearly interpolated between the integer ones."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        weight = t - low
        table = self.alphas_cumprod.to(t.device)
        return table[low] * (1 - weight) + table[high] * weight

    def eps_from_prediction(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The noise ε implied by the model's raw ``prediction`` at ``x_t``, timestep ``t`` (shape (B,) or ())."""
        if self.prediction_type == "epsilon":
            return prediction
        alpha_bar = self.alpha_bar(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.prediction_type == "v_prediction":  # v = a·ε − s·x0, x_t = a·x0 + s·ε  ⇒  ε = s·x_t + a·v
            return s * x_t + a * prediction
        return (x_t - a * prediction) / s  # "sample": the model predicts x0


@dataclasses.dataclass
class Conditioning:
    """What a denoiser is conditioned on, batched like the latents it goes with.

    ``embeds`` are the cross-attention states (B, L, D). SDXL adds ``pooled`` (B, P) text embeddings and
    ``time_ids`` (B, 6): original size, crop corner and target size (the refiner: (B, 5), with the aesthetic score
    last). ``concat`` (B, C', h, w) is joined to the latents' channels before the UNet: the mask and masked image of
    inpainting models.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3:
            raise ValueError(f"embeds must have shape (B, L, D); got {tuple(self.embeds.shape)}")
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("pooled and time_ids come together (SDXL) or not at all")

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def to(self, device: torch.device | str) -> Conditioning:
        """This conditioning on ``device``."""
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return Conditioning(move(self.embeds), move(self.pooled), move(self.time_ids), move(self.concat))

    def repeat_to(self, batch_size: int) -> Conditioning:
        """This conditioning for ``batch_size`` latents: a batch of 1 is repeated, a matching batch kept."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"conditioning has batch {self.batch_size}; it must be 1 or the latents' {batch_size}")

        def expand(tensor):
            return None if tensor is None else tensor.expand(batch_size, *tensor.shape[1:])

        return Conditioning(expand(self.embeds), expand(self.pooled), expand(self.time_ids), expand(self.concat))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batch conditionings together (for one UNet call over the guided and the unguided halves).

        Sequence lengths may differ (a LongAlign prompt against a standard 77-token one): each sequence is repeated
        whole up to the least common multiple of the lengths, as ComfyUI pads. Repeating every key the same number
        of times leaves each prompt's attention weights as they were; padding with one repeated token would give that
        token the softmax mass of all its copies.

        Example:
            >>> short, long = Conditioning(torch.zeros(1, 77, 8)), Conditioning(torch.zeros(1, 154, 8))
            >>> Conditioning.cat([short, long]).embeds.shape
            torch.Size([2, 154, 8])
        """
        length = math.lcm(*(part.embeds.shape[1] for part in parts))
        embeds = torch.cat([part.embeds.repeat(1, length // part.embeds.shape[1], 1) for part in parts])

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            if all(value is None for value in values):
                return None
            if any(value is None for value in values):
                raise ValueError(f"conditionings to batch must all have {name} or none")
            return torch.cat(values)

        return Conditioning(embeds, cat("pooled"), cat("time_ids"), cat("concat"))


class Denoiser(Protocol):
    """A noise-prediction network on a discrete VP schedule."""

    schedule: NoiseSchedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The raw prediction (of ``schedule.prediction_type``) for latents ``x_t`` (B, C, h, w) at timesteps ``t``
        (B,), as the model sees them (already multiplied by the codec's scaling factor)."""
        ...


class LatentSpace(Protocol):
    """A model's latents: their channels, their size against the image's, and how the denoiser sees them scaled.
    A sampler needs this much and no VAE."""

    latent_channels: int
    downscale: int  # f
    scaling_factor: float  # latents × this (after subtracting shift_factor) are what the denoiser sees
    shift_factor: float


class LatentCodec(LatentSpace, Protocol):
    """A VAE: images (B, 3, H, W) in 0..1 to latents (B, C, H/f, W/f) and back, unscaled as ComfyUI keeps them;
    ``device`` is where it computes."""

    device: torch.device

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


def guided_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, positive: Conditioning,
               negative: Conditioning, cfg: float) -> torch.Tensor:
    """Classifier-free guided ε: ε_u + cfg·(ε_c − ε_u), both halves in one batched denoiser call.

    With ``cfg == 1`` the unguided half is skipped: the result is ε_c exactly, at half the cost.

    Args:
        x_t: latents (B, C, h, w) as the denoiser sees them.
        t: timesteps, shape (B,) or a scalar.
        positive, negative: conditionings of batch 1 or B.
        cfg: guidance scale, >= 0.
    Returns:
        ε of shape (B, C, h, w).
    """
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0; got {cfg}")
    batch = x_t.shape[0]
    t = t.expand(batch) if t.ndim == 0 else t
    if cfg == 1:
        return denoiser.schedule.eps_from_prediction(x_t, t, denoiser(x_t, t, positive.repeat_to(batch)))
    both = Conditioning.cat([positive.repeat_to(batch), negative.repeat_to(batch)])
    x_both, t_both = torch.cat([x_t, x_t]), torch.cat([t, t])
    eps = denoiser.schedule.eps_from_prediction(x_both, t_both, denoiser(x_both, t_both, both))
    eps_positive, eps_negative = eps.chunk(2)
    return eps_negative + cfg * (eps_positive - eps_negative)


class DiffusersDenoiser:
    """:class:`Denoiser` over a diffusers ``UNet2DConditionModel``.

    ``unet_patch(unet, x, t, embeds, added_cond_kwargs) -> prediction`` evaluates the network in place of its own
    forward: a step-aware patch's UNet hook (``nodes/sampling/patches.py``); None: the UNet's forward.
    ``differentiable``: gradients flow through the network to its inputs where the caller enables them (prompt
    optimisation); otherwise it runs without them.
    """

    def __init__(self, unet, schedule: NoiseSchedule, unet_patch: Callable[..., torch.Tensor] | None = None,
                 differentiable: bool = False):
        self.unet = unet
        self.schedule = schedule
        self.unet_patch = unet_patch
        self.differentiable = differentiable
        # ModelMixin.dtype walks every submodule on each read (1.4 ms for SD1.5's UNet, 3.9 ms for SDXL's, per
        # step, measured by bench/sampler.py's author); read it once.
        self.dtype = unet.dtype

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        dtype = self.dtype
        conditioning = conditioning.to(x_t.device)  # text encoders leave it on the CPU, as ComfyUI's do
        added = None
        if conditioning.pooled is not None:  # SDXL's micro-conditioning
            added = {"text_embeds": conditioning.pooled.to(dtype), "time_ids": conditioning.time_ids.to(dtype)}
        if conditioning.concat is not None:
            x_t = torch.cat([x_t, conditioning.concat.to(x_t)], dim=1)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            if self.unet_patch is None:
                prediction = self.unet(x_t.to(dtype), t, encoder_hidden_states=conditioning.embeds.to(dtype),
                                       added_cond_kwargs=added).sample
            else:
                prediction = self.unet_patch(self.unet, x_t.to(dtype), t.expand(x_t.shape[0]) if t.ndim == 0 else t,
                                             conditioning.embeds.to(dtype), added)
        return prediction.to(x_t.dtype)


class DiffusersCodec:
    """:class:`LatentCodec` over a diffusers ``AutoencoderKL``; encoding takes the posterior's mean."""

    def __init__(self, vae, recipe: Any = None):
        """``recipe``: how a tile pool's worker rebuilds this VAE, a ``ModelRecipe`` of the checkpoint it came
        with (see ``nodes/common/tile_pool.py``); None for a VAE that only this process has."""
        self.vae = vae
        self.recipe = recipe
        self.latent_channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = vae.config.shift_factor or 0.0

    @property
    def device(self) -> torch.device:
        """Where the VAE runs, without touching its weights (the memory manager may hold them elsewhere)."""
        return runs_on(self.vae)

    def in_use(self) -> contextlib.AbstractContextManager:
        """Holds the VAE on its device (the memory manager may have offloaded it) for the block; encode and decode
        hold it themselves, a caller that reads ``vae`` across several of them holds it around them all."""
        return MEMORY.use_module(self.vae)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.in_use():
            posterior = self.vae.encode((image * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        return posterior.mean.float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.in_use():
            image = self.vae.decode(latent.to(self.vae.device, self.vae.dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)
