"""ComfyUI's latent and VAE nodes in the standalone app, plus the image resizing nodes its templates use.

LATENT is ComfyUI's ``{"samples": (B, C, h, w) unscaled, optional "noise_mask", "batch_index"}``; IMAGE is
(B, H, W, 3) in 0..1; MASK is (B, H, W). The VAE socket carries a :class:`~nodes.common.denoiser.DiffusersCodec`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from nodes.common.checks import range_errors
from nodes.common.denoiser import DiffusersCodec
from nodes.common.images import to_channels_first, to_channels_last
from nodes.common.limits import MAX_BATCH, MAX_RESOLUTION
from nodes.common.tiled_vae import tiled_decode, tiled_encode
from nodes.sampling.latents import latent_samples

from .image_maths import UPSCALE_METHODS, scale_image
from .limits import DEFAULT_LIMITS, Limits, check_pixel_budget, pixel_budget_error

LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
CROP_METHODS = ("disabled", "center")
LATENT_CHANNELS = 4  # SD1, SD2 and SDXL
MIN_UPSCALED_SIDE = 64  # pixels: LatentUpscale never goes below this, as ComfyUI's


def resize_latent(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Latents (B, C, h, w) resized to ``height`` × ``width`` cells, as ComfyUI's ``common_upscale``: plain
    interpolation (no antialiasing), after an optional centre crop to the target's aspect ratio.

    Example:
        >>> resize_latent(torch.ones(1, 4, 8, 8), 12, 16, "bilinear").shape
        torch.Size([1, 4, 16, 12])
    """
    if method not in LATENT_UPSCALE_METHODS:
        raise ValueError(f"upscale_method must be one of {LATENT_UPSCALE_METHODS}; got {method!r}")
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    return F.interpolate(samples, size=(height, width), mode=method)


def _image_to_channels_first(pixels: torch.Tensor) -> torch.Tensor:
    return to_channels_first(pixels, "pixels")[:, :3]


def crop_to_multiple(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) centre-cropped so that H and W are multiples of ``factor``, as ComfyUI's VAE encode."""
    height, width = pixels.shape[1] // factor * factor, pixels.shape[2] // factor * factor
    top, left = (pixels.shape[1] % factor) // 2, (pixels.shape[2] % factor) // 2
    return pixels[:, top:top + height, left:left + width]


class _Budgeted:
    """Nodes that make batches from numbers: the server's pixel budget is checked before allocating."""

    limits: ClassVar[Limits] = DEFAULT_LIMITS

    def check_budget(self, batch: int, height: int, width: int) -> None:
        check_pixel_budget(type(self).__name__, batch, height, width, self.limits)

    def scale_by(self, image: torch.Tensor, method: str, factor: float) -> torch.Tensor:
        """IMAGE resized by ``factor`` on both sides (at least 1 px), within the pixel budget."""
        width, height = max(1, round(image.shape[2] * factor)), max(1, round(image.shape[1] * factor))
        self.check_budget(image.shape[0], height, width)
        return scale_image(image, width, height, method)


class EmptyLatentImage(_Budgeted):
    DESCRIPTION = "A new batch of empty latent images to be denoised via sampling."
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "step": 1,
                                   "tooltip": "The number of latent images in the batch."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None, height: int | None, batch_size: int | None) -> bool | str:
        required = cls.INPUT_TYPES()["required"]
        values = {"width": width, "height": height, "batch_size": batch_size}
        errors = range_errors(values, {name: (required[name][1]["min"], required[name][1]["max"]) for name in values})
        if errors:
            return "; ".join(errors)
        if None in values.values():
            return True  # linked: generate() checks the budget when it runs
        return pixel_budget_error(cls.__name__, batch_size, height // 8 * 8, width // 8 * 8, cls.limits) or True

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict]:
        self.check_budget(batch_size, height // 8 * 8, width // 8 * 8)
        return ({"samples": torch.zeros(batch_size, LATENT_CHANNELS, height // 8, width // 8)},)


class LatentUpscale(_Budgeted):
    DESCRIPTION = "Resizes latents to a size in pixels (0 keeps the aspect ratio from the other side)."
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The resized latents.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        side = {"min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latents to resize."}),
            "upscale_method": (list(LATENT_UPSCALE_METHODS), {"tooltip": "The interpolation."}),
            "width": ("INT", {"default": 512, **side, "tooltip": "Target width in pixels; 0 follows the height."}),
            "height": ("INT", {"default": 512, **side, "tooltip": "Target height in pixels; 0 follows the width."}),
            "crop": (list(CROP_METHODS), {"tooltip": "'center' cuts to the target's aspect ratio first."}),
        }}

    def upscale(self, samples: dict, upscale_method: str, width: int, height: int, crop: str) -> tuple[dict]:
        latent = latent_samples(samples)
        if width == 0 and height == 0:
            return (samples,)
        if width == 0:
            height = max(MIN_UPSCALED_SIDE, height)
            width = max(MIN_UPSCALED_SIDE, round(latent.shape[-1] * height / latent.shape[-2]))
        elif height == 0:
            width = max(MIN_UPSCALED_SIDE, width)
            height = max(MIN_UPSCALED_SIDE, round(latent.shape[-2] * width / latent.shape[-1]))
        else:
            width, height = max(MIN_UPSCALED_SIDE, width), max(MIN_UPSCALED_SIDE, height)
        self.check_budget(latent.shape[0], height // 8 * 8, width // 8 * 8)
        return ({**samples, "samples": resize_latent(latent, width // 8, height // 8, upscale_method, crop)},)


class LatentUpscaleBy(_Budgeted):
    DESCRIPTION = "Resizes latents by a factor (a hires-fix pass samples them again)."
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The resized latents.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latents to resize."}),
            "upscale_method": (list(LATENT_UPSCALE_METHODS), {"tooltip": "The interpolation."}),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "The factor on both sides."}),
        }}

    def upscale(self, samples: dict, upscale_method: str, scale_by: float) -> tuple[dict]:
        latent = latent_samples(samples)
        width, height = round(latent.shape[-1] * scale_by), round(latent.shape[-2] * scale_by)
        self.check_budget(latent.shape[0], height * 8, width * 8)
        return ({**samples, "samples": resize_latent(latent, width, height, upscale_method)},)


class VAEDecode:
    DESCRIPTION = "Decodes latent images back into pixel space images."
    CATEGORY = "latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    def decode(self, vae: DiffusersCodec, samples: dict) -> tuple[torch.Tensor]:
        return (to_channels_last(vae.decode(latent_samples(samples)).cpu()),)


class VAEDecodeTiled:
    DESCRIPTION = ("Decodes latents tile by tile, with the whole image's normalisation statistics and overlapping "
                   "tiles, so large images fit in memory with no seams.")
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip": "Tile side, pixels."}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip": "Tile overlap, pixels."}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only used for video VAEs (none here): frames per tile."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only used for video VAEs (none here): frame overlap."}),
        }}

    def decode(self, vae: DiffusersCodec, samples: dict, tile_size: int, overlap: int = 64, temporal_size: int = 64,
               temporal_overlap: int = 8) -> tuple[torch.Tensor]:
        if tile_size < overlap * 4:  # ComfyUI's rule: the overlap is at most a quarter of the tile
            overlap = tile_size // 4
        factor = vae.downscale
        image = tiled_decode(vae, latent_samples(samples), tile_size // factor, overlap // factor)
        return (to_channels_last(image.cpu()),)


class VAEEncode:
    DESCRIPTION = "Encodes images into latents (for image-to-image); sides are cropped to multiples of 8."
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latents.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pixels": ("IMAGE", {"tooltip": "The images to encode."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for encoding."})}}

    def encode(self, vae: DiffusersCodec, pixels: torch.Tensor) -> tuple[dict]:
        image = _image_to_channels_first(crop_to_multiple(pixels, vae.downscale))
        return ({"samples": vae.encode(image).cpu()},)


class VAEEncodeTiled(VAEEncode):
    DESCRIPTION = "Encodes images tile by tile with the whole image's normalisation statistics, for large images."
    CATEGORY = "_for_testing"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The images to encode."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for encoding."}),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "tooltip": "Tile side, pixels."}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip": "Tile overlap, pixels."}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only used for video VAEs (none here)."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only used for video VAEs (none here)."}),
        }}

    def encode(self, vae: DiffusersCodec, pixels: torch.Tensor, tile_size: int = 512, overlap: int = 64,
               temporal_size: int = 64, temporal_overlap: int = 8) -> tuple[dict]:
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        image = _image_to_channels_first(crop_to_multiple(pixels, vae.downscale))
        return ({"samples": tiled_encode(vae, image, tile_size, overlap).cpu()},)


class VAEEncodeForInpaint:
    DESCRIPTION = ("Encodes an image for an inpainting model: the masked pixels are set to grey and the mask, grown "
                   "by a few pixels, becomes the latent's noise mask.")
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latents with the grown mask as their noise mask.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to inpaint."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for encoding."}),
            "mask": ("MASK", {"tooltip": "1 where to paint, 0 where to keep."}),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1,
                                     "tooltip": "Pixels to grow the noise mask by, so the edit blends in."}),
        }}

    def encode(self, vae: DiffusersCodec, pixels: torch.Tensor, mask: torch.Tensor,
               grow_mask_by: int = 6) -> tuple[dict]:
        factor = vae.downscale
        mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                             size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixels = crop_to_multiple(pixels, factor)[..., :3].clone()
        mask = crop_to_multiple(mask.movedim(1, -1), factor).movedim(-1, 1)
        height, width = pixels.shape[1:3]
        if grow_mask_by == 0:
            grown = mask
        else:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            grown = F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
        keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
        pixels = (pixels - 0.5) * keep + 0.5  # masked pixels become grey before encoding
        latent = vae.encode(_image_to_channels_first(pixels)).cpu()
        return ({"samples": latent, "noise_mask": grown[:, :, :height, :width].round()},)


class SetLatentNoiseMask:
    DESCRIPTION = "Sampling repaints only where the mask is 1 and keeps the latents elsewhere."
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latents with the noise mask.",)
    FUNCTION = "set_mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latents."}),
                             "mask": ("MASK", {"tooltip": "1 where to repaint."})}}

    def set_mask(self, samples: dict, mask: torch.Tensor) -> tuple[dict]:
        latent_samples(samples)
        return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)


class ImageScaleBy(_Budgeted):
    DESCRIPTION = "Resizes images by a factor."
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The resized images.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to resize."}),
            "upscale_method": (list(UPSCALE_METHODS), {"tooltip": "The interpolation."}),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "The factor on both sides."}),
        }}

    def upscale(self, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[torch.Tensor]:
        return (self.scale_by(image, upscale_method, scale_by),)


class ImageScaleToTotalPixels(_Budgeted):
    DESCRIPTION = "Resizes images to about a number of megapixels, keeping the aspect ratio."
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The resized images.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to resize."}),
            "upscale_method": (list(UPSCALE_METHODS), {"tooltip": "The interpolation."}),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01, "round": 0.001,
                                     "tooltip": "The target size in millions of pixels (1 = 1024 × 1024)."}),
        }}

    def upscale(self, image: torch.Tensor, upscale_method: str, megapixels: float) -> tuple[torch.Tensor]:
        scale = math.sqrt(megapixels * 1024 * 1024 / (image.shape[1] * image.shape[2]))
        return (self.scale_by(image, upscale_method, scale),)


class ImageBatch(_Budgeted):
    DESCRIPTION = "Joins two image batches; the second is resized to the first's size when they differ."
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("One batch of both.",)
    FUNCTION = "batch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image1": ("IMAGE", {"tooltip": "The first batch."}),
                             "image2": ("IMAGE", {"tooltip": "The second batch."})}}

    def batch(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        self.check_budget(image1.shape[0] + image2.shape[0], image1.shape[1], image1.shape[2])
        if image1.shape[1:3] != image2.shape[1:3]:
            image2 = scale_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return (torch.cat([image1, image2]),)


NODE_CLASSES = (EmptyLatentImage, LatentUpscale, LatentUpscaleBy, VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeTiled,
                VAEEncodeForInpaint, SetLatentNoiseMask, ImageScaleBy, ImageScaleToTotalPixels, ImageBatch)
DISPLAY_NAMES = {"EmptyLatentImage": "Empty Latent Image", "LatentUpscale": "Upscale Latent",
                 "LatentUpscaleBy": "Upscale Latent By", "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode",
                 "VAEDecodeTiled": "VAE Decode (Tiled)", "VAEEncodeTiled": "VAE Encode (Tiled)",
                 "VAEEncodeForInpaint": "VAE Encode (for Inpainting)", "SetLatentNoiseMask": "Set Latent Noise Mask",
                 "ImageScaleBy": "Upscale Image By", "ImageScaleToTotalPixels": "Scale Image to Total Pixels",
                 "ImageBatch": "Batch Images"}
