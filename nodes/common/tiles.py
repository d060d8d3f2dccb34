"""Running a function over overlapping tiles and blending the results without seams.

The tiled VAE decode and encode use it: each tile is processed alone and finished rows stream out, so work
memory follows the tile size (times the output's width), not the image's area, and the overlaps are
cross-faded with linear ramps so no seam shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fractions import Fraction

import torch
from PIL import Image

from .progress import PREVIEW_MAX_SIZE, progress


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


# A tile's input box and where its output lies in the function's result: (top, bottom, left, right) of the input,
# then (y, x, height, width) of the crop kept from the output.
Window = tuple[int, int, int, int, int, int, int, int]


def window_result(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: Window) -> torch.Tensor:
    """``function`` on the window's box of ``x`` (its tile and margin), cropped back to the tile, on the CPU in
    the function's dtype."""
    top, bottom, left, right, crop_y, crop_x, height, width = window
    padded = function(x[..., top:bottom, left:right])
    return padded[..., crop_y:crop_y + height, crop_x:crop_x + width].to("cpu")


def tiled_apply(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: Fraction, margin: int = 0, out: torch.Tensor | None = None,
                row_results: Callable[[list[Window]], Iterable[torch.Tensor]] | None = None) -> torch.Tensor:
    """``function`` applied to overlapping tiles of ``x`` and cross-faded into one result, streamed row by row.

    Each tile is widened by ``margin`` input pixels of real context on every side (less at the image's edges)
    before ``function`` sees it, and its result is cropped back to the tile: a convolutional network then sees
    the same neighbourhood as on the whole input, instead of zero padding, up to ``margin`` pixels deep.

    Tiles run row by row. Output rows that no later tile reaches are normalised and written to ``out`` as soon as
    their tile row is done, so besides ``out`` only one row of tiles is held in float32: work memory grows with
    the tile size and the output's width, never with its area. Each tile is reported through
    :func:`~nodes.common.progress.progress`; three-channel results (images) come with a preview that fills in
    tile by tile.

    Args:
        function: maps (B, C, h, w) to (B, C', h·scale, w·scale), as a VAE decoder (scale 8) or encoder (1/8).
        x: input of shape (B, C, H, W).
        tile: tile side in input pixels; tiles larger than ``x`` shrink to it.
        overlap: overlap between neighbouring tiles in input pixels, 0 <= overlap < tile.
        scale: output pixels per input pixel; ``tile``·scale and ``overlap``·scale must be whole numbers.
        margin: context added around each tile, in input pixels; ``margin``·scale must be a whole number.
        out: where to write the result, shape (B, C', H·scale, W·scale), on the CPU; it may be a view of another
            layout (``image.permute(0, 3, 1, 2)`` of a (B, H, W, C) buffer writes that buffer). None: a new tensor
            in ``function``'s dtype.
        row_results: each tile row's :func:`window_result` for its windows, in order; by default computed here,
            one at a time (a tile pool computes them on several workers instead).
    Returns:
        ``out`` (or the new tensor), on the CPU: an accelerator holds one tile at a time.
    Raises:
        ValueError: a size out of range, a tile that does not map to whole output pixels, or an ``out`` of the
            wrong shape.
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
    out_h, out_w = int(height * scale), int(width * scale)
    band_top, band, total, preview = 0, None, None, None  # the float32 rows not yet written, from band_top down
    if row_results is None:
        def row_results(windows: list[Window]) -> Iterable[torch.Tensor]:
            return (window_result(function, x, window) for window in windows)

    for row_index, top in enumerate(rows):
        y = int(top * scale)
        windows = []
        for left in columns:
            context_top, context_left = max(top - margin, 0), max(left - margin, 0)
            crop_y, crop_x = int((top - context_top) * scale), int((left - context_left) * scale)
            windows.append((context_top, top + tile_h + margin, context_left, left + tile_w + margin,
                            crop_y, crop_x, int(tile_h * scale), int(tile_w * scale)))
        for column_index, (left, result) in enumerate(zip(columns, row_results(windows))):
            if out is None:
                out = torch.empty(*result.shape[:2], out_h, out_w, dtype=result.dtype)
            result = result.float()
            if band is None:
                if tuple(out.shape) != (*result.shape[:2], out_h, out_w):
                    raise ValueError(f"out must have shape {(*result.shape[:2], out_h, out_w)}; got "
                                     f"{tuple(out.shape)}")
                band = torch.zeros(*result.shape[:2], result.shape[-2], out_w)
                total = torch.zeros(result.shape[-2], out_w)
            weight = torch.outer(_ramp(result.shape[-2], top, rows, tile_h, scale),
                                 _ramp(result.shape[-1], left, columns, tile_w, scale))
            x0, offset = int(left * scale), y - band_top
            band[..., offset:offset + result.shape[-2], x0:x0 + result.shape[-1]] += result * weight
            total[offset:offset + result.shape[-2], x0:x0 + result.shape[-1]] += weight
            if result.shape[1] == 3:
                preview = _paste_preview(preview, result, y, x0, out_h, out_w)
            progress(row_index * len(columns) + column_index + 1, len(rows) * len(columns),
                     None if preview is None else _preview_image(preview))
        # Rows above the next tile row are final: write them and keep the rest of the band for that row.
        done = (int(rows[row_index + 1] * scale) if row_index + 1 < len(rows) else out_h) - band_top
        out[..., band_top:band_top + done, :] = (band[..., :done, :] / total[:done]).to(out.dtype)
        kept = band.shape[-2] - done
        band[..., :kept, :], total[:kept] = band[..., done:, :].clone(), total[done:].clone()
        band[..., kept:, :], total[kept:] = 0, 0
        band_top += done
    return out


def _paste_preview(preview: torch.Tensor | None, result: torch.Tensor, y: int, x: int, height: int,
                   width: int) -> torch.Tensor:
    """The preview canvas (3, h, w), at most ``PREVIEW_MAX_SIZE`` a side, with ``result``'s first image pasted at
    output position (y, x)."""
    ratio = min(1.0, PREVIEW_MAX_SIZE / max(height, width))
    if preview is None:
        preview = torch.zeros(3, max(1, round(height * ratio)), max(1, round(width * ratio)))
    top, left = round(y * ratio), round(x * ratio)
    size = (max(1, round(result.shape[-2] * ratio)), max(1, round(result.shape[-1] * ratio)))
    small = torch.nn.functional.interpolate(result[:1], size=size, mode="area")[0]
    bottom, right = min(top + size[0], preview.shape[-2]), min(left + size[1], preview.shape[-1])
    preview[:, top:bottom, left:right] = small[:, :bottom - top, :right - left]
    return preview


def _preview_image(preview: torch.Tensor) -> Image.Image:
    """The preview canvas, values in 0..1, as an RGB image."""
    pixels = (preview.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)
