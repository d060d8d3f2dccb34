"""The pixel maths of ComfyUI's basic image nodes (empty, invert, crop, scale), on IMAGE tensors (B, H, W, 3).

Pure functions for :mod:`web.builtin_nodes`. Departures from ComfyUI, each on purpose: ``crop_image`` raises when
the crop leaves the image (ComfyUI clamps), ``scale_image`` with width and height both 0 raises (ComfyUI returns
the image unchanged), bilinear and bicubic are antialiased, lanczos resizes in float rather than 8 bits, and the
overshoot of bicubic and lanczos is clamped to 0..1 so IMAGE stays in range.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["CROP_METHODS", "MAX_BATCH_SIZE", "MAX_COLOR", "MAX_RESOLUTION", "UPSCALE_METHODS", "check_image",
           "crop_image", "empty_image", "invert_image", "scale_image", "target_size"]

MAX_RESOLUTION = 16384  # ComfyUI's MAX_RESOLUTION in nodes.py: the largest width or height a node accepts
MAX_BATCH_SIZE = 4096  # ComfyUI's EmptyImage limit
MAX_COLOR = 0xFFFFFF  # 24-bit RGB, as the frontend's "color" widget edits it
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
ANTIALIASED_METHODS = ("bilinear", "bicubic")  # the modes torch's interpolate can antialias
OVERSHOOTING_METHODS = ("bicubic", "lanczos")  # kernels with negative lobes ring past 0..1 at sharp edges


def check_image(image: torch.Tensor, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, W, 3); got {type(image).__name__}")
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name} must have shape (B, H, W, 3) with H, W >= 1; got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in 0..1; got {image.dtype}")


def empty_image(width: int, height: int, batch_size: int, color: int) -> torch.Tensor:
    """A batch of images filled with one colour.

    Args:
        width: 1 <= width <= MAX_RESOLUTION.
        height: 1 <= height <= MAX_RESOLUTION.
        batch_size: 1 <= batch_size <= MAX_BATCH_SIZE.
        color: 0xRRGGBB, 0 <= color <= 0xFFFFFF.
    Returns:
        IMAGE of shape (batch_size, height, width, 3), float32.
    Raises:
        ValueError: an argument out of range.
    Example:
        >>> image = empty_image(4, 2, 1, 0xFF0000)
        >>> tuple(image.shape), image[0, 0, 0].tolist()
        ((1, 2, 4, 3), [1.0, 0.0, 0.0])
    """
    for name, value, low, high in (("width", width, 1, MAX_RESOLUTION), ("height", height, 1, MAX_RESOLUTION),
                                   ("batch_size", batch_size, 1, MAX_BATCH_SIZE), ("color", color, 0, MAX_COLOR)):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255
    return rgb.expand(batch_size, height, width, 3).clone()


def invert_image(image: torch.Tensor) -> torch.Tensor:
    """Each channel ``c`` becomes ``1 - c``.

    Args:
        image: IMAGE of shape (B, H, W, 3), values in 0..1.
    Returns:
        IMAGE of the same shape, dtype and device.
    Raises:
        ValueError, TypeError: ``image`` is not an IMAGE tensor.
    Example:
        >>> invert_image(torch.full((1, 1, 2, 3), 0.25))[0, 0, 0].tolist()
        [0.75, 0.75, 0.75]
    """
    check_image(image)
    return 1 - image


def crop_image(image: torch.Tensor, width: int, height: int, x: int, y: int) -> torch.Tensor:
    """The ``width`` × ``height`` rectangle whose top-left corner is at (``x``, ``y``).

    Args:
        image: IMAGE of shape (B, H, W, 3).
        width: 1 <= width and x + width <= W.
        height: 1 <= height and y + height <= H.
        x: left edge, 0 <= x.
        y: top edge, 0 <= y.
    Returns:
        IMAGE of shape (B, height, width, 3).
    Raises:
        ValueError: the rectangle is empty or leaves the image (it is never clamped to fit).
    Example:
        >>> crop_image(torch.zeros(2, 8, 6, 3), width=4, height=3, x=2, y=5).shape
        torch.Size([2, 3, 4, 3])
    """
    check_image(image)
    image_height, image_width = image.shape[1:3]
    if (width < 1 or height < 1 or x < 0 or y < 0
            or x + width > image_width or y + height > image_height):
        raise ValueError(f"crop {width}x{height} at x={x}, y={y} must lie inside the {image_width}x{image_height} "
                         f"image (x + width <= {image_width}, y + height <= {image_height}, all >= 0, sizes >= 1)")
    return image[:, y:y + height, x:x + width, :]


def scale_image(image: torch.Tensor, width: int, height: int, method: str,
                crop: str = "disabled") -> torch.Tensor:
    """Resize images to ``width`` × ``height``; a 0 size follows the other one, keeping the aspect ratio.

    Args:
        image: IMAGE of shape (B, H, W, 3).
        width: target width in 0..MAX_RESOLUTION; 0 means ``round(W * height / H)``, at least 1.
        height: target height in 0..MAX_RESOLUTION; 0 means ``round(H * width / W)``, at least 1.
        method: one of UPSCALE_METHODS. The first four use ``torch.nn.functional.interpolate`` (bilinear and
            bicubic antialiased, which matters when shrinking); lanczos uses Pillow on float channels.
        crop: "disabled" stretches to the target; "center" first cuts the centre of the image to the target's
            aspect ratio, so nothing is stretched.
    Returns:
        IMAGE of shape (B, height, width, 3), on the input's device and dtype. Bicubic and lanczos overshoot
        at sharp edges; their result is clamped to 0..1 so that it stays a valid IMAGE.
    Raises:
        ValueError: both sizes 0, a size out of range, or an unknown method or crop.
    Example:
        >>> scale_image(torch.rand(1, 50, 100, 3), width=40, height=0, method="bilinear").shape
        torch.Size([1, 20, 40, 3])
    """
    check_image(image)
    if method not in UPSCALE_METHODS:
        raise ValueError(f"method must be one of {UPSCALE_METHODS}; got {method!r}")
    if crop not in CROP_METHODS:
        raise ValueError(f"crop must be one of {CROP_METHODS}; got {crop!r}")
    for name, value in (("width", width), ("height", height)):
        if not 0 <= value <= MAX_RESOLUTION:
            raise ValueError(f"{name} must be in [0, {MAX_RESOLUTION}]; got {value}")
    image_height, image_width = image.shape[1:3]
    width, height = target_size(image_width, image_height, width, height)
    if crop == "center":
        image = _center_crop(image, width / height)
    samples = image.movedim(-1, 1)  # interpolate and Pillow want (B, C, H, W); IMAGE is channels last
    if method == "lanczos":
        samples = _lanczos(samples, width, height)
    else:
        samples = F.interpolate(samples, size=(height, width), mode=method,
                                antialias=method in ANTIALIASED_METHODS)
    if method in OVERSHOOTING_METHODS:
        samples = samples.clamp(0, 1)
    return samples.movedim(1, -1).contiguous()


def target_size(image_width: int, image_height: int, width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` that :func:`scale_image` makes of an ``image_width`` × ``image_height`` image.

    Raises:
        ValueError: both sizes 0, or a size that follows the aspect ratio beyond MAX_RESOLUTION.
    Example:
        >>> target_size(100, 50, 40, 0)
        (40, 20)
    """
    if width == 0 and height == 0:
        raise ValueError("width and height are both 0; set at least one (a 0 size follows the other, "
                         "keeping the aspect ratio)")
    if width == 0:
        width = max(1, round(image_width * height / image_height))
    elif height == 0:
        height = max(1, round(image_height * width / image_width))
    if width > MAX_RESOLUTION or height > MAX_RESOLUTION:
        raise ValueError(f"keeping the aspect ratio of the {image_width}x{image_height} image gives {width}x{height}, "
                         f"larger than MAX_RESOLUTION {MAX_RESOLUTION}; give a smaller size")
    return width, height


def _center_crop(image: torch.Tensor, aspect: float) -> torch.Tensor:
    """The largest centred part of ``image`` (B, H, W, C) whose width / height is ``aspect``."""
    image_height, image_width = image.shape[1:3]
    width = min(image_width, max(1, round(image_height * aspect)))
    height = min(image_height, max(1, round(image_width / aspect)))
    x, y = (image_width - width) // 2, (image_height - height) // 2
    return image[:, y:y + height, x:x + width, :]


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's lanczos resize of (B, C, H, W), one float32 ("F" mode) channel at a time: no 8-bit rounding."""
    planes = samples.detach().to("cpu", torch.float32).contiguous().numpy()
    resized = np.stack([
        np.stack([np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.LANCZOS))
                  for plane in channels])
        for channels in planes])
    return torch.from_numpy(resized).to(samples.device, samples.dtype)
