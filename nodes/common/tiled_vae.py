"""Tiled VAE decoding and encoding whose colours and seams match the whole-image pass.

Run tile by tile, a VAE differs from the whole-image pass in two ways. Each GroupNorm normalises a tile by that
tile's own statistics, so colours shift from tile to tile; and every convolution sees zero padding at the tile's
borders, which leaves seams. The functions here remove both:

1. **Shared GroupNorm statistics.** A first pass over the whole input records every GroupNorm's per-sample,
   per-group mean and variance, and every tile is then normalised with those, as the whole-image pass normalises
   it. Up to ``statistics_size`` (by default SDXL's native 1024², which every SDXL user decodes whole anyway)
   the statistics are exact, and tiles reproduce the whole-image pass. A larger input is downsampled to that size
   first (area averaging): the Tiled VAE extension's "fast mode" estimate (highres.md §4), which keeps the pass's
   memory bounded. Doubtful: on random-weight test VAEs the estimate is poor (further off than plain tiling); the
   extension's users find it good on trained VAEs, which we cannot check without SD weights.
2. **Context margins.** Each tile runs with ``margin`` pixels of its real neighbourhood around it and is cropped
   back, and the overlaps are cross-faded (:func:`nodes.common.tiles.tiled_apply`). The defaults are the
   extension's paddings: 11 latent pixels for the decoder, 32 image pixels for the encoder.

Departure from the whole-image pass, as in every tiled VAE (ComfyUI's, diffusers', the extension's): the VAE's
mid-block self-attention sees one padded tile, not the whole image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F

from .denoiser import DiffusersCodec
from .tile_pool import tile_pool
from .tiles import Window, tiled_apply, window_result

DECODER_MARGIN = 11  # latent pixels; the Tiled VAE extension's decoder padding
ENCODER_MARGIN = 32  # image pixels; its encoder padding (a multiple of the VAE's factor 8)
STATISTICS_SIDE_PX = 1024  # the largest image whose statistics pass runs at full size: SDXL's native side
DECODE_PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX (oneDNN's check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def decode_dtype(precision: str, codec: DiffusersCodec) -> torch.dtype | None:
    """The autocast dtype of a tiled decode for a ``DECODE_PRECISIONS`` name; None runs the VAE's own dtype.

    ``"auto"`` picks bfloat16 for a float32 VAE on a device that runs it natively. The decode of a large image is
    the 16K generator's longest part on a CPU; on this project's AVX512-BF16 CPU bfloat16 decodes the embedded
    model's 256² images 1.5× faster (one thread), with a mean error of 0.5 and a largest of 5 8-bit levels.
    """
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"precision must be one of {DECODE_PRECISIONS}; got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and codec.vae.dtype == torch.float32
                                   and native_bfloat16(codec.device)):
        return torch.bfloat16
    return None


def group_norm_statistics(module: torch.nn.Module,
                          measure: Callable[[], object]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-sample, per-group (mean, variance) that each GroupNorm of ``module`` saw while ``measure()`` ran it
    once, in module order (on the module's device)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    statistics: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(norm: torch.nn.GroupNorm, args: tuple) -> None:
        grouped = args[0].float().reshape(args[0].shape[0], norm.num_groups, -1)
        variance, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        statistics[norm] = (mean[..., None], variance[..., None])

    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    try:
        measure()
    finally:
        for hook in hooks:
            hook.remove()
    return [statistics[norm] for norm in norms]


@contextlib.contextmanager
def normalised_with(module: torch.nn.Module, statistics: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside the block, the GroupNorms of ``module`` normalise with ``statistics`` (of
    :func:`group_norm_statistics`, measured here or by another process on the same network), whatever their
    input."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    if len(norms) != len(statistics):
        raise ValueError(f"statistics for {len(statistics)} GroupNorms; the module has {len(norms)}")
    by_norm = dict(zip(norms, statistics))

    def normalise(norm: torch.nn.GroupNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        mean, variance = (value.to(x.device) for value in by_norm[norm])
        grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
        y = ((grouped - mean) * torch.rsqrt(variance + norm.eps)).reshape(x.shape)
        if norm.affine:
            broadcast = (1, -1) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(broadcast) + norm.bias.float().reshape(broadcast)
        return y.to(output.dtype)

    hooks = [norm.register_forward_hook(normalise) for norm in norms]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def shared_group_norm_statistics(module: torch.nn.Module, measure: Callable[[], object]) -> Iterator[None]:
    """Inside the block, every GroupNorm of ``module`` normalises with the statistics it saw while ``measure()``
    ran, whatever its input, so each tile of an image is normalised as the whole image is.

    Args:
        module: the network whose GroupNorms to share; each must run once per ``measure()`` call.
        measure: runs ``module`` once on the whole (or downsampled) input.
    Example:
        >>> norm = torch.nn.GroupNorm(2, 4)
        >>> whole = torch.randn(1, 4, 8, 8)
        >>> with shared_group_norm_statistics(norm, lambda: norm(whole)):
        ...     left, right = norm(whole[..., :4]), norm(whole[..., 4:])
        >>> torch.allclose(torch.cat([left, right], -1), norm(whole), atol=1e-5)
        True
    """
    with normalised_with(module, group_norm_statistics(module, measure)):
        yield


def _statistics_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` itself when its long side is at most ``size``, else an area-averaged copy that fits."""
    height, width = x.shape[-2:]
    if max(height, width) <= size:
        return x
    ratio = size / max(height, width)
    return F.interpolate(x, size=(max(1, round(height * ratio)), max(1, round(width * ratio))), mode="area")


def _tiled_with_shared_statistics(function: Callable[[torch.Tensor], torch.Tensor], network: torch.nn.Module,
                                  x: torch.Tensor, tile: int, overlap: int, scale: Fraction, margin: int,
                                  statistics_size: int, out: torch.Tensor | None,
                                  spread: Callable[[list], Callable] | None = None) -> torch.Tensor:
    """``function`` (which runs ``network``) over tiles of ``x``, every tile normalised with the statistics of
    the whole ``x`` (or of its copy downsampled to ``statistics_size``), written to ``out`` if given.
    ``spread(statistics)``, where given, returns the ``row_results`` that hands the tiles to a tile pool."""
    if max(x.shape[-2:]) <= tile:
        whole = function(x).cpu()  # one tile covers it: the whole-image pass itself
        if out is None:
            return whole
        out.copy_(whole)
        return out
    statistics = group_norm_statistics(network, lambda: function(_statistics_input(x, statistics_size)))
    with normalised_with(network, statistics):
        return tiled_apply(function, x, tile, overlap, scale, margin, out,
                           row_results=None if spread is None else spread(statistics))


def tiled_decode(codec: DiffusersCodec, latent: torch.Tensor, tile: int, overlap: int,
                 margin: int = DECODER_MARGIN, statistics_size: int | None = None,
                 out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``latent`` tile by tile, with the whole latent's GroupNorm statistics and context margins.

    Args:
        codec: the model's VAE.
        latent: (B, C, h, w) unscaled latents.
        tile, overlap, margin: in latent pixels (see :func:`nodes.common.tiles.tiled_apply`).
        statistics_size: the statistics pass runs on the latent when its long side is at most this, else on a
            downsampled copy; by default :data:`STATISTICS_SIDE_PX` in latent pixels, or one padded tile if larger.
        out: where to write the images, (B, 3, h·f, w·f) on the CPU, for example ``image.permute(0, 3, 1, 2)`` of
            a ComfyUI IMAGE buffer: tiles stream into it, so the decode holds no second full-size copy.
        dtype: the decoder's autocast dtype (:func:`decode_dtype`); None runs the VAE's own.
    Returns:
        (B, 3, h·f, w·f) images in 0..1, on the CPU (``out`` when given).
    Example:
        >>> from diffusers import AutoencoderKL
        >>> vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
        ...                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        >>> tiled_decode(DiffusersCodec(vae), torch.randn(1, 4, 12, 20), tile=8, overlap=2).shape
        torch.Size([1, 3, 24, 40])
    """
    statistics_size = statistics_size or max(STATISTICS_SIDE_PX // codec.downscale, tile + 2 * margin)
    pool = tile_pool()
    spread = None
    if pool is not None and codec.recipe is not None:
        def spread(statistics: list) -> Callable[[list[Window]], Iterator[torch.Tensor]]:
            shipped = [(mean.cpu(), variance.cpu()) for mean, variance in statistics]  # once per decode
            return lambda windows: pool.decoded_windows(codec.recipe, shipped, dtype, latent, windows,
                                                        lambda window: window_result(codec.decode, latent, window))

    with codec.in_use(), torch.autocast(codec.vae.device.type, dtype=dtype or torch.float32,
                                        enabled=dtype is not None):
        return _tiled_with_shared_statistics(codec.decode, codec.vae.decoder, latent, tile, overlap,
                                             Fraction(codec.downscale), margin, statistics_size, out, spread)


def decode_windows(codec: DiffusersCodec, statistics: list[tuple[torch.Tensor, torch.Tensor]],
                   dtype: torch.dtype | None, latent: torch.Tensor, windows: list[Window]) -> list[torch.Tensor]:
    """Decode some windows of a tiled decode (:func:`tiled_decode`) with the whole latent's GroupNorm
    ``statistics``, as a tile pool's worker does for the worker that runs the decode."""
    with codec.in_use(), torch.autocast(codec.vae.device.type, dtype=dtype or torch.float32,
                                        enabled=dtype is not None), normalised_with(codec.vae.decoder, statistics):
        return [window_result(codec.decode, latent, window) for window in windows]


def tiled_encode(codec: DiffusersCodec, image: torch.Tensor, tile: int, overlap: int,
                 margin: int = ENCODER_MARGIN, statistics_size: int | None = None) -> torch.Tensor:
    """Encode ``image`` tile by tile, with the whole image's GroupNorm statistics and context margins.

    Args:
        codec: the model's VAE.
        image: (B, 3, H, W) in 0..1; sides, ``tile``, ``overlap`` and ``margin`` multiples of the VAE's factor.
        tile, overlap, margin: in image pixels (see :func:`nodes.common.tiles.tiled_apply`).
        statistics_size: as for :func:`tiled_decode`, in image pixels.
    Returns:
        (B, C, H/f, W/f) unscaled latents (the posterior's mean), on the CPU.
    """
    statistics_size = statistics_size or max(STATISTICS_SIDE_PX, tile + 2 * margin)
    with codec.in_use():
        return _tiled_with_shared_statistics(codec.encode, codec.vae.encoder, image, tile, overlap,
                                             Fraction(1, codec.downscale), margin, statistics_size, None)
