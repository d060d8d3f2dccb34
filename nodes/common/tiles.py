"""Running a function over overlapping tiles and blending the results without seams.

The tiled VAE decode and encode use it: each tile is processed alone, so peak memory follows the tile size,
not the image size, and the overlaps are cross-faded with linear ramps so no seam shows.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch

from .progress import progress


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size``, neighbours overlapping by at least ``overlap``.

    The last tile is aligned with the end, so every tile has full length and the overlaps are spread evenly.

    Args:
        size: length to cover, >= 1.
        tile: tile length, >= 1.
        overlap: 0 <= overlap < tile.
        align: every start is a multiple of it (a VAE encoder's 8 keeps the latent grid); ``size - tile`` must
            be one too.
    Returns:
        Increasing start offsets; ``[0]`` when one tile covers everything.
    Raises:
        ValueError: an argument out of range.
    Example:
        >>> tile_starts(100, 40, 8)
        [0, 30, 60]
        >>> tile_starts(30, 40, 8)
        [0]
    """
    if size < 1 or tile < 1 or not 0 <= overlap < tile - align + 1 or align < 1:
        raise ValueError(f"need size >= 1, tile >= 1, align >= 1 and 0 <= overlap <= tile - align; got size={size}, "
                         f"tile={tile}, overlap={overlap}, align={align}")
    if size <= tile:
        return [0]
    if (size - tile) % align:
        raise ValueError(f"size - tile must be a multiple of align; got size={size}, tile={tile}, align={align}")
    count = -(-(size - overlap) // (tile - overlap))  # ceil: tiles needed with at least `overlap` in common
    # Rounding each start down to the grid can only widen an overlap, never narrow it below `overlap`.
    return [i * (size - tile) // (count - 1) // align * align for i in range(count)]


def _ramp(length: int, start: int, starts: list[int], tile: int, scale: Fraction) -> torch.Tensor:
    """Blend weights along one axis of one output tile: rising over the overlap with the previous tile and
    falling over the overlap with the next, never quite zero so every pixel keeps some weight."""
    weights = torch.ones(length)
    index = starts.index(start)
    if index > 0:
        rise = int((starts[index - 1] + tile - start) * scale)
        weights[:rise] = torch.linspace(0, 1, rise + 2)[1:-1]
    if index < len(starts) - 1:
        fall = int((start + tile - starts[index + 1]) * scale)
        weights[length - fall:] = torch.minimum(weights[length - fall:], torch.linspace(1, 0, fall + 2)[1:-1])
    return weights


def tiled_apply(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: Fraction, margin: int = 0) -> torch.Tensor:
    """``function`` applied to overlapping tiles of ``x`` and cross-faded into one result.

    Each tile is widened by ``margin`` input pixels of real context on every side (less at the image's edges)
    before ``function`` sees it, and its result is cropped back to the tile: a convolutional network then sees
    the same neighbourhood as on the whole input, instead of zero padding, up to ``margin`` pixels deep.

    Args:
        function: maps (B, C, h, w) to (B, C', h·scale, w·scale), as a VAE decoder (scale 8) or encoder (1/8).
        x: input of shape (B, C, H, W).
        tile: tile side in input pixels; tiles larger than ``x`` shrink to it.
        overlap: overlap between neighbouring tiles in input pixels, 0 <= overlap < tile.
        scale: output pixels per input pixel; ``tile``·scale and ``overlap``·scale must be whole numbers.
        margin: context added around each tile, in input pixels; ``margin``·scale must be a whole number.
    Returns:
        Shape (B, C', H·scale, W·scale), in ``function``'s dtype, on the CPU: the whole result is gathered in CPU
        memory, so an accelerator holds one tile at a time.
    Raises:
        ValueError: a size out of range, or a tile that does not map to whole output pixels.
    Example:
        >>> x = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(1, 2, 10, 12)
        >>> upsample = lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)
        >>> torch.allclose(tiled_apply(upsample, x, tile=6, overlap=2, scale=Fraction(2)), upsample(x))
        True
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    if margin < 0:
        raise ValueError(f"margin must be >= 0; got {margin}")
    for name, value in (("tile", tile_h * scale), ("tile", tile_w * scale), ("overlap", overlap * scale),
                        ("margin", margin * scale), ("height", height * scale), ("width", width * scale)):
        if value.denominator != 1:
            raise ValueError(f"{name} × scale must be a whole number of output pixels; got {value}")
    align = scale.denominator  # input pixels per output pixel: tiles must start on the output grid
    rows = tile_starts(height, tile_h, min(overlap, tile_h - align), align)
    columns = tile_starts(width, tile_w, min(overlap, tile_w - align), align)
    out, total = None, None
    for number, (top, left) in enumerate((r, c) for r in rows for c in columns):
        context_top, context_left = max(top - margin, 0), max(left - margin, 0)
        padded = function(x[..., context_top:top + tile_h + margin, context_left:left + tile_w + margin])
        dtype = padded.dtype
        crop_y, crop_x = int((top - context_top) * scale), int((left - context_left) * scale)
        result = padded[..., crop_y:crop_y + int(tile_h * scale), crop_x:crop_x + int(tile_w * scale)]
        result = result.to("cpu", torch.float32)
        if out is None:
            out = torch.zeros(*result.shape[:2], int(height * scale), int(width * scale))
            total = torch.zeros(int(height * scale), int(width * scale))
        weight = torch.outer(_ramp(result.shape[-2], top, rows, tile_h, scale),
                             _ramp(result.shape[-1], left, columns, tile_w, scale))
        y, x0 = int(top * scale), int(left * scale)
        out[..., y:y + result.shape[-2], x0:x0 + result.shape[-1]] += result * weight
        total[y:y + result.shape[-2], x0:x0 + result.shape[-1]] += weight
        progress(number + 1, len(rows) * len(columns))
    return (out / total).to(dtype)

