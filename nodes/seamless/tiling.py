"""StableMaterials' tileability (Vecchio et al. 2024, "StableMaterials: Enhancing Diversity in Material Generation
via Semi-Supervised Learning", arXiv 2406.09293; ``techniques.md`` §4.11), for any SD checkpoint, without training.

Three parts, read from the authors' released diffusers pipeline (``pipeline.py`` of gvecchio/StableMaterials):

- **Circular convolutions** (:func:`circular_convolutions`): every ``Conv2d`` of the UNet sees its input wrapped
  around instead of zero-padded, from step ``⌊N·start_fraction⌋`` on (the pipeline: ``i >= len(timesteps) // 4``),
  so the layout forms normally first and the borders then join.
- **Rolled patch attention** (:func:`patched_attention`): when the latent is s ≥ 2 times the model's native size,
  every transformer runs on s×s native-size patches of its input, rolled by a new even offset at each call, so
  attention stays at the training resolution and the patch borders move.
- **Seamless decode** (:func:`seamless_decode`): the final latent is tiled 3×3 and cropped to its size plus a
  quarter, decoded, and cropped back, so the VAE's decoder sees wrapped context at the borders (the context is a
  setting here: up to the whole 3×3 tiling).

:func:`wrap_seam_ratio` measures the result: the second difference across the wrap-around borders over the
interior's (1 for an image that tiles like its inside).

Departures from the official code:

- The pipeline rolls each convolution's input by a random even offset, pads it circularly by 4 and crops the
  output by ``int(4 · output/input size)``; for a stride-2 convolution that crop (2) samples the input one pixel
  away from where the untiled network does (it reads ``2j + k − 2`` where the network was trained on
  ``2j + k − 1``). Here every convolution is padded circularly by exactly what keeps the network's own alignment
  (:func:`circular_padding`), with no random roll (the roll cancels out for a convolution): the same result as
  circular padding mode, deterministic for a seed.
- The rolled attention's offsets come from a generator seeded by the step (the pipeline draws them from torch's
  global generator), so a seed gives the same picture every run; it cuts and rolls along the tiled axes only,
  s patches per axis (the pipeline always tiles both, with a square latent).
- The seamless decode's margin is an eighth of each side's own length (the pipeline takes the height's for both).
  It is a setting: the authors' eighth is about 8 latent pixels at 512 px, but a decoder reaches farther than
  that on a small latent (the embedded model's 8×8: seams 4.9 times the interior with an eighth, 1.09 with the
  whole 3×3, ``bench/creative.py``). Wrapping the decoder's own convolutions instead (what other seamless-tiling
  nodes do) was tried and left out: the embedded model's decoder, trained at one size, reads its position from the
  zero padding and decodes a wrapped latent in wrong colours.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..common.unet_split import UNetCall, forwards_replaced
from ..sampling.patches import StepSchedule

AXES = ("both", "x", "y")
# Source: pipeline.py, ``past_mid = i >= len(timesteps) // 4``
DEFAULT_START_FRACTION = 0.25
# Source: pipeline.py, the decode: ``pad = l_height // 4`` more latent in all, centred: an eighth at each side
DEFAULT_CONTEXT = 0.125
# Source: pipeline.py, tiled_attn: patches run through the transformer 8 at a time
PATCHES_PER_CHUNK = 8
# Source: pipeline.py, roll(): ``torch.randint(0, 256) // 2 * 2``, an even offset in 0..254
MAX_ROLL = 256
# The transformer classes of either host: diffusers' and ComfyUI's (ldm/modules/attention.py)
TRANSFORMER_CLASSES = frozenset(("Transformer2DModel", "SpatialTransformer"))


def _wrapped_axes(axes: str) -> tuple[bool, bool]:
    if axes not in AXES:
        raise ValueError(f"axes must be one of {AXES}; got {axes!r}")
    return axes in ("both", "y"), axes in ("both", "x")


def circular_start(steps: int, start_fraction: float) -> int:
    """The first step (0 = noisiest) of ``steps`` whose convolutions wrap around.

    Example:
        >>> circular_start(20, 0.25), circular_start(20, 1.0), circular_start(7, 0.25)
        (5, 20, 1)
    """
    if steps < 1 or not 0 <= start_fraction <= 1:
        raise ValueError(f"steps must be >= 1 and start_fraction in [0, 1]; got {steps}, {start_fraction}")
    return math.floor(steps * start_fraction)


def circular_padding(padding: int, stride: int) -> tuple[int, int]:
    """(circular pad, output crop) on one axis for a convolution with zero ``padding`` and ``stride``: padding the
    input circularly by ``stride·c`` and cropping ``c = ⌈padding/stride⌉`` outputs at each end leaves every kept
    output reading the input at the places the unpadded network reads, with wrapped values for its zeros.

    Example:
        >>> circular_padding(1, 1), circular_padding(1, 2), circular_padding(0, 1)
        ((1, 1), (2, 1), (0, 0))
    """
    crop = -(-padding // stride)
    return stride * crop, crop


def _wrapping_forward(conv: torch.nn.Conv2d, forward: Callable, axes: str) -> Callable:
    (pad_y, crop_y), (pad_x, crop_x) = (circular_padding(padding, stride) if wraps else (0, 0)
                                        for padding, stride, wraps in zip(conv.padding, conv.stride,
                                                                          _wrapped_axes(axes)))

    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if pad_y > x.shape[-2] or pad_x > x.shape[-1]:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} map is too small to wrap around by {pad_y}x{pad_x}: the "
                             f"latent is too small for seamless tiling (use at least 2^downsamplings latent pixels per "
                             f"side: 8 for Stable Diffusion's UNet)")
        out = forward(F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="circular"), *args, **kwargs)
        return out[..., crop_y:out.shape[-2] - crop_y, crop_x:out.shape[-1] - crop_x]

    return run


@contextlib.contextmanager
def circular_convolutions(network: torch.nn.Module, axes: str = "both") -> Iterator[None]:
    """Every zero-padded ``Conv2d`` of ``network`` (LoRA branches and ComfyUI's cast layers included: they are
    ``Conv2d`` too) wraps around on ``axes`` for the block; each instance's own forward is wrapped, so other
    networks and other calls are untouched.

    Example:
        >>> conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> with circular_convolutions(conv):
        ...     wrapped = conv(x)
        >>> torch.allclose(wrapped, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight))
        True
    """
    _wrapped_axes(axes)
    convs = [module for module in network.modules() if isinstance(module, torch.nn.Conv2d)
             and module.padding_mode == "zeros" and not isinstance(module.padding, str) and any(module.padding)]
    with forwards_replaced(convs, lambda conv: _wrapping_forward(conv, conv.forward, axes)):
        yield


def _patches(hidden: torch.Tensor, scales: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B·s_y·s_x, C, H/s_y, W/s_x), patches in row-major order per batch element."""
    (batch, channels, height, width), (scale_y, scale_x) = hidden.shape, scales
    patches = hidden.reshape(batch, channels, scale_y, height // scale_y, scale_x, width // scale_x)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch * scale_y * scale_x, channels, height // scale_y,
                                                     width // scale_x)


def _unpatched(patches: torch.Tensor, scales: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_patches`."""
    (count, channels, height, width), (scale_y, scale_x) = patches.shape, scales
    batch = count // (scale_y * scale_x)
    hidden = patches.reshape(batch, scale_y, scale_x, channels, height, width).permute(0, 3, 1, 4, 2, 5)
    return hidden.reshape(batch, channels, scale_y * height, scale_x * width)


def _patched_forward(forward: Callable, scale: int, generator: torch.Generator, axes: str) -> Callable:
    wrapped = _wrapped_axes(axes)
    # only a wrapped axis is cut: a cut that does not move along an axis would leave a seam across it
    scales = tuple(scale if wraps else 1 for wraps in wrapped)

    def run(hidden: torch.Tensor, *args, **kwargs) -> Any:
        height, width = hidden.shape[-2:]
        if height % scales[0] or width % scales[1]:  # a map the patches do not divide: attention over all of it
            return forward(hidden, *args, **kwargs)
        drawn = torch.randint(0, MAX_ROLL, (2,), generator=generator)
        shifts = tuple(int(value) // 2 * 2 * wraps for value, wraps in zip(drawn, wrapped))
        patches = _patches(torch.roll(hidden, shifts, dims=(2, 3)), scales)
        # the text context: by name in diffusers' call, second in ComfyUI's; each patch gets its element's
        by_name = "encoder_hidden_states" in kwargs
        context = kwargs["encoder_hidden_states"] if by_name else (args[0] if args else None)
        if isinstance(context, torch.Tensor):
            context = context.repeat_interleave(scales[0] * scales[1], dim=0)
        outputs, as_tuple = [], False
        for start in range(0, patches.shape[0], PATCHES_PER_CHUNK):
            part = slice(start, start + PATCHES_PER_CHUNK)
            part_context = context[part] if isinstance(context, torch.Tensor) else context
            if by_name:
                output = forward(patches[part], *args, **{**kwargs, "encoder_hidden_states": part_context})
            elif args:
                output = forward(patches[part], part_context, *args[1:], **kwargs)
            else:
                output = forward(patches[part], **kwargs)
            as_tuple = isinstance(output, tuple)
            outputs.append(output[0] if as_tuple else output)
        hidden = torch.roll(_unpatched(torch.cat(outputs), scales), tuple(-shift for shift in shifts), dims=(2, 3))
        return (hidden,) if as_tuple else hidden

    return run


@contextlib.contextmanager
def patched_attention(network: torch.nn.Module, scale: int, seed: int, axes: str = "both") -> Iterator[None]:
    """For the block, each transformer of ``network`` (diffusers' ``Transformer2DModel``, ComfyUI's
    ``SpatialTransformer``) runs on patches of its input, ``scale`` along each wrapped axis of ``axes``, rolled along
    them by an even offset drawn from a generator seeded with ``seed`` (a new offset per call), 8 patches at a
    time. ``scale`` 1 leaves them as they are."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1; got {scale}")
    if scale == 1:
        yield
        return
    generator = torch.Generator().manual_seed(seed)
    transformers = [module for module in network.modules() if type(module).__name__ in TRANSFORMER_CLASSES]
    with forwards_replaced(transformers, lambda module: _patched_forward(module.forward, scale, generator, axes)):
        yield


class SeamlessTiling:
    """The circular convolutions and the rolled patch attention as a step-aware sampling patch
    (:class:`~nodes.sampling.patches.SamplingPatch`).

    Args:
        start_fraction: the convolutions wrap around from step ``⌊N·start_fraction⌋`` on (1: never).
        axes: "both", "x" (left/right borders join) or "y" (top/bottom).
        patched_attention: whether a latent at least twice the native size runs its transformers on rolled
            native-size patches.
        native_size: the model's training latent side; None: the UNet's ``config.sample_size`` (diffusers').
    """

    def __init__(self, start_fraction: float = DEFAULT_START_FRACTION, axes: str = "both",
                 patched_attention: bool = True, native_size: int | None = None):
        circular_start(1, start_fraction)  # checks the fraction
        _wrapped_axes(axes)
        if native_size is not None and native_size < 1:
            raise ValueError(f"native_size must be >= 1; got {native_size}")
        self.start_fraction, self.axes = start_fraction, axes
        self.patched_attention, self.native_size = patched_attention, native_size
        self.wrapped_calls = 0  # UNet calls run with circular convolutions

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        return apply(x)

    def attention_scale(self, network: torch.nn.Module, latent_size: tuple[int, int]) -> int:
        """s, the patches per axis: how many times the native size fits in the latent's smaller side (1: none)."""
        native = self.native_size or getattr(getattr(network, "config", None), "sample_size", None)
        if not self.patched_attention or not native:
            return 1
        return max(1, min(latent_size) // native)

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        index = steps.index_of_timestep(timesteps)
        wraps = index >= circular_start(steps.count, self.start_fraction)
        scale = self.attention_scale(call.network, tuple(x.shape[-2:]))
        with contextlib.ExitStack() as stack:
            if wraps:
                stack.enter_context(circular_convolutions(call.network, self.axes))
                self.wrapped_calls += 1
            stack.enter_context(patched_attention(call.network, scale, index, self.axes))
            return call.forward(x, timesteps)


def seamless_latent(latent: torch.Tensor, axes: str = "both",
                    context: float = DEFAULT_CONTEXT) -> tuple[torch.Tensor, tuple[int, int]]:
    """The latent (B, C, h, w) tiled 3×3 and cropped, centred, to (h + 2·m_y, w + 2·m_x) with the margins
    m = ⌊side·context⌋ wrapped in at each side of each wrapped axis (0 on an axis ``axes`` leaves alone); with the
    margins in latent pixels. ``context`` 1/8 is the authors' (a quarter more in all), 1 the whole 3×3 tiling.

    Example:
        >>> padded, margins = seamless_latent(torch.zeros(1, 4, 16, 8))
        >>> padded.shape, margins
        (torch.Size([1, 4, 20, 10]), (2, 1))
        >>> seamless_latent(torch.zeros(1, 4, 16, 8), axes="x", context=1.0)[0].shape
        torch.Size([1, 4, 16, 24])
    """
    if latent.ndim != 4:
        raise ValueError(f"latent must be (B, C, h, w); got shape {tuple(latent.shape)}")
    if not 0 <= context <= 1:
        raise ValueError(f"context must be in [0, 1]; got {context}")
    wraps_y, wraps_x = _wrapped_axes(axes)
    height, width = latent.shape[-2:]
    margin_y, margin_x = math.floor(height * context) * wraps_y, math.floor(width * context) * wraps_x
    tiled = latent.repeat(1, 1, 3, 3)
    return (tiled[..., height - margin_y:2 * height + margin_y, width - margin_x:2 * width + margin_x],
            (margin_y, margin_x))


def seamless_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, axes: str = "both",
                    context: float = DEFAULT_CONTEXT) -> torch.Tensor:
    """Images (B, 3, H, W) of ``latent`` (B, C, h, w) whose borders were decoded with the wrapped-around context
    of :func:`seamless_latent`; ``decode`` maps latents to images (B, 3, f·h, f·w)."""
    padded, (margin_y, margin_x) = seamless_latent(latent, axes, context)
    image = decode(padded)
    factor_y, factor_x = image.shape[-2] // padded.shape[-2], image.shape[-1] // padded.shape[-1]
    top, left = margin_y * factor_y, margin_x * factor_x
    return image[..., top:top + latent.shape[-2] * factor_y, left:left + latent.shape[-1] * factor_x]


def tile_grid(image: torch.Tensor, axes: str = "both", times: int = 3) -> torch.Tensor:
    """Images (B, C, H, W) repeated ``times`` times along each wrapped axis: how a texture looks tiled."""
    wraps_y, wraps_x = _wrapped_axes(axes)
    return image.repeat(1, 1, times if wraps_y else 1, times if wraps_x else 1)


def wrap_seam_ratio(image: torch.Tensor) -> torch.Tensor:
    """Per image (B, C, H, W): the mean absolute second difference across the wrap-around borders (left/right and
    top/bottom, the two positions next to each border) over the mean across all interior positions. About 1 for
    an image that tiles like its inside; well above 1 where the borders do not meet.

    Example:
        >>> x = torch.linspace(0, 2 * math.pi, 33)[:-1]
        >>> periodic = torch.sin(x)[None, None, None, :] + torch.cos(x)[None, None, :, None]
        >>> bool(wrap_seam_ratio(periodic) < 1.05), bool(wrap_seam_ratio(periodic[..., :20, :20]) > 2)
        (True, True)
    """
    if image.ndim != 4 or min(image.shape[-2:]) < 4:
        raise ValueError(f"image must be (B, C, H, W) with H, W >= 4; got shape {tuple(image.shape)}")
    image = image.double()
    ratios = []
    for dim in (-1, -2):
        size = image.shape[dim]
        # second differences at every position of the periodic extension: position i uses i-1, i, i+1 (mod size)
        second = (torch.roll(image, 1, dim) - 2 * image + torch.roll(image, -1, dim)).abs()
        border = second.index_select(dim, torch.tensor([0, size - 1], device=image.device))
        interior = second.narrow(dim, 1, size - 2)
        ratios.append(border.mean(dim=(1, 2, 3)) / interior.mean(dim=(1, 2, 3)).clamp_min(1e-12))
    return ((ratios[0] + ratios[1]) / 2).float()
