"""The seamless-tiling nodes: a MODEL → MODEL patch that the user's own KSampler runs, and a VAE decode with wrapped
context and a tiled preview (``interop.md`` §4). See :mod:`.tiling`."""

from __future__ import annotations

from typing import Any

from ..common.images import to_channels_last
from ..models.comfy_adapters import model_family, vae_decoder
from ..models.refs import ModelRef
from ..sampling.latents import latent_samples
from ..sampling.patches import patch_model
from .tiling import AXES, DEFAULT_CONTEXT, DEFAULT_START_FRACTION, SeamlessTiling, seamless_decode, tile_grid

CATEGORY = "atelier/creative"
MAX_NATIVE_SIZE = 1024
# Inside ComfyUI the UNet does not say its training size: SDXL's latent side is 128 (1024 px), SD1's and SD2's 64
# (512 px; SD2-768 users set 96)
COMFY_NATIVE_SIZES = {"sdxl": 128}
COMFY_DEFAULT_NATIVE_SIZE = 64
AXES_TOOLTIP = "both: a texture that tiles in every direction; x: left and right edges join; y: top and bottom."


class AtelierSeamlessTiling:
    DESCRIPTION = ("Seamless tiling (StableMaterials): a copy of the model whose convolutions wrap around the "
                   "latent's borders from a quarter of the steps on, so what it generates tiles with no seam; on a "
                   "latent at least twice the model's size its attention also runs on rolled patches of the "
                   "training size. Sample with your own KSampler, decode with Seamless VAE Decode.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with seamless tiling; the input model is unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample (an SD1, SD2 or SDXL UNet)."}),
            "start_fraction": ("FLOAT", {"default": DEFAULT_START_FRACTION, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "round": 0.01,
                                         "tooltip": "The convolutions wrap around from this fraction of the steps "
                                                    "on (the authors': 0.25, so the layout forms first; 1: never, "
                                                    "the plain model)."}),
            "axes": (list(AXES), {"default": "both", "tooltip": AXES_TOOLTIP}),
            "patched_attention": ("BOOLEAN", {"default": True,
                                              "tooltip": "On a latent at least twice the model's training size, "
                                                         "attention runs on rolled patches of that size."}),
            "native_size": ("INT", {"default": 0, "min": 0, "max": MAX_NATIVE_SIZE, "step": 8,
                                    "tooltip": "The model's training size in latent pixels (0: the model's own; "
                                               "inside ComfyUI 128 for SDXL, else 64)."}),
        }}

    def patch(self, model, start_fraction: float, axes: str, patched_attention: bool, native_size: int) -> tuple:
        if not native_size and not isinstance(model, ModelRef):
            native_size = COMFY_NATIVE_SIZES.get(model_family(model), COMFY_DEFAULT_NATIVE_SIZE)
        return (patch_model(model, SeamlessTiling(start_fraction, axes, patched_attention, native_size or None)),)


class AtelierSeamlessVAEDecode:
    DESCRIPTION = ("Decodes a latent made with Seamless Tiling so that its borders join: the decoder sees the "
                   "latent with wrapped-around context at every border (tiled 3x3 and cropped) and the middle is "
                   "kept. Also gives the image tiled 3x3, to check the seams.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "tiled_3x3")
    OUTPUT_TOOLTIPS = ("The decoded image, one tile.", "The image repeated 3 times along each tiled axis.")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode (from a KSampler on a Seamless Tiling model)."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "axes": (list(AXES), {"default": "both", "tooltip": AXES_TOOLTIP}),
            "context": ("FLOAT", {"default": DEFAULT_CONTEXT, "min": 0.0, "max": 1.0, "step": 0.125,
                                  "round": 0.001,
                                  "tooltip": "Wrapped-in latent at each border, as a fraction of the side (the "
                                             "authors' 0.125, enough at 512 px; small latents need more, up to 1: "
                                             "the whole 3x3 tiling, nine times the decoding)."}),
        }}

    def decode(self, samples: dict, vae: Any, axes: str, context: float = DEFAULT_CONTEXT) -> tuple:
        image = seamless_decode(vae_decoder(vae), latent_samples(samples), axes, context).cpu()
        return to_channels_last(image), to_channels_last(tile_grid(image, axes))


NODE_CLASS_MAPPINGS = {"AtelierSeamlessTiling": AtelierSeamlessTiling,
                       "AtelierSeamlessVAEDecode": AtelierSeamlessVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierSeamlessTiling": "Seamless Tiling",
                              "AtelierSeamlessVAEDecode": "Seamless VAE Decode"}
