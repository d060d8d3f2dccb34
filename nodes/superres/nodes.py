"""Super-resolution nodes from published weights: AdcSR's and TVT's one-step ×4 (load once, then upscale images).

Weights live in the models folder's ``adcsr/`` and ``tvt/`` (``--models-dir`` standalone, ComfyUI's ``models/adcsr``
and ``models/tvt``), as ``.safetensors`` converted from the published pickles. The same code runs in both hosts: the
networks are Atelier's own modules, on the device the memory manager (standalone) or ``default_device`` (inside
ComfyUI) gives them; TVT's prompt goes through the CLIP socket (SD2.1-base's text encoder).
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import torch

from ..common.denoiser import DiffusersCodec
from ..common.images import to_channels_first, to_channels_last
from ..common.memory import MEMORY, Resident, runs_on
from ..common.progress import progress
from ..common.tiled_vae import tiled_decode, tiled_encode
from ..common.tiles import tiled_apply
from ..models.comfy_adapters import text_conditioning
from ..models.devices import default_device
from ..models.loading import list_models, resolve_model_path
from ..models.model_configs import shipped_unet_config
from ..models.refs import ModelsFolder
from .adcsr import SCALE, SIZE_MULTIPLE, AdcSRNet, load_adcsr, match_colour, padded_forward
from .tvt import DEFAULT_PROMPT, TIMESTEP, load_tvt_unet, load_vaed4, tvt_upscale

CATEGORY = "atelier/superres"
ADCSR_FOLDER = "adcsr"
TVT_FOLDER = "tvt"
TVT_TILE, TVT_OVERLAP = 192, 64  # latent pixels; Source: inference_tile.py's defaults (--tiled_size, --tiled_overlap)
TVT_VAE_TILE = 1024  # image pixels: larger images run the VAE in tiles (the authors run it whole)
DEFAULT_TILE = 512  # LR pixels: the official test runs whole images of this size and below; larger ones are tiled
MAX_TILE = 2048
DEFAULT_OVERLAP = 32


def sd21_unet_config() -> dict:
    return shipped_unet_config("sd2")


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


@dataclasses.dataclass(frozen=True)
class TVTModel:
    """TVT's UNet (``model_TVT`` merged) and its 4× VAE, float32, eval mode."""

    unet: torch.nn.Module
    vae: torch.nn.Module


def load_kept_tvt(vae_file: str, unet_file: str, weights_file: str) -> TVTModel:
    """TVT, one copy per set of files, kept by the memory manager (read back if evicted)."""
    paths = tuple(os.path.realpath(path) for path in (vae_file, unet_file, weights_file))

    def read() -> dict[str, torch.nn.Module]:
        return {"unet": load_tvt_unet(paths[1], paths[2]), "vae": load_vaed4(paths[0])}

    def load() -> tuple[TVTModel, Resident]:
        parts = read()
        return TVTModel(**parts), Resident(f"TVT {os.path.basename(paths[2])}", parts, home=default_device(),
                                           reload=read)

    signature = tuple(os.stat(path).st_mtime_ns for path in paths)
    return MEMORY.kept(("tvt", paths, signature), load)


def tvt_upscale_image(model: TVTModel, states: torch.Tensor, image: torch.Tensor, tile: int = TVT_TILE,
                      overlap: int = TVT_OVERLAP, vae_tile: int = TVT_VAE_TILE, colour_fix: bool = True
                      ) -> torch.Tensor:
    """×4 of (B, 3, H, W) images in [0, 1] with the prompt's ``states`` (1, 77, D): :func:`tvt_upscale` on
    ``model``, the VAE whole up to ``vae_tile`` pixels a side and tiled beyond (shared GroupNorm statistics and
    context margins: VAED4 has no attention, so tiles see what the whole pass sees)."""
    codec = DiffusersCodec(model.vae)
    with torch.no_grad(), MEMORY.use_module(model.unet), MEMORY.use_module(model.vae):
        device = runs_on(model.unet)
        text = states.to(device)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            if max(pixels.shape[-2:]) <= vae_tile:
                return codec.encode(pixels).to(device)
            return tiled_encode(codec, pixels, tile=vae_tile, overlap=vae_tile // 8).to(device)

        def decode(latent: torch.Tensor) -> torch.Tensor:
            if max(latent.shape[-2:]) * codec.downscale <= vae_tile:
                return codec.decode(latent).cpu()
            latent_tile = vae_tile // codec.downscale
            return tiled_decode(codec, latent, tile=latent_tile, overlap=latent_tile // 8)

        def predict_eps(latent: torch.Tensor) -> torch.Tensor:
            timestep = torch.full((latent.shape[0],), TIMESTEP, device=device)
            eps = model.unet(latent, timestep, encoder_hidden_states=text.expand(latent.shape[0], -1, -1)).sample
            progress(1, 1)
            return eps

        return tvt_upscale(predict_eps, encode, decode, image.float(), tile, overlap, colour_fix).cpu()


class AtelierLoadTVT(ModelsFolder):
    DESCRIPTION = ("Loads TVT (ICCV 2025), one-step ×4 super-resolution with a transferred 4× VAE: the VAE "
                   "(vae.ckpt's vaeDe4 tensors), the TVTUNet folder's UNet and model_TVT's weights, all converted to "
                   ".safetensors in models/tvt. The prompt needs SD2.1-base's CLIP.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_TVT",)
    RETURN_NAMES = ("tvt",)
    OUTPUT_TOOLTIPS = ("TVT, for TVT Upscale.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        names = list_models(TVT_FOLDER, cls.models_dir)
        return {"required": {
            "vae_name": (names, {"tooltip": "vae.ckpt's vaeDe4 tensors converted to .safetensors (models/tvt)."}),
            "unet_name": (names, {"tooltip": "TVTUNet/unet's weights, with its config.json beside them "
                                             "(models/tvt)."}),
            "weights_name": (names, {"tooltip": "model_TVT.pkl's state_dict_unet converted to .safetensors "
                                                "(models/tvt)."}),
        }}

    def load(self, vae_name: str, unet_name: str, weights_name: str) -> tuple[TVTModel]:
        return (load_kept_tvt(*(resolve_model_path(TVT_FOLDER, name, self.models_dir)
                                for name in (vae_name, unet_name, weights_name))),)


class AtelierTVTUpscale:
    DESCRIPTION = ("TVT Upscale: ×4 super-resolution of real-world photos in one UNet step on TVT's 4× VAE "
                   "latents, with the authors' colour fix. Large inputs run the UNet on the authors' Gaussian-"
                   "blended latent tiles and the VAE in tiles, so memory stays bounded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The image, 4× wider and taller (less what makes its sides multiples of 8).",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "tvt": ("ATELIER_TVT", {"tooltip": "From Load TVT."}),
            "clip": ("CLIP", {"tooltip": "SD2.1-base's CLIP (from Load Checkpoint), for the prompt."}),
            "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
            "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                                  "tooltip": "The authors prepend the RAM tagger's tags (e.g. 'building, sky, ') to "
                                             "this; write them yourself, or leave it as is."}),
            "tile": ("INT", {"default": TVT_TILE, "min": 16, "max": 512, "step": 8,
                             "tooltip": "UNet tile side in latent pixels (a quarter of the output's); a latent no "
                                        "larger than one tile runs whole, as the authors' inference.py runs "
                                        "every image (inputs up to 192 px at the default)."}),
            "overlap": ("INT", {"default": TVT_OVERLAP, "min": 0, "max": 256, "step": 8,
                                "tooltip": "Overlap between UNet tiles, in latent pixels."}),
            "vae_tile": ("INT", {"default": TVT_VAE_TILE, "min": 256, "max": 4096, "step": 64,
                                 "tooltip": "Images up to this side (output pixels) run the VAE whole; larger "
                                            "ones in tiles of it."}),
            "colour_fix": ("BOOLEAN", {"default": True, "tooltip": "The authors' AdaIN colour fix against the "
                                                                   "bicubic upscale."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile: int | None = None, overlap: int | None = None) -> bool | str:
        if tile is not None and overlap is not None and overlap >= tile:
            return f"overlap ({overlap}) must be smaller than tile ({tile})"
        return True

    def upscale(self, tvt: TVTModel, clip: object, image: torch.Tensor, prompt: str, tile: int, overlap: int,
                vae_tile: int, colour_fix: bool) -> tuple[torch.Tensor]:
        states = text_conditioning(clip, prompt).embeds
        width = tvt.unet.config.cross_attention_dim
        if states.shape[-1] != width:
            raise ValueError(f"TVT needs SD2.1-base's text encoder ({width}-wide states); this CLIP gives "
                             f"{states.shape[-1]}-wide ones")
        high = tvt_upscale_image(tvt, states, to_channels_first(image), tile, overlap, vae_tile, colour_fix)
        return (to_channels_last(high),)


NODE_CLASS_MAPPINGS = {"AtelierLoadAdcSR": AtelierLoadAdcSR, "AtelierAdcSRUpscale": AtelierAdcSRUpscale,
                       "AtelierLoadTVT": AtelierLoadTVT, "AtelierTVTUpscale": AtelierTVTUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierLoadAdcSR": "Load AdcSR (Atelier)",
                              "AtelierAdcSRUpscale": "AdcSR Upscale (Atelier)",
                              "AtelierLoadTVT": "Load TVT (Atelier)", "AtelierTVTUpscale": "TVT Upscale (Atelier)"}
