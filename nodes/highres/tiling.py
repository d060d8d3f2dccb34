"""Tiled diffusion over a latent of any size: MultiDiffusion, Mixture of Diffusers and FSTD-style shifted tiles.

A :class:`TiledDenoiser` wraps any :class:`~nodes.common.denoiser.Denoiser`: each call cuts the latent into tiles,
runs them through the wrapped denoiser in batches of ``tile_batch_size`` and blends the predictions with weights
that form a partition of unity at every latent pixel. Every sampler of :mod:`nodes.sampling` drives it unchanged,
since it is itself a denoiser. Blending the raw prediction equals blending ε: ``eps_from_prediction`` is affine in
the prediction at a fixed x_t, and the weights sum to 1.

Notation (papers → code): tile side T → ``tile``; MultiDiffusion's window weights W_i = 1 (uniform); Mixture of
Diffusers' Gaussian weights with var = 0.01 (σ = 0.1·T) → :func:`tile_window`; FSTD's per-step offset
(o_x, o_y) → :func:`shifted_offset`.

Sources:
    - MultiDiffusion: Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image
      Generation", Eq. 5 (per-pixel average of the windows' predictions).
    - Mixture of Diffusers: Jiménez 2023, arXiv 2302.02412, §3 (Gaussian tile weights, var 0.01, centred).
    - FSTD: Zheng et al. 2023, "Any-Size-Diffusion", arXiv 2308.16582, §3.2 (non-overlapping tiles shifted by a
      new offset every step, "implicit overlap"); its cycle offsets {0, s, 2s, …}² with s = T/2.

Departures (highres.md §2.4, Targets 1 and 3): FSTD's pixels left uncovered by a shifted grid reuse the previous
step's ε in the authors' launcher; here a leading tile clamped to the border covers that strip, so every pixel is
predicted afresh every step. The authors' random offsets (reset to (0, 0) every 4 steps) put seams back on the
base grid a quarter of the time; here the offsets run a seeded shuffled cycle that visits each of the
(T/s)² offsets once per cycle, so seams never sit in one place more often than in another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..common.denoiser import Conditioning, Denoiser
from ..common.progress import check_interrupt
from ..common.tile_pool import Tile, tile_pool
from ..common.tiles import tile_starts

MODES = ("mixture", "multidiffusion", "shifted")
# Source: Mixture of Diffusers, gaussian_weights in the official mixdiff code: var = 0.01 (relative to T²).
GAUSSIAN_VARIANCE = 0.01


def shifted_starts(size: int, tile: int, offset: int) -> list[int]:
    """Starts of non-overlapping tiles of length ``tile`` whose grid is shifted by ``offset``, covering ``size``.

    The grid's tiles start at ``offset + k·tile``; the strip before ``offset`` is covered by a leading tile clamped
    to 0, and a tile that would run past the end is clamped to end at it, so nothing is left uncovered and every
    tile has full length. Only the clamped tiles overlap a neighbour.

    Args:
        size: length to cover, >= 1.
        tile: tile length, >= 1 (tiles larger than ``size`` shrink to it).
        offset: grid shift, 0 <= offset < tile.
    Returns:
        Increasing starts; ``[0]`` when one tile covers everything.
    Raises:
        ValueError: an argument out of range.
    Example:
        >>> shifted_starts(128, 32, 0)
        [0, 32, 64, 96]
        >>> shifted_starts(128, 32, 16)
        [0, 16, 48, 80, 96]
    """
    if size < 1 or tile < 1 or not 0 <= offset < tile:
        raise ValueError(f"need size >= 1, tile >= 1 and 0 <= offset < tile; got size={size}, tile={tile}, "
                         f"offset={offset}")
    if size <= tile:
        return [0]
    starts = {0, size - tile}
    starts.update(min(start, size - tile) for start in range(offset, size, tile))
    return sorted(starts)


def shifted_offset(step: int, tile: int, stride: int, seed: int) -> tuple[int, int]:
    """The (y, x) grid offset of step ``step``: a seeded shuffle of {0, s, 2s, …}², each offset once per cycle.

    Args:
        step: the denoiser call, >= 0.
        tile: tile side T.
        stride: offset step s, 1 <= s <= T; T/s offsets per axis (FSTD's ``offset_stride``, T/2 by default).
        seed: the schedule's seed.
    Returns:
        (offset_y, offset_x), each in [0, T).
    Example:
        >>> offsets = {shifted_offset(step, 64, 32, seed=5) for step in range(4)}
        >>> sorted(offsets)
        [(0, 0), (0, 32), (32, 0), (32, 32)]
    """
    if step < 0 or not 1 <= stride <= tile:
        raise ValueError(f"need step >= 0 and 1 <= stride <= tile; got step={step}, stride={stride}, tile={tile}")
    per_axis = range(0, tile, stride)
    offsets = [(y, x) for y in per_axis for x in per_axis]
    cycle, position = divmod(step, len(offsets))
    # One generator per cycle (seed and cycle mixed by a large odd constant), so a step's offset does not depend
    # on how many steps ran before it.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + cycle) % 2 ** 63)
    return offsets[int(torch.randperm(len(offsets), generator=generator)[position])]


def plan_tiles(height: int, width: int, tile: int, overlap: int, mode: str,
               offset: tuple[int, int] = (0, 0)) -> list[Tile]:
    """The tiles covering a ``height`` × ``width`` latent, row by row.

    Args:
        height, width: latent size, >= 1.
        tile: tile side T in latent pixels, >= 1; a tile larger than the latent shrinks to it.
        overlap: ``"mixture"`` and ``"multidiffusion"``: the least overlap between neighbours, 0 <= overlap < T
            (starts spread evenly, as ComfyUI-TiledDiffusion's grid); unused by ``"shifted"``.
        mode: one of ``MODES``.
        offset: ``"shifted"`` only: the grid's (y, x) shift (:func:`shifted_offset`).
    Returns:
        Tiles (top, left, tile height, tile width) whose union is the whole latent.
    Example:
        >>> len(plan_tiles(32, 48, 16, 0, "shifted"))  # highres.md §2.4: 6 tile calls per step
        6
        >>> len(plan_tiles(64, 64, 32, 8, "multidiffusion"))
        9
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    tile_h, tile_w = min(tile, height), min(tile, width)
    if mode == "shifted":
        rows = shifted_starts(height, tile_h, offset[0] % tile_h)
        columns = shifted_starts(width, tile_w, offset[1] % tile_w)
    else:
        rows = tile_starts(height, tile_h, min(overlap, tile_h - 1))
        columns = tile_starts(width, tile_w, min(overlap, tile_w - 1))
    return [(top, left, tile_h, tile_w) for top in rows for left in columns]


def tile_window(height: int, width: int, mode: str) -> torch.Tensor:
    """One tile's unnormalised blend weights: 1 for MultiDiffusion, a centred Gaussian otherwise.

    Args:
        height, width: tile size.
        mode: one of ``MODES``.
    Returns:
        (height, width) float64 weights, all > 0.
    Example:
        >>> window = tile_window(8, 8, "mixture")
        >>> bool(window[3:5, 3:5].min() > window[0, 0]), tile_window(2, 3, "multidiffusion").tolist()
        (True, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])

    Source: Mixture of Diffusers, Eq. 3; official ``_gaussian_weights``: exp(−(x − m)² / (2·var·T²)) with
    m = (W−1)/2 across but m = H/2 down (``midpoint = latent_height / 2``), half a cell below the tile's centre
    (ComfyUI-TiledDiffusion copies it). Departure: we centre both axes at (T−1)/2, so each tile's weights are
    symmetric and overlapping tiles blend evenly in both directions; the official offset shifts every vertical
    blend by half a latent cell, which has no purpose we can find.
    The constant 1/√(2π·var) cancels in the normalisation and is left out.
    """
    if mode == "multidiffusion":
        return torch.ones(height, width, dtype=torch.float64)

    def axis(length: int) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.float64)
        return torch.exp(-((position - (length - 1) / 2) ** 2) / (2 * GAUSSIAN_VARIANCE * length ** 2))

    return torch.outer(axis(height), axis(width))


def blend_weights(tiles: list[Tile], height: int, width: int, mode: str) -> list[torch.Tensor]:
    """Each tile's normalised weights over its own area; together they sum to 1 at every latent pixel.

    Args:
        tiles: from :func:`plan_tiles`, covering the whole ``height`` × ``width`` latent.
        mode: one of ``MODES`` (``"shifted"`` uses the Gaussian, as FSTD does where its clamped tiles overlap).
    Returns:
        One float32 (tile height, tile width) tensor per tile.
    Raises:
        ValueError: a latent pixel no tile covers.
    Example:
        >>> tiles = plan_tiles(20, 30, 16, 4, "mixture")
        >>> total = torch.zeros(20, 30)
        >>> for (top, left, h, w), weight in zip(tiles, blend_weights(tiles, 20, 30, "mixture")):
        ...     total[top:top + h, left:left + w] += weight
        >>> bool((total - 1).abs().max() < 1e-6)
        True
    """
    windows = [tile_window(h, w, mode) for _, _, h, w in tiles]
    total = torch.zeros(height, width, dtype=torch.float64)
    for (top, left, h, w), window in zip(tiles, windows):
        total[top:top + h, left:left + w] += window
    if not bool((total > 0).all()):
        raise ValueError(f"the tiles leave latent pixels uncovered in a {height}×{width} latent; got {tiles}")
    return [(window / total[top:top + h, left:left + w]).float()
            for (top, left, h, w), window in zip(tiles, windows)]


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """How a :class:`TiledDenoiser` tiles: mode, tile side and overlap (latent pixels), batch, offset schedule."""

    mode: str = "mixture"
    tile: int = 64  # Source: FSTD's 64-latent tiles (512 px, SD1.5's native size); highres.md §2.1
    overlap: int = 16  # latent; Source: A1111 wiki advice of 16–32 for Mixture of Diffusers (highres.md §3)
    tile_batch_size: int = 4  # Source: ComfyUI-TiledDiffusion's and A1111's default batch (highres.md §3)
    offset_stride: int = 32  # Source: FSTD's offset_stride 32 for T = 64 (highres.md §2.1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile must be >= 1 and overlap in [0, tile); got tile={self.tile}, "
                             f"overlap={self.overlap}")
        if self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1; got {self.tile_batch_size}")
        if not 1 <= self.offset_stride <= self.tile:
            raise ValueError(f"offset_stride must be in [1, tile={self.tile}]; got {self.offset_stride}")


class TilePlanner:
    """The tiles and normalised weights of each step on a latent of each size, computed once and cached.

    In ``"shifted"`` mode the plan of step n uses :func:`shifted_offset` of n; the other modes ignore the step.
    """

    def __init__(self, settings: TileSettings):
        self.settings = settings
        self._plans: dict[tuple, tuple[list[Tile], list[torch.Tensor]]] = {}

    def __call__(self, height: int, width: int, step: int) -> tuple[list[Tile], list[torch.Tensor]]:
        s = self.settings
        offset = shifted_offset(step, s.tile, s.offset_stride, s.seed) if s.mode == "shifted" else (0, 0)
        key = (height, width, offset)
        if key not in self._plans:
            tiles = plan_tiles(height, width, s.tile, s.overlap, s.mode, offset)
            self._plans[key] = tiles, blend_weights(tiles, height, width, s.mode)
        return self._plans[key]


def tile_chunks(tiles: list[Tile], tile_batch_size: int) -> list[list[Tile]]:
    """The tiles in batches of ``tile_batch_size``, in order: each batch is one denoiser call."""
    return [tiles[first:first + tile_batch_size] for first in range(0, len(tiles), tile_batch_size)]


def crop_tiles(x: torch.Tensor, chunk: list[Tile]) -> torch.Tensor:
    """The chunk's tiles of ``x`` (B, C, H, W) stacked tile-major on the batch axis: (len(chunk)·B, C, h, w)."""
    return torch.cat([x[..., top:top + h, left:left + w] for top, left, h, w in chunk])


def blend_predictions(x: torch.Tensor, tiles: list[Tile], weights: list[torch.Tensor], tile_batch_size: int,
                      predictions: Iterable[torch.Tensor]) -> torch.Tensor:
    """Blend the predictions of ``tile_chunks(tiles, tile_batch_size)``, one per chunk in order, as
    :func:`blend_tiles` does: the sum is taken in tile order, whoever computed each chunk."""
    batch = x.shape[0]
    out = torch.zeros_like(x)
    for first, prediction in zip(range(0, len(tiles), tile_batch_size), predictions):
        chunk = tiles[first:first + tile_batch_size]
        for (top, left, h, w), weight, part in zip(chunk, weights[first:first + tile_batch_size],
                                                   prediction.split(batch)):
            out[..., top:top + h, left:left + w] += part * weight.to(part.device, part.dtype)
        check_interrupt()
    return out


def blend_tiles(x: torch.Tensor, tiles: list[Tile], weights: list[torch.Tensor], tile_batch_size: int,
                evaluate: Callable[[torch.Tensor, list[Tile]], torch.Tensor]) -> torch.Tensor:
    """Evaluate ``x`` tile by tile, ``tile_batch_size`` tiles per call, and blend the predictions.

    Args:
        x: (B, C, H, W) the input every tile is cropped from.
        tiles, weights: a plan of :class:`TilePlanner` (weights summing to 1 at every pixel of H × W).
        tile_batch_size: tiles per ``evaluate`` call, >= 1.
        evaluate: ``evaluate(crops, chunk)``: the prediction for ``crops``, the chunk's tiles of ``x`` stacked
            tile-major on the batch axis ((len(chunk)·B, C, h, w)); it returns the same shape.
    Returns:
        (B, C, H, W) the blended prediction, in ``x``'s dtype. With one tile covering ``x`` its weight is exactly 1,
        so the result is ``evaluate``'s on ``x`` itself, bit for bit.
    """
    predictions = (evaluate(crop_tiles(x, chunk), chunk) for chunk in tile_chunks(tiles, tile_batch_size))
    return blend_predictions(x, tiles, weights, tile_batch_size, predictions)


def evaluate_tile_chunk(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                        chunk: list[Tile]) -> torch.Tensor:
    """One denoiser call on the chunk's tiles of ``x``, with ``t`` and ``conditioning`` (of ``x``'s batch)
    repeated per tile: what a :class:`TiledDenoiser` evaluates, here or in a worker of the tile pool."""
    return denoiser(crop_tiles(x, chunk), t.repeat(len(chunk)), Conditioning.cat([conditioning] * len(chunk)))


class TiledDenoiser:
    """A :class:`~nodes.common.denoiser.Denoiser` that runs ``denoiser`` tile by tile and blends the tiles.

    Each call is one sampler step (the samplers of :mod:`nodes.sampling` call their ``eps_fn`` once per step), so in
    ``"shifted"`` mode the n-th call uses :func:`shifted_offset` of n: make one TiledDenoiser per sampling run.
    ``tiles_per_call`` records how many tiles each call evaluated (each over the whole guided batch).

    The output does not depend on ``tile_batch_size``: weights are computed per tile and accumulated in the same
    tile order whatever the batching, so only the wrapped network's own batch numerics could differ.

    Example:
        >>> from nodes.common.denoiser import NoiseSchedule
        >>> class Position:  # predicts each latent pixel's own x coordinate, whatever the tile
        ...     schedule = NoiseSchedule(torch.linspace(0.99, 0.01, 10, dtype=torch.float64), "epsilon")
        ...     def __call__(self, x, t, conditioning):
        ...         return x
        >>> tiled = TiledDenoiser(Position(), TileSettings("shifted", tile=8, overlap=0, offset_stride=4))
        >>> x = torch.arange(20.).expand(1, 4, 12, 20)
        >>> torch.allclose(tiled(x, torch.zeros(1), Conditioning(torch.zeros(1, 3, 2))), x), tiled.tiles_per_call
        (True, [6])
    """

    def __init__(self, denoiser: Denoiser, settings: TileSettings, model: Any = None):
        """``model``: the ``ModelRef`` that ``denoiser`` is the plain diffusers denoiser of, when it is: where this
        process has a tile pool (``nodes/common/tile_pool.py``), its peers rebuild the denoiser from it and take
        a share of the tiles. None (LinFusion mounted, ComfyUI's MODEL, a test's denoiser) keeps every tile here."""
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.settings = settings
        self.model = model
        self.plan = TilePlanner(settings)
        self.tiles_per_call: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        tiles, weights = self.plan(x_t.shape[-2], x_t.shape[-1], len(self.tiles_per_call))
        self.tiles_per_call.append(len(tiles))
        conditioning = conditioning.repeat_to(x_t.shape[0])
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        chunks = tile_chunks(tiles, self.settings.tile_batch_size)

        def local(chunk: list[Tile]) -> torch.Tensor:
            return evaluate_tile_chunk(self.denoiser, x_t, t, conditioning, chunk)

        pool = tile_pool()
        predictions = (map(local, chunks) if pool is None or self.model is None or len(chunks) < 2
                       else pool.predictions(self.model, x_t, t, conditioning, chunks, local))
        return blend_predictions(x_t, tiles, weights, self.settings.tile_batch_size, predictions)


def tile_calls_per_step(height: int, width: int, settings: TileSettings, steps: int) -> float:
    """Mean tiles evaluated per step over ``steps`` steps on a ``height`` × ``width`` latent (no model runs).

    Example:
        >>> tile_calls_per_step(1024, 1024, TileSettings("multidiffusion", tile=64, overlap=16), 4)
        441.0
        >>> tile_calls_per_step(1024, 1024, TileSettings("shifted", tile=64, overlap=0), 4)
        272.25
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    counts = []
    for step in range(steps):
        offset = (shifted_offset(step, settings.tile, settings.offset_stride, settings.seed)
                  if settings.mode == "shifted" else (0, 0))
        counts.append(len(plan_tiles(height, width, settings.tile, settings.overlap, settings.mode, offset)))
    return sum(counts) / steps

