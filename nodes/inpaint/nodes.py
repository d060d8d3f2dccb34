"""The inpainting nodes: Preserve Unmasked, an inpainted picture composited back onto its original outside the mask
(IMAGE and MASK are plain tensors in both hosts; see :mod:`.preserve`), and Asymmetric VQGAN's published decoders,
which decode a latent conditioned on the masked original (an ``ASYM_VAE`` socket of our own in both hosts: neither
host's VAE decode knows the conditioning)."""

from __future__ import annotations

from typing import Any

import torch

from ..common.images import mask_batch, to_channels_first, to_channels_last
from ..models.loader import load_kept_asymmetric_vae
from ..models.refs import ModelsFolder
from ..models.sources import resolve_model_path
from ..models.vae import list_vaes
from ..sampling.latents import latent_samples
from .asymmetric import asymmetric_decode
from .preserve import DEFAULT_DILATE, DEFAULT_FEATHER, preserve_unmasked

CATEGORY = "atelier/inpaint"
MAX_DILATE, MAX_FEATHER = 256, 64.0
ASYM_VAE = "ASYM_VAE"


class AtelierPreserveUnmasked:
    DESCRIPTION = ("Keeps the unmasked region exactly as it was after inpainting (Asymmetric VQGAN's aim, without "
                   "its weights): the decoded picture is used inside the mask, grown by 'dilate' pixels and "
                   "feathered, and the original everywhere else, so the VAE's round trip changes nothing outside.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded picture inside the feathered mask, the original outside it.",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "decoded": ("IMAGE", {"tooltip": "The inpainted picture, after VAE Decode."}),
            "original": ("IMAGE", {"tooltip": "The picture before inpainting (batch 1 or the decoded batch)."}),
            "mask": ("MASK", {"tooltip": "1 where the picture was generated, at the pictures' size."}),
            "dilate": ("INT", {"default": DEFAULT_DILATE, "min": 0, "max": MAX_DILATE, "step": 1,
                               "tooltip": "Grow the mask by this many pixels first (8: one latent pixel of SD's "
                                          "VAE, whose decode bleeds past the mask's edge)."}),
            "feather": ("FLOAT", {"default": DEFAULT_FEATHER, "min": 0.0, "max": MAX_FEATHER, "step": 0.5,
                                  "round": 0.01,
                                  "tooltip": "Blur of the grown mask's edge (Gaussian σ, pixels; 0: a hard edge). "
                                             "Pixels farther than dilate + 3·feather from the mask stay the "
                                             "original exactly."}),
        }}

    def composite(self, decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, dilate: int,
                  feather: float) -> tuple:
        result = preserve_unmasked(to_channels_first(decoded, "decoded"), to_channels_first(original, "original"),
                                   mask_batch(mask).to(decoded.device), dilate, feather)
        return (to_channels_last(result),)


class AtelierAsymmetricVAELoader(ModelsFolder):
    DESCRIPTION = ("Loads one of Asymmetric VQGAN's published decoders (Zhu et al. 2023; x-1-5 or x-2, diffusers' "
                   "safetensors, for SD1.x and SD2.x latents) for Asymmetric VAE Decode, which keeps the unmasked "
                   "region of an inpainting nearly unchanged (the paper: an error of 2e-5 to 6e-5 there instead of "
                   "SD's 1e-2).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (ASYM_VAE,)
    RETURN_NAMES = ("asym_vae",)
    OUTPUT_TOOLTIPS = ("The asymmetric VAE, for Asymmetric VAE Decode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "vae_name": (list_vaes(cls.models_dir), {"tooltip": "The asymmetric VAE's diffusion_pytorch_model"
                                                                ".safetensors, renamed, in models/vae (for example "
                                                                "asymmetric-autoencoder-kl-x-1-5.safetensors)."}),
        }}

    def load(self, vae_name: str) -> tuple:
        return (load_kept_asymmetric_vae(resolve_model_path("vae", vae_name, self.models_dir)),)


class AtelierAsymmetricVAEDecode:
    DESCRIPTION = ("Decodes an inpainted latent with Asymmetric VQGAN's decoder, which also sees the original "
                   "picture outside the mask, so the kept region comes out nearly unchanged and the edit blends in.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded picture.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "asym_vae": (ASYM_VAE, {"tooltip": "From Asymmetric VAE Loader."}),
            "samples": ("LATENT", {"tooltip": "The inpainted latent (SD1.x or SD2.x)."}),
            "image": ("IMAGE", {"tooltip": "The original picture, at the latent's size times 8."}),
            "mask": ("MASK", {"tooltip": "1 where the picture was generated, at the picture's size (a soft mask "
                                         "is cut at 0.5, as diffusers' inpainting pipeline does)."}),
        }}

    def decode(self, asym_vae: Any, samples: dict, image: torch.Tensor, mask: torch.Tensor) -> tuple:
        latent = latent_samples(samples)
        pixels, weights = to_channels_first(image, "image")[:, :3], mask_batch(mask)
        size = tuple(8 * side for side in latent.shape[-2:])
        if pixels.shape[-2:] != size or weights.shape[-2:] != size:
            raise ValueError(f"image and mask must be {size[0]}x{size[1]}, the latent's size times 8; got "
                             f"{tuple(pixels.shape[-2:])} and {tuple(weights.shape[-2:])}")
        for name, batch in (("image", pixels.shape[0]), ("mask", weights.shape[0])):
            if batch not in (1, latent.shape[0]):
                raise ValueError(f"{name} must have batch 1 or the latent's {latent.shape[0]}; got {batch}")
        return (to_channels_last(asymmetric_decode(asym_vae, latent, pixels, weights).cpu()),)


NODE_CLASS_MAPPINGS = {"AtelierPreserveUnmasked": AtelierPreserveUnmasked,
                       "AtelierAsymmetricVAELoader": AtelierAsymmetricVAELoader,
                       "AtelierAsymmetricVAEDecode": AtelierAsymmetricVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierPreserveUnmasked": "Preserve Unmasked",
                              "AtelierAsymmetricVAELoader": "Asymmetric VAE Loader",
                              "AtelierAsymmetricVAEDecode": "Asymmetric VAE Decode"}
