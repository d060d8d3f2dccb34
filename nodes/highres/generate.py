"""The Tiled 16K generator's run: LinFusion's staged recipe (or one direct pass), each stage sampled with tiled
diffusion, then a tiled VAE decode.

Stages follow :func:`~.linfusion.staged_recipe`: text-to-image at the base size, then ×2 per stage, re-noised to the
stage's strength and denoised again (SDEdit). Each stage samples through a :class:`~.tiling.TiledDenoiser`, so a
stage's latent may exceed what the UNet (or its attention) can take in one piece; a latent that fits one tile is
sampled whole.

Departure from the LinFusion notebooks: between stages the latent is upscaled ×2 (bicubic) instead of decoding,
resizing the image with PIL and encoding again; it saves a full-size VAE round trip per stage, and the stage's
re-noising and denoising repair the upscale's softness as they repair the PIL resize's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..common.denoiser import Conditioning, Denoiser, LatentCodec
from ..sampling.generate import generate
from ..sampling.latents import empty_latent, upscale_latent
from .linfusion import Stage, staged_recipe
from .tiling import TiledDenoiser, TileSettings

UPSCALE_METHOD = "bicubic"
SCHEDULES = ("staged", "direct")


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What one stage ran: its recipe entry and the tiles its UNet evaluated per step (each × 2 with CFG)."""

    stage: Stage
    tiles_per_step: float

    def line(self) -> str:
        s = self.stage
        return (f"{s.width}x{s.height} strength {s.strength:g}: {s.steps} steps x {self.tiles_per_step:g} tiles, "
                f"{s.tokens} tokens")


def plan_stages(family: str, width: int, height: int, schedule: str, steps: int, base_size: int,
                downscale: int) -> list[Stage]:
    """The stages a run will sample, checked before any work.

    Args:
        family: the model family.
        width, height: final size in pixels, multiples of ``downscale``.
        schedule: ``"staged"`` (LinFusion's ×2 recipe from ``base_size``) or ``"direct"`` (one text-to-image pass at
            the final size).
        steps: the full schedule's steps; a stage of strength s runs int(steps·s).
        base_size: the staged recipe's base long side in pixels.
    Raises:
        ValueError: an unknown schedule, a size the recipe cannot halve, or a stage left with no step.
    Example:
        >>> [(s.width, s.steps) for s in plan_stages("sd1", 256, 128, "staged", 20, 64, 8)]
        [(64, 20), (128, 8), (256, 4)]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if schedule == "direct":
        return staged_recipe(family, width, height, base_long_side=max(width, height), base_steps=steps,
                             downscale=downscale)
    stages = staged_recipe(family, width, height, base_long_side=base_size, base_steps=steps, downscale=downscale)
    for stage in stages:
        if stage.steps < 1:
            raise ValueError(f"steps × strength must leave at least one step in every stage; got steps={steps}, "
                             f"which leaves none at strength {stage.strength:g} ({stage.width}x{stage.height})")
    return stages


def generate_large(denoiser: Denoiser, codec: LatentCodec, family: str, positive: Conditioning,
                   negative: Conditioning, stages: list[Stage], seed: int, steps: int, cfg: float, sampler: str,
                   scheduler: str, settings: TileSettings, device: torch.device | str = "cpu",
                   untiled_base: bool = False, model: Any = None) -> tuple[torch.Tensor, list[StageReport]]:
    """Sample the latent of the last stage of ``stages``, stage by stage, with tiled diffusion.

    With LinFusion mounted, the first (text-to-image) stage runs on the whole latent (``untiled_base``): that is
    LinFusion's point, one global linear-attention pass that composes the picture once; tiling it would repeat the
    subject in every tile. The later stages refine and stay tiled.

    Args:
        denoiser, codec, family: the model.
        positive, negative: conditionings of batch 1.
        stages: from :func:`plan_stages`.
        seed: the first stage's noise seed; stage k uses ``seed + k``.
        steps, cfg, sampler, scheduler: as :func:`nodes.generation.generate.generate` takes them.
        settings: the tiling of every stage.
        device: where the latents live.
        untiled_base: sample the first stage whole (LinFusion loaded), not tile by tile.
        model: the ``ModelRef`` behind ``denoiser``, for a tile pool's workers (see :class:`TiledDenoiser`).
    Returns:
        The unscaled latent (1, C, H/f, W/f) on ``device``, and one :class:`StageReport` per stage.
    """
    latent, reports = None, []
    for index, stage in enumerate(stages):
        height, width = stage.height // codec.downscale, stage.width // codec.downscale
        if latent is None:
            latent = empty_latent(1, codec.latent_channels, stage.height, stage.width, codec.downscale).to(device)
        else:
            latent = upscale_latent(latent, height, width, UPSCALE_METHOD)
        if index == 0 and untiled_base:
            latent = generate(denoiser, codec, family, positive, negative, latent, seed, steps, cfg, sampler,
                              scheduler, denoise=stage.strength)
            reports.append(StageReport(stage, 1.0))
            continue
        tiled = TiledDenoiser(denoiser, dataclasses.replace(settings, seed=seed + index), model=model)
        latent = generate(tiled, codec, family, positive, negative, latent, seed + index, steps, cfg, sampler,
                          scheduler, denoise=stage.strength)
        reports.append(StageReport(stage, sum(tiled.tiles_per_call) / len(tiled.tiles_per_call)))
    return latent, reports
