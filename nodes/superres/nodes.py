"""Super-resolution nodes from published weights: AdcSR's one-step ×4 (load it once, then upscale images).

Weights live in the models folder's ``adcsr/`` (``--models-dir`` standalone, ComfyUI's ``models/adcsr``), as
``.safetensors`` converted from the published pickles. The same code runs in both hosts: the model is Atelier's own
module, on the device the memory manager (standalone) or ``default_device`` (inside ComfyUI) gives it.
"""

from __future__ import annotations

import os
from fractions import Fraction

import torch

from ..common.images import to_channels_first, to_channels_last
from ..common.memory import MEMORY, Resident, runs_on
from ..common.tiles import tiled_apply
from ..models.devices import default_device
from ..models.families import read_json
from ..models.loading import list_models, resolve_model_path
from ..models.model_configs import shipped_config_dir
from ..models.refs import ModelsFolder
from .adcsr import SCALE, SIZE_MULTIPLE, AdcSRNet, load_adcsr, match_colour, padded_forward

CATEGORY = "atelier/superres"
ADCSR_FOLDER = "adcsr"
DEFAULT_TILE = 512  # LR pixels: the official test runs whole images of this size and below; larger ones are tiled
MAX_TILE = 2048
DEFAULT_OVERLAP = 32


def sd21_unet_config() -> dict:
    return read_json(os.path.join(shipped_config_dir("sd2"), "unet", "config.json"))


def load_kept_adcsr(network_file: str, decoder_file: str) -> AdcSRNet:
    """AdcSR, one copy per pair of files, kept by the memory manager (read back if evicted)."""
    network_file, decoder_file = os.path.realpath(network_file), os.path.realpath(decoder_file)
    name = f"AdcSR {os.path.basename(network_file)}"

    def read() -> AdcSRNet:
        return load_adcsr(network_file, decoder_file, sd21_unet_config())

    def load() -> tuple[AdcSRNet, Resident]:
        net = read()
        return net, Resident(name, {"net": net}, home=default_device(), reload=lambda: {"net": read()})

    signature = tuple(os.stat(path).st_mtime_ns for path in (network_file, decoder_file))
    return MEMORY.kept(("adcsr", network_file, decoder_file, signature), load)


def adcsr_upscale(net: AdcSRNet, image: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
                  ) -> torch.Tensor:
    """×4 of (B, 3, H, W) images in [0, 1] → (B, 3, 4H, 4W) in [0, 1]: AdcSR on overlapping tiles of ``tile``
    LR pixels, each seeing ``overlap`` pixels of context around it, cross-faded, then the colour fix on the whole
    image (as the official test does on whole images)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) RGB; got {tuple(image.shape)}")
    low = image.float() * 2 - 1
    with torch.no_grad(), MEMORY.use_module(net):
        device = runs_on(net)

        def upscale(window: torch.Tensor) -> torch.Tensor:
            return padded_forward(net, window.to(device)).float().cpu()

        high = tiled_apply(upscale, low, tile=tile, overlap=overlap, scale=Fraction(SCALE), margin=overlap)
    return (match_colour(high, low) / 2 + 0.5).clamp(0, 1)


class AtelierLoadAdcSR(ModelsFolder):
    DESCRIPTION = ("Loads AdcSR (CVPR 2025), one-step ×4 real-world super-resolution: the distilled network "
                   "(net_params_200) and the pretrained half VAE decoder (halfDecoder), both converted to "
                   ".safetensors in models/adcsr. No text encoder, no checkpoint needed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_ADCSR",)
    RETURN_NAMES = ("adcsr",)
    OUTPUT_TOOLTIPS = ("AdcSR, for AdcSR Upscale.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        names = list_models(ADCSR_FOLDER, cls.models_dir)
        return {"required": {
            "network_name": (names, {"tooltip": "net_params_200 converted to .safetensors (models/adcsr)."}),
            "decoder_name": (names, {"tooltip": "halfDecoder.ckpt's state_dict converted to .safetensors "
                                                "(models/adcsr)."}),
        }}

    def load(self, network_name: str, decoder_name: str) -> tuple[AdcSRNet]:
        return (load_kept_adcsr(resolve_model_path(ADCSR_FOLDER, network_name, self.models_dir),
                                resolve_model_path(ADCSR_FOLDER, decoder_name, self.models_dir)),)


class AtelierAdcSRUpscale:
    DESCRIPTION = ("AdcSR Upscale: ×4 super-resolution of real-world photos in one network pass (no sampling). "
                   "Images up to the tile size run whole, as the authors run them; larger ones in overlapping "
                   "tiles, so memory stays bounded at any size.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The image, 4× wider and taller.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "adcsr": ("ATELIER_ADCSR", {"tooltip": "From Load AdcSR."}),
            "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
            "tile": ("INT", {"default": DEFAULT_TILE, "min": 4 * SIZE_MULTIPLE, "max": MAX_TILE,
                             "step": SIZE_MULTIPLE, "tooltip": "Tile side in input pixels; an image no larger runs "
                                                               "whole."}),
            "overlap": ("INT", {"default": DEFAULT_OVERLAP, "min": 0, "max": 256, "step": SIZE_MULTIPLE,
                                "tooltip": "Overlap and context between tiles, in input pixels."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile: int | None = None, overlap: int | None = None) -> bool | str:
        if tile is not None and overlap is not None and overlap >= tile:
            return f"overlap ({overlap}) must be smaller than tile ({tile})"
        return True

    def upscale(self, adcsr: AdcSRNet, image: torch.Tensor, tile: int, overlap: int) -> tuple[torch.Tensor]:
        return (to_channels_last(adcsr_upscale(adcsr, to_channels_first(image), tile, overlap)),)


NODE_CLASS_MAPPINGS = {"AtelierLoadAdcSR": AtelierLoadAdcSR, "AtelierAdcSRUpscale": AtelierAdcSRUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierLoadAdcSR": "Load AdcSR (Atelier)",
                              "AtelierAdcSRUpscale": "AdcSR Upscale (Atelier)"}
