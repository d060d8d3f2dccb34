"""ComfyUI's CONDITIONING on Atelier's denoiser: areas, masks, strengths, timestep ranges and classifier-free guidance.

A CONDITIONING is ComfyUI's list of ``[embeds (B, L, D), options]`` entries; the options this module reads are
``pooled_output`` (SDXL), ``area`` (latent cells (h, w, y, x), or ``("percentage", h, w, y, x)``), ``strength``,
``mask`` (with ``mask_strength`` and ``set_area_to_bounds``), ``start_percent`` / ``end_percent`` and SDXL's size
options (``width``, ``height``, ``crop_w``, ``crop_h``, ``target_width``, ``target_height``, ``aesthetic_score``).
Every entry of the positive (negative) list is a prediction; where entries overlap, their x̂₀ are averaged with
the weights ``mask · strength`` (areas fade in over up to 8 latent cells at inner edges), as ComfyUI's
``calc_cond_batch`` does, so a workflow that composes areas gives ComfyUI's picture.

Sampling works in the k-diffusion convention (``interop.md`` §3): ``x̂₀ = D(x, σ)`` on VE latents; the denoiser
sees ``x/√(σ²+1)`` at the timestep of σ. A :class:`Guider` is what travels on the GUIDER socket.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..common.denoiser import Conditioning, Denoiser
from .model_sampling import DiscreteModelSampling

AREA_FADE_CELLS = 8  # ComfyUI's fuzz: an area's weight ramps up over this many latent cells from an inner edge
MAX_CROSS_ATTENTION_REPEAT = 4  # ComfyUI batches prompts of lengths L1, L2 only when lcm(L1, L2)/min ≤ 4
SDXL_AESTHETIC_SCORES = {"positive": 6.0, "negative": 2.5}  # the refiner's defaults per prompt kind
CONDITIONING_KINDS = ("positive", "negative")


@dataclasses.dataclass
class ResolvedCond:
    """One CONDITIONING entry made ready for a sampling run (latent size and schedule known)."""

    conditioning: Conditioning  # batch 1 or the latents' batch
    kind: str  # "positive" or "negative"
    area: tuple[int, int, int, int] | None = None  # (h, w, y, x) in latent cells
    mask: torch.Tensor | None = None  # (1 or B, h, w) at the latent's size, already × mask_strength
    strength: float = 1.0
    sigma_start: float | None = None  # active while σ ≤ sigma_start
    sigma_end: float | None = None  # and σ ≥ sigma_end


def check_conditioning(conditioning: object, name: str = "conditioning") -> None:
    """Raises ValueError unless ``conditioning`` has ComfyUI's CONDITIONING shape."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name} must be a non-empty CONDITIONING list; got {type(conditioning).__name__}")
    for entry in conditioning:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor)
                or entry[0].ndim != 3 or not isinstance(entry[1], dict)):
            raise ValueError(f"{name} entries must be [tensor (B, L, D), dict]")


def sdxl_time_ids(options: dict, kind: str, height: int, width: int, refiner: bool) -> torch.Tensor:
    """SDXL's size conditioning for one entry: (1, 6), or (1, 5) with the aesthetic score for the refiner.

    ``height``/``width`` (pixels) are the defaults, from the latent's size, as ComfyUI's ``encode_model_conds``.
    """
    height, width = options.get("height", height), options.get("width", width)
    crop_h, crop_w = options.get("crop_h", 0), options.get("crop_w", 0)
    if refiner:
        last = [options.get("aesthetic_score", SDXL_AESTHETIC_SCORES[kind])]
    else:
        last = [options.get("target_height", height), options.get("target_width", width)]
    return torch.tensor([[height, width, crop_h, crop_w, *last]], dtype=torch.float32)


def _resolve_area(area: Sequence, latent_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    if area[0] == "percentage":
        h, w, y, x = area[1:]
        return (max(1, round(h * latent_hw[0])), max(1, round(w * latent_hw[1])),
                round(y * latent_hw[0]), round(x * latent_hw[1]))
    return tuple(int(v) for v in area)


def _mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(h, w, y, x) of the non-zero cells of ``mask`` (B, h, w), at least 8×8, as ``set_area_to_bounds`` uses."""
    bounds = mask.abs().amax(dim=0)
    rows, cols = torch.nonzero(bounds.amax(dim=1)).flatten(), torch.nonzero(bounds.amax(dim=0)).flatten()
    if rows.numel() == 0:
        return 8, 8, 0, 0
    y, x = int(rows[0]), int(cols[0])
    return max(8, int(rows[-1]) - y + 1), max(8, int(cols[-1]) - x + 1), y, x


def resolve_conditioning(conditioning: list, kind: str, latent_shape: torch.Size, model_sampling: DiscreteModelSampling,
                         *, family: str, downscale: int, device: torch.device) -> list[ResolvedCond]:
    """A CONDITIONING list made ready to sample latents of ``latent_shape`` (B, C, h, w)."""
    check_conditioning(conditioning, kind)
    latent_hw = (latent_shape[-2], latent_shape[-1])
    resolved = []
    for embeds, options in conditioning:
        pooled = options.get("pooled_output")
        time_ids = None
        if family in ("sdxl", "sdxl_refiner"):
            if pooled is None:
                raise ValueError(f"the {kind} conditioning has no pooled_output, which SDXL needs: encode it with "
                                 "this checkpoint's CLIP")
            time_ids = sdxl_time_ids(options, kind, latent_hw[0] * downscale, latent_hw[1] * downscale,
                                     family == "sdxl_refiner")
        else:
            pooled = None
        entry = ResolvedCond(Conditioning(embeds.to(device), None if pooled is None else pooled.to(device),
                                          None if time_ids is None else time_ids.to(device)), kind,
                             strength=float(options.get("strength", 1.0)))
        if "area" in options:
            entry.area = _resolve_area(options["area"], latent_hw)
        if options.get("mask") is not None:
            mask = options["mask"].to(device=device, dtype=torch.float32)
            mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
            if tuple(mask.shape[-2:]) != latent_hw:
                mask = F.interpolate(mask.unsqueeze(1), size=latent_hw, mode="bilinear").squeeze(1)
            if options.get("set_area_to_bounds", False):
                entry.area = _mask_bounds(mask)
            entry.mask = mask * float(options.get("mask_strength", 1.0))
        if "start_percent" in options:
            entry.sigma_start = model_sampling.percent_to_sigma(float(options["start_percent"]))
        if "end_percent" in options:
            entry.sigma_end = model_sampling.percent_to_sigma(float(options["end_percent"]))
        resolved.append(entry)
    return resolved


def _area_inside(inner: tuple, outer: tuple) -> bool:
    return (inner[2] >= outer[2] and inner[3] >= outer[3]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def mirror_areas(conds: dict[str, list[ResolvedCond]]) -> None:
    """Give every area of one kind a counterpart of the same area in the other kinds (in place).

    An area prompt averaged against a full-size negative alone would be guided by a different mix than the rest of
    the image; ComfyUI adds, for each area, a copy of the smallest entry of the other kind that covers it.
    """
    for kind, entries in conds.items():
        for entry in list(entries):
            if entry.area is None:
                continue
            for other_kind, others in conds.items():
                if other_kind == kind:
                    continue
                smallest = None
                for other in others:
                    if other.area is None:
                        smallest = other if smallest is None else smallest
                    elif _area_inside(entry.area, other.area) and (
                            smallest is None or smallest.area is None
                            or math.prod(smallest.area[:2]) > math.prod(other.area[:2])):
                        smallest = other
                if smallest is not None and smallest.area != entry.area:
                    others.append(dataclasses.replace(entry, conditioning=smallest.conditioning, kind=other_kind))


def add_inpaint_concat(conds: dict[str, list[ResolvedCond]], latent_image: torch.Tensor,
                       denoise_mask: torch.Tensor | None) -> None:
    """SD inpainting models see the mask and the masked image's latent as 5 extra input channels (in place).

    ``latent_image`` is scaled as the denoiser sees it; without a mask the whole image is to be painted.
    """
    batch = latent_image.shape[0]
    if denoise_mask is None:
        mask = torch.ones_like(latent_image[:, :1])
    else:
        mask = denoise_mask[:, :1]
        if mask.shape[-2:] != latent_image.shape[-2:]:
            mask = F.interpolate(mask, size=latent_image.shape[-2:], mode="bilinear")
        mask = mask.round().expand(batch, -1, -1, -1)
    concat = torch.cat([mask, latent_image], dim=1)
    for entries in conds.values():
        for entry in entries:
            entry.conditioning = dataclasses.replace(entry.conditioning, concat=concat)


@dataclasses.dataclass
class _Prediction:
    """What one entry contributes at one σ: its input window, its weights, and its conditioning."""

    index: int  # position in the kinds being predicted
    x: torch.Tensor
    weight: torch.Tensor
    conditioning: Conditioning
    area: tuple[int, int, int, int] | None


def _prediction(entry: ResolvedCond, index: int, x: torch.Tensor, sigma: float) -> _Prediction | None:
    if entry.sigma_start is not None and sigma > entry.sigma_start:
        return None
    if entry.sigma_end is not None and sigma < entry.sigma_end:
        return None
    batch, _, height, width = x.shape
    area = None
    window = x
    if entry.area is not None:
        h, w, y, x0 = entry.area
        area = (min(height - y, h), min(width - x0, w), y, x0)
        window = x[:, :, y:y + area[0], x0:x0 + area[1]]
    if entry.mask is not None:
        mask = entry.mask[:batch]
        if area is not None:
            mask = mask[:, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
        weight = mask.unsqueeze(1).repeat(batch // mask.shape[0], window.shape[1], 1, 1) * entry.strength
    else:
        weight = torch.ones_like(window) * entry.strength
        if area is not None:
            weight = _fade_area_edges(weight, area, (height, width))
    conditioning = entry.conditioning.repeat_to(batch)
    if conditioning.concat is not None and area is not None:
        concat = conditioning.concat[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
        conditioning = dataclasses.replace(conditioning, concat=concat)
    return _Prediction(index, window, weight, conditioning, area)


def _fade_area_edges(weight: torch.Tensor, area: tuple, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Ramps an area's weight from its inner edges (those not on the latent's border), as ComfyUI's fuzz."""
    for dim in range(2):
        size, offset = area[dim], area[dim + 2]
        cells = min(AREA_FADE_CELLS, weight.shape[2 + dim] // 4)
        for t in range(cells):
            ramp = (t + 1) / cells
            if offset != 0:
                weight.narrow(2 + dim, t, 1).mul_(ramp)
            if size + offset < latent_hw[dim]:
                weight.narrow(2 + dim, size - 1 - t, 1).mul_(ramp)
    return weight


def _batchable(a: _Prediction, b: _Prediction) -> bool:
    ca, cb = a.conditioning, b.conditioning
    if a.x.shape != b.x.shape or ca.embeds.shape[2] != cb.embeds.shape[2]:
        return False
    if (ca.pooled is None) != (cb.pooled is None) or (ca.concat is None) != (cb.concat is None):
        return False
    la, lb = ca.embeds.shape[1], cb.embeds.shape[1]
    return math.lcm(la, lb) // min(la, lb) <= MAX_CROSS_ATTENTION_REPEAT


def predict_x0(denoiser: Denoiser, model_sampling: DiscreteModelSampling, x: torch.Tensor, sigma: torch.Tensor,
               conds: Sequence[Sequence[ResolvedCond] | None]) -> list[torch.Tensor | None]:
    """x̂₀ of each list of entries at VE latents ``x`` (B, C, h, w) and noise level ``sigma`` (B,).

    Entries of one list are averaged with their weights; compatible entries of all lists share denoiser calls.
    A list that is None gives None (classifier-free guidance at scale 1 skips the negative).
    """
    level = float(sigma[0])
    pending = [p for index, entries in enumerate(conds) if entries is not None for entry in entries
               if (p := _prediction(entry, index, x, level)) is not None]
    totals = [None if entries is None else torch.zeros_like(x) for entries in conds]
    counts = [None if entries is None else torch.full_like(x, 1e-37) for entries in conds]
    while pending:
        group = [p for p in pending if _batchable(p, pending[0])]
        pending = [p for p in pending if all(p is not g for g in group)]
        window = torch.cat([p.x for p in group])
        levels = sigma[:1].expand(window.shape[0])
        scale = levels.reshape(-1, 1, 1, 1)
        model_input = model_sampling.calculate_input(scale, window)
        prediction = denoiser(model_input, model_sampling.timestep(levels).float(),
                              Conditioning.cat([p.conditioning for p in group]))
        denoised = model_sampling.calculate_denoised(scale, prediction.float(), window)
        for p, x0 in zip(group, denoised.chunk(len(group))):
            total, count = totals[p.index], counts[p.index]
            if p.area is not None:
                h, w, y, x_ = p.area
                total, count = total[:, :, y:y + h, x_:x_ + w], count[:, :, y:y + h, x_:x_ + w]
            total += x0 * p.weight
            count += p.weight
    return [None if total is None else total / count for total, count in zip(totals, counts)]


def classifier_free_guidance(denoiser: Denoiser, model_sampling: DiscreteModelSampling,
                             conds: dict[str, list[ResolvedCond]], cfg: float
                             ) -> Callable[..., torch.Tensor]:
    """The guided denoiser ``D(x, σ) = x̂₀(negative) + cfg·(x̂₀(positive) − x̂₀(negative))`` for a sampler.

    With cfg 1 the negative is not evaluated (ComfyUI's cfg-1 shortcut); with only a positive list (BasicGuider)
    the result is its x̂₀.
    """
    negative = conds.get("negative")
    skip_negative = negative is None or math.isclose(cfg, 1.0)

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        positive_x0, negative_x0 = predict_x0(denoiser, model_sampling, x, sigma,
                                              [conds["positive"], None if skip_negative else negative])
        if negative_x0 is None:
            return positive_x0
        return negative_x0 + (positive_x0 - negative_x0) * cfg

    return model


def to_conditioning(conditioning: list, family: str, name: str = "conditioning") -> Conditioning:
    """A plain one-prompt CONDITIONING as one :class:`Conditioning`, for techniques that run their own sampler.

    SDXL's size conditioning is set to the sampled image's size where the technique samples
    (:func:`nodes.sampling.generate.with_image_size`).

    Raises:
        ValueError: several entries, or areas, masks or timestep ranges, which only the KSampler nodes follow.
    """
    check_conditioning(conditioning, name)
    scoped = {"area", "mask", "start_percent", "end_percent"}
    if len(conditioning) > 1 or scoped & conditioning[0][1].keys():
        raise ValueError(f"{name} must be one plain prompt here; combined, area, mask or timestep-range "
                         "conditionings are followed by the KSampler nodes only")
    embeds, options = conditioning[0]
    if not family.startswith("sdxl"):
        return Conditioning(embeds)
    if options.get("pooled_output") is None:
        raise ValueError(f"{name} has no pooled_output, which SDXL needs: encode it with this checkpoint's CLIP")
    time_ids = sdxl_time_ids(options, "positive", 1024, 1024, family == "sdxl_refiner")
    return Conditioning(embeds, options["pooled_output"], time_ids.expand(embeds.shape[0], -1))


def from_conditioning(conditioning: Conditioning) -> list:
    """A :class:`Conditioning` as a CONDITIONING list of one entry."""
    options = {} if conditioning.pooled is None else {"pooled_output": conditioning.pooled}
    return [[conditioning.embeds, options]]
