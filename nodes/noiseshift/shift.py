"""NoiseShift (row 29 of the paper list): tell the network a recalibrated noise level at resolutions it was not
trained at, found by a grid search on its one-step x̂₀ error; the sampler's schedule and update are untouched.

At a resolution other than the training one, the same σ destroys a different share of the signal, so the network
misjudges how noisy its input is. For each σ of a grid, :func:`calibrate` noises clean latents of the target size
at σ and picks the σ̂ whose denoiser output D(x, σ̂) is closest to them (20 log-spaced candidates in [σ/2, 2σ],
then 10 between the best one's neighbours); :func:`shifted_model_sampling` then evaluates the network at σ̂(σ)
wherever a sampler asks for σ: its input scaling, its timestep and its x̂₀ all at σ̂, which is D(x, σ̂).

Source: NoiseShift, from its abstract and third-party summaries (no code found; ``techniques.md`` §4.7).
Departures: the paper calibrates at each step of the sampler's schedule on flow-matching models (SD3, Flux); we
calibrate on a log-spaced grid of the model's own σ range and interpolate in log σ, so that one table serves every
scheduler and step count, and run on discrete ε- and v-prediction UNets (SD 1.x, 2.x), whose gain the paper does
not measure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import torch

from ..common.denoiser import Conditioning, Denoiser, NoiseSchedule
from ..common.tagged_files import read_tagged, write_tagged

# Source: techniques.md §4.7: 20 log-spaced candidates in [σ/2, 2σ], then 10 around the best.
COARSE_CANDIDATES, FINE_CANDIDATES = 20, 10
SEARCH_SPAN = 2.0
DEFAULT_LEVELS = 16  # σ values calibrated between the model's smallest and largest
TABLE_FORMAT, TABLE_VERSION = "atelier.noiseshift", "1"


@dataclasses.dataclass(frozen=True, eq=False)  # tensors have no truth value: a table equals only itself
class NoiseShiftTable:
    """σ̂ for each calibrated σ of one model at one latent size: ``sigmas`` ascending, ``shifted`` alike, (K,)
    float64 each. Between calibrated values σ̂ is interpolated linearly in log σ; beyond them the nearest end's
    ratio σ̂/σ holds.

    Example:
        >>> table = NoiseShiftTable(torch.tensor([1.0, 4.0], dtype=torch.float64),
        ...                         torch.tensor([1.5, 4.0], dtype=torch.float64), (8, 8))
        >>> [round(float(s), 4) for s in table.shift(torch.tensor([0.5, 2.0, 8.0]))]
        [0.75, 2.4495, 8.0]
    """

    sigmas: torch.Tensor
    shifted: torch.Tensor
    latent_size: tuple[int, int]  # (h, w) of the latents it was calibrated on

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.sigmas.shape != self.shifted.shape or self.sigmas.numel() < 1:
            raise ValueError(f"sigmas and shifted must be 1-D of one length >= 1; got {tuple(self.sigmas.shape)} "
                             f"and {tuple(self.shifted.shape)}")
        if not bool((self.sigmas > 0).all() and (self.shifted > 0).all()):
            raise ValueError("sigmas and shifted must be positive")
        if self.sigmas.numel() > 1 and not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("sigmas must be strictly ascending")

    @classmethod
    def identity(cls, sigmas: torch.Tensor, latent_size: tuple[int, int]) -> NoiseShiftTable:
        """The table that tells the network the sampler's own σ (the baseline)."""
        sigmas = sigmas.to(torch.float64)
        return cls(sigmas, sigmas.clone(), latent_size)

    def model_sampling(self, model_sampling: object) -> object:
        """``model_sampling`` evaluating the network at this table's σ̂ (:func:`shifted_model_sampling`)."""
        return shifted_model_sampling(model_sampling, self)

    def shift(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ̂ for any σ > 0 (any shape; σ = 0 stays 0), in σ's dtype and device."""
        log_sigma = sigma.detach().to(torch.float64).clamp(min=1e-30).log().cpu()
        known = self.sigmas.log()
        log_ratio = (self.shifted.log() - known)
        if known.numel() == 1:
            ratio = log_ratio.expand_as(log_sigma)
        else:
            position = torch.searchsorted(known, log_sigma.flatten()).clamp(1, known.numel() - 1)
            low, high = known[position - 1], known[position]
            weight = ((log_sigma.flatten() - low) / (high - low)).clamp(0, 1)
            ratio = (log_ratio[position - 1] * (1 - weight) + log_ratio[position] * weight).view_as(log_sigma)
        shifted = (log_sigma + ratio).exp().to(sigma.device, sigma.dtype)
        return torch.where(sigma > 0, shifted, sigma)


def save_table(table: NoiseShiftTable, path: str | os.PathLike) -> None:
    """Write ``table`` as a small ``.safetensors`` file, atomically: tensors ``sigmas`` and ``shifted`` (float64),
    metadata ``format`` "atelier.noiseshift", ``version`` and ``latent_size`` ("h,w").

    Raises:
        OSError: the folder is missing or not writable.
    """
    write_tagged(path, {"sigmas": table.sigmas, "shifted": table.shifted}, TABLE_FORMAT, TABLE_VERSION,
                 {"latent_size": f"{table.latent_size[0]},{table.latent_size[1]}"})


def load_table(path: str | os.PathLike) -> NoiseShiftTable:
    """Read a table that :func:`save_table` wrote; nothing is unpickled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not a NoiseShift table of this version, or inconsistent tensors.
    Example:
        >>> import tempfile
        >>> table = NoiseShiftTable.identity(torch.tensor([0.5, 2.0]), (8, 12))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_table(table, os.path.join(folder, "t.safetensors"))
        ...     loaded = load_table(os.path.join(folder, "t.safetensors"))
        >>> loaded.latent_size, torch.equal(loaded.shifted, table.shifted)
        ((8, 12), True)
    """
    metadata, tensors = read_tagged(path, "NoiseShift table", TABLE_FORMAT, (TABLE_VERSION,))
    try:
        height, width = (int(side) for side in metadata.get("latent_size", "").split(","))
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)!r} has no readable latent_size: {error}") from error
    if {"sigmas", "shifted"} - tensors.keys():
        raise ValueError(f"{os.fspath(path)!r} lacks the tensors {sorted({'sigmas', 'shifted'} - tensors.keys())}")
    return NoiseShiftTable(tensors["sigmas"].double(), tensors["shifted"].double(), (height, width))


def log_grid(low: float, high: float, count: int) -> torch.Tensor:
    """``count`` values from ``low`` to ``high`` evenly spaced in log, float64."""
    return torch.logspace(math.log10(low), math.log10(high), count, dtype=torch.float64)


def grid_search(error: Callable[[float], float], sigma: float) -> float:
    """The σ̂ in [σ/SEARCH_SPAN, σ·SEARCH_SPAN] with the least ``error``: the best of ``COARSE_CANDIDATES``
    log-spaced candidates, then of ``FINE_CANDIDATES`` between that one's neighbours (ties: the one nearer σ).

    Example:
        >>> round(grid_search(lambda s: (math.log(s) - math.log(1.3)) ** 2, 1.0), 2)
        1.3
    """
    coarse = log_grid(sigma / SEARCH_SPAN, sigma * SEARCH_SPAN, COARSE_CANDIDATES)
    best = _least(error, coarse, sigma)
    index = int((coarse - best).abs().argmin())
    low, high = coarse[max(index - 1, 0)], coarse[min(index + 1, COARSE_CANDIDATES - 1)]
    return _least(error, torch.cat([log_grid(float(low), float(high), FINE_CANDIDATES), coarse[index:index + 1]]),
                  sigma)


def _least(error: Callable[[float], float], candidates: torch.Tensor, sigma: float) -> float:
    scored = sorted((error(float(c)), abs(math.log(float(c) / sigma)), float(c)) for c in candidates)
    return scored[0][2]


def calibrate(denoise: Callable[[torch.Tensor, float], torch.Tensor], clean: torch.Tensor, sigmas: torch.Tensor,
              generator: torch.Generator, snap: Callable[[float], float] | None = None,
              progress: Callable[[int, int], None] | None = None) -> NoiseShiftTable:
    """The NoiseShift table of a denoiser at the size of ``clean``.

    For each σ, the clean latents are noised once, x = x₀ + σ·ε (the same ε for every candidate, so candidates
    differ only by σ̂), and :func:`grid_search` picks σ̂ minimising mean((x₀ − D(x, σ̂))²).

    Args:
        denoise: D(x, σ̂) -> x̂₀, x (B, C, h, w) VE latents (k-diffusion's x = x₀ + σ·ε).
        clean: (B, C, h, w) clean latents as the model sees them (scaled), at the target size.
        sigmas: (K,) σ values to calibrate, positive.
        generator: seeds the noise (on the CPU).
        snap: the σ a candidate is really evaluated at (a discrete model's nearest training σ); the table holds
            snapped values, so that applying it evaluates the network where calibration did.
        progress: called with (levels done, levels) after each σ.
    Returns:
        The table, sorted by σ.
    Example:
        >>> data = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2  # variance 4
        >>> wiener = lambda x, s: x * 1.0 / (1.0 + s * s)  # assumes variance 1: the shift is s·1/2
        >>> table = calibrate(wiener, data, torch.tensor([1.0]), torch.Generator().manual_seed(1))
        >>> round(float(table.shifted[0]), 1)
        0.5
    """
    if clean.ndim != 4:
        raise ValueError(f"clean latents must be (B, C, h, w); got shape {tuple(clean.shape)}")
    if sigmas.ndim != 1 or sigmas.numel() < 1 or not bool((sigmas > 0).all()):
        raise ValueError(f"sigmas must be a 1-D tensor of positive values; got {sigmas.tolist()}")
    sigmas = sigmas.to(torch.float64).sort().values
    snapped = snap or (lambda value: value)
    shifted = []
    for index, sigma in enumerate(sigmas.tolist()):
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(clean.device, clean.dtype)
        noisy = clean + sigma * noise
        errors: dict[float, float] = {}  # snapped candidates repeat: each is evaluated once

        def error(candidate: float) -> float:
            at = snapped(candidate)
            if at not in errors:
                errors[at] = float((denoise(noisy, at).to(clean.dtype) - clean).square().mean())
            return errors[at]

        shifted.append(snapped(grid_search(error, sigma)))
        if progress is not None:
            progress(index + 1, sigmas.numel())
    return NoiseShiftTable(sigmas, torch.tensor(shifted, dtype=torch.float64), tuple(clean.shape[-2:]))


def _nearest_step(schedule: NoiseSchedule) -> Callable[[float], int]:
    log_sigmas = schedule.ve_sigmas().log()
    return lambda sigma: int((log_sigmas - math.log(sigma)).abs().argmin())


def nearest_training_sigma(schedule: NoiseSchedule) -> Callable[[float], float]:
    """σ ↦ the schedule's training σ nearest in log σ: where a discrete model's sampler evaluates it (ComfyUI's
    ``timestep()`` rounds to it too)."""
    step, sigmas = _nearest_step(schedule), schedule.ve_sigmas()
    return lambda sigma: float(sigmas[step(sigma)])


def denoiser_x0(denoiser: Denoiser, conditioning: Conditioning) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """D(x, σ) -> x̂₀ of a :class:`~nodes.common.denoiser.Denoiser` at a training σ (see
    :func:`nearest_training_sigma`), in the k-diffusion view x = x₀ + σ·ε: the network sees x·√ᾱ at that
    timestep, as every sampler of either host shows it."""
    schedule = denoiser.schedule
    nearest = _nearest_step(schedule)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        step = nearest(sigma)
        alpha_bar = float(schedule.alphas_cumprod[step])
        x_t = x * math.sqrt(alpha_bar)
        t = torch.full((x.shape[0],), step, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            prediction = denoiser(x_t, t, conditioning.repeat_to(x.shape[0]).to(x.device)).float()
            eps = schedule.eps_from_prediction(x_t, t, prediction)
        return (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)

    return denoise


def shifted_model_sampling(model_sampling: object, table: NoiseShiftTable) -> object:
    """A copy of ``model_sampling`` (Atelier's :class:`~nodes.sampling.model_sampling.DiscreteModelSampling` or
    ComfyUI's ``model_sampling`` object) that evaluates the network at σ̂(σ): its input scaling, timestep and x̂₀
    take σ̂, everything else (the sampler's sigmas, noise scaling, timestep ranges) is the original's.

    It is an instance of a subclass of the original's class, so that type checks on it (ComfyUI's, for flow
    models) still hold. Distilled (LCM) samplings, whose x̂₀ reads the timestep again, are refused.

    Raises:
        ValueError: an LCM model sampling.
    """
    base = type(model_sampling)
    if getattr(model_sampling, "noise_shift", None) is not None:  # shifted already: the new table replaces the old
        base = base.__bases__[0]
    if getattr(model_sampling, "prediction_type", None) == "lcm" or "Distilled" in base.__name__:
        raise ValueError("NoiseShift does not apply to LCM (distilled) model sampling: its x̂₀ reads the timestep "
                         "again")
    shifted = object.__new__(_shifted_class(base))
    # dicts copied one level deep: a module's buffers moved to another device must not move the original's
    shifted.__dict__.update({name: dict(value) if isinstance(value, dict) else value
                             for name, value in model_sampling.__dict__.items()})
    object.__setattr__(shifted, "noise_shift", table)
    return shifted


@functools.cache
def _shifted_class(base: type) -> type:
    def calculate_input(self, sigma, x):
        return base.calculate_input(self, self.noise_shift.shift(sigma), x)

    def timestep(self, sigma):
        return base.timestep(self, self.noise_shift.shift(sigma))

    def calculate_denoised(self, sigma, model_output, x):
        return base.calculate_denoised(self, self.noise_shift.shift(sigma), model_output, x)

    return type(f"NoiseShifted{base.__name__}", (base,), {"calculate_input": calculate_input, "timestep": timestep,
                                                          "calculate_denoised": calculate_denoised})
