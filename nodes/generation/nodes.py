"""Atelier's own generation nodes: its checkpoint loader, LongAlign prompt encoding and its sampler.

They speak ComfyUI's sockets (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE) and carry Atelier's objects on them,
as the standalone app's core nodes do (``web/nodes_*.py``: CheckpointLoaderSimple, CLIPTextEncode, KSampler, ...):
MODEL a :class:`~nodes.models.refs.ModelRef`, CLIP a :class:`~nodes.models.clip.Clip`, VAE a
:class:`~nodes.common.denoiser.DiffusersCodec`, CONDITIONING ComfyUI's list of ``[embeds, options]``.
The sampler offers what ComfyUI's KSampler does not: diffusers' TCD and the heavy-ball momentum samplers (HB,
GHVB, HB-DPM++2M) and the truncated F-scheduler.
"""

from __future__ import annotations

import torch

from ..common.checks import range_errors
from ..common.denoiser import DiffusersCodec, DiffusersDenoiser
from ..common.limits import MAX_BATCH, MAX_CFG, MAX_RESOLUTION, MAX_SEED, MAX_STEPS
from ..common.tiled_vae import tiled_decode, tiled_encode
from ..models.clip import Clip
from ..models.loading import list_checkpoints, list_models, load_checkpoint, resolve_model_path
from ..models.lora import MAX_STRENGTH as MAX_LORA_STRENGTH
from ..models.lora import LoraSpec
from ..models.refs import ModelRef, ModelsFolder
from ..models.text import ENCODINGS, LONGALIGN_TOKENS, encode_prompt
from ..sampling.generate import generate
from ..sampling.guidance import from_conditioning, to_conditioning
from ..sampling.latents import INITIAL_NOISE_KEY, LATENT_UPSCALE_METHODS, empty_latent, upscale_latent
from ..sampling.samplers import MOMENTUM_DEFAULTS, MOMENTUM_RANGES, SAMPLERS, SCHEDULERS, check_sampler_settings

CATEGORY = "atelier/generation"
DEFAULT_TILE_PX, DEFAULT_OVERLAP_PX = 512, 64  # a 512 px tile decodes in about 1 GB on SD's VAE
PREDICTIONS = ("auto", "epsilon", "v_prediction")
MAX_MOMENTUM = max(high for _, high in MOMENTUM_RANGES.values())


class AtelierCheckpointLoader(ModelsFolder):
    DESCRIPTION = ("Loads a Stable Diffusion 1.x, 2.x or SDXL checkpoint (a .safetensors file or a diffusers folder) "
                   "fully offline, shared by every node that loads the same file.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The denoising UNet.", "The text encoder(s), for prompts.", "The VAE, for pixels.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "ckpt_name": (list_checkpoints(cls.models_dir), {
                "tooltip": "A checkpoint in models/checkpoints (.safetensors only), or a diffusers folder."}),
            "prediction": (list(PREDICTIONS), {
                "tooltip": "What the UNet predicts; 'auto' reads it from the file (SD2 768 models predict v)."}),
        }}

    def load(self, ckpt_name: str, prediction: str) -> tuple[ModelRef, Clip, DiffusersCodec]:
        model = ModelRef(load_checkpoint(ckpt_name, self.models_dir,
                                         prediction_type=None if prediction == "auto" else prediction))
        return model, Clip(model), DiffusersCodec(model.model.vae)


class AtelierLoraLoader(ModelsFolder):
    DESCRIPTION = ("Adds a LoRA to the model and the text encoder without reloading or changing the base weights: "
                   "it runs beside them as a separate branch, so switching or removing it is instant and exact.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA.", "The text encoder with the LoRA.")
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        strength = {"default": 1.0, "min": -MAX_LORA_STRENGTH, "max": MAX_LORA_STRENGTH, "step": 0.01, "round": 0.001}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to add the LoRA to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to add the LoRA to."}),
            "lora_name": (list_models("loras", cls.models_dir), {"tooltip": "A .safetensors LoRA in models/loras."}),
            "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly the LoRA changes the UNet; 0 is off."}),
            "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly it changes the text encoder."}),
        }}

    def add(self, model: ModelRef, clip: Clip, lora_name: str, strength_model: float,
            strength_clip: float) -> tuple[ModelRef, Clip]:
        path = resolve_model_path("loras", lora_name, self.models_dir)
        return (model.with_lora(LoraSpec(path, strength_model, 0.0)),
                clip.with_lora(LoraSpec(path, 0.0, strength_clip)))


class AtelierTextEncode:
    DESCRIPTION = ("Encodes a prompt. Prompts longer than CLIP's 77 tokens are encoded sentence by sentence "
                   "(LongAlign's segment-level encoding) instead of being cut off.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The encoded prompt, for the sampler's positive or negative input.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder of the checkpoint."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt; sentences end with '.' or '?'."}),
            "encoding": (list(ENCODINGS), {
                "tooltip": "auto: LongAlign only past 77 tokens; longalign: always, as the paper encodes the "
                           "negative of a long prompt, so both have the same length."}),
        }}

    def encode(self, clip: Clip, text: str, encoding: str) -> tuple[list]:
        with clip.ref.in_use() as loaded:
            return (from_conditioning(encode_prompt(loaded.tokenizers, loaded.text_encoders, loaded.family, text,
                                                    max_tokens=LONGALIGN_TOKENS, encoding=encoding).to("cpu")),)


def _size(default: int, tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 8, "max": MAX_RESOLUTION, "step": 8, "tooltip": tooltip})


class AtelierEmptyLatent:
    DESCRIPTION = "A blank latent canvas of the given size, for text-to-image."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros of shape (batch, 4, height / 8, width / 8).",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "width": _size(512, "Image width in pixels, a multiple of 8."),
            "height": _size(512, "Image height in pixels, a multiple of 8."),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "step": 1,
                                   "tooltip": "How many images to make at once."}),
        }}

    def make(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        return ({"samples": empty_latent(batch_size, 4, height, width)},)


class AtelierLatentUpscale:
    DESCRIPTION = "Resizes latents, for a second, higher-resolution sampling pass (hires fix)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The resized latents.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latents to resize."}),
            "upscale_method": (list(LATENT_UPSCALE_METHODS), {"tooltip": "The resampling filter."}),
            "width": _size(1024, "Target width in pixels, a multiple of 8."),
            "height": _size(1024, "Target height in pixels, a multiple of 8."),
        }}

    def upscale(self, samples: dict, upscale_method: str, width: int, height: int) -> tuple[dict]:
        return ({**samples, "samples": upscale_latent(samples["samples"], height // 8, width // 8, upscale_method)},)


class AtelierSampler:
    DESCRIPTION = ("Denoises latents with the model, guided by the positive prompt against the negative one. "
                   "Includes diffusers' samplers, heavy-ball momentum samplers (HB, GHVB) and the truncated "
                   "F-scheduler; denoise below 1 starts from the input latents (image-to-image).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latents.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to denoise with."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What it should not show."}),
            "latent_image": ("LATENT", {"tooltip": "An empty latent, or an encoded image for image-to-image."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "control_after_generate": True,
                             "tooltip": "The noise seed; the same seed and settings give the same image."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS, "step": 1,
                              "tooltip": "Denoising steps (the F-scheduler takes 5, 6 or 8)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale; 1 skips the negative pass."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "The solver."}),
            "scheduler": (list(SCHEDULERS), {"tooltip": "The noise levels the solver visits."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "round": 0.001,
                                  "tooltip": "1 for text-to-image; lower keeps more of the input latents."}),
            "momentum": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_MOMENTUM, "step": 0.05, "round": 0.001,
                                   "tooltip": "Momentum samplers only: m for hb_plms and ghvb, β for hb_dpmpp_2m; "
                                              f"0 takes the default {dict(MOMENTUM_DEFAULTS)}."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_name: str | None, scheduler: str | None, steps: int | None,
                        denoise: float | None, momentum: float | None) -> bool | str:
        # Naming these switches off their built-in checks (ComfyUI's rule): check_sampler_settings checks the
        # combos and the ranges that depend on each other, range_errors the widgets' own limits.
        required = cls.INPUT_TYPES()["required"]
        errors = range_errors({"steps": steps, "denoise": denoise, "momentum": momentum},
                              {name: (required[name][1]["min"], required[name][1]["max"])
                               for name in ("steps", "denoise", "momentum")})
        if errors:
            return "; ".join(errors)
        if None in (sampler_name, scheduler, steps, denoise, momentum):
            return True  # a linked setting: sample() checks the combination when it runs
        try:  # the family is not known before the model arrives; sample() checks it then
            check_sampler_settings(sampler_name, scheduler, steps, denoise=denoise, momentum=momentum or None)
        except ValueError as error:
            return str(error)
        return True

    def sample(self, model: ModelRef, positive: list, negative: list, latent_image: dict, seed: int,
               steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
               momentum: float) -> tuple[dict]:
        if "noise_mask" in latent_image:
            raise ValueError("AtelierSampler does not support a LATENT noise_mask (inpainting) yet; remove the "
                             "mask or use a latent without one")
        with model.in_use() as loaded:
            positive, negative = (to_conditioning(c, loaded.family, name) for c, name in
                                  ((positive, "positive"), (negative, "negative")))
            latent = generate(DiffusersDenoiser(loaded.unet, loaded.schedule), DiffusersCodec(loaded.vae),
                              loaded.family, positive, negative, latent_image["samples"].to(loaded.device), seed,
                              steps, cfg, sampler_name, scheduler, denoise, momentum or None,
                              initial_noise=latent_image.get(INITIAL_NOISE_KEY))
        # The output is no longer at its starting noise: a later pass (hires fix) draws its own.
        kept = {key: value for key, value in latent_image.items() if key != INITIAL_NOISE_KEY}
        return ({**kept, "samples": latent.cpu()},)


class _Tiling:
    """The VAE nodes' tiled mode: its inputs and the check that tiles overlap less than their own size."""

    @staticmethod
    def tiling_inputs() -> dict[str, tuple]:
        return {
            "tiled": ("BOOLEAN", {"default": False, "tooltip": "Work in tiles, so large images fit in memory."}),
            "tile_size": ("INT", {"default": DEFAULT_TILE_PX, "min": 64, "max": 4096, "step": 64,
                                  "tooltip": "Tile side in pixels (tiled mode)."}),
            "overlap": ("INT", {"default": DEFAULT_OVERLAP_PX, "min": 0, "max": 1024, "step": 8,
                                "tooltip": "How far tiles overlap, in pixels; overlaps are cross-faded."}),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int | None, overlap: int | None) -> bool | str:
        # Naming the inputs switches off their built-in min/max checks (ComfyUI's rule): check them here.
        limits = {name: (options["min"], options["max"]) for name, (_, options) in cls.tiling_inputs().items()
                  if name != "tiled"}
        errors = range_errors({"tile_size": tile_size, "overlap": overlap}, limits)
        if tile_size is not None and overlap is not None and overlap >= tile_size:
            errors.append(f"overlap must be smaller than tile_size; got {overlap} >= {tile_size}")
        return "; ".join(errors) or True


class AtelierVAEDecode(_Tiling):
    DESCRIPTION = ("Turns latents into images with the VAE; tiled mode decodes tile by tile, with the whole "
                   "image's normalisation statistics and cross-faded overlaps, so colours match and no seam shows.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latents to decode."}),
                             "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                             **cls.tiling_inputs()}}

    def decode(self, samples: dict, vae: DiffusersCodec, tiled: bool, tile_size: int, overlap: int
               ) -> tuple[torch.Tensor]:
        latent = samples["samples"]
        if tiled:
            image = tiled_decode(vae, latent, tile_size // vae.downscale, overlap // vae.downscale)
        else:
            image = vae.decode(latent)
        return (image.cpu().permute(0, 2, 3, 1),)


class AtelierVAEEncode(_Tiling):
    DESCRIPTION = ("Turns images into latents with the VAE, for image-to-image; tiled mode encodes tile by tile, "
                   "with the whole image's normalisation statistics.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The encoded latents.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {"pixels": ("IMAGE", {"tooltip": "The images to encode; sides must be multiples of 8."}),
                             "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                             **cls.tiling_inputs()}}

    def encode(self, pixels: torch.Tensor, vae: DiffusersCodec, tiled: bool, tile_size: int, overlap: int
               ) -> tuple[dict]:
        image = pixels.permute(0, 3, 1, 2)
        f = vae.downscale
        height, width = image.shape[-2] // f * f, image.shape[-1] // f * f
        if (height, width) != tuple(image.shape[-2:]):
            raise ValueError(f"image sides must be multiples of {f}; got {tuple(image.shape[-2:])} "
                             f"(scale or crop it to {height}×{width} first)")
        if tiled:
            latent = tiled_encode(vae, image, tile_size, overlap)
        else:
            latent = vae.encode(image)
        return ({"samples": latent.cpu()},)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    AtelierCheckpointLoader, AtelierLoraLoader, AtelierTextEncode, AtelierEmptyLatent, AtelierLatentUpscale,
    AtelierSampler, AtelierVAEDecode, AtelierVAEEncode)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierCheckpointLoader": "Load Checkpoint (Atelier)", "AtelierLoraLoader": "Load LoRA (Atelier)",
    "AtelierTextEncode": "Encode Prompt (Atelier)", "AtelierEmptyLatent": "Empty Latent (Atelier)",
    "AtelierLatentUpscale": "Upscale Latent (Atelier)", "AtelierSampler": "Sampler (Atelier)",
    "AtelierVAEDecode": "VAE Decode (Atelier)", "AtelierVAEEncode": "VAE Encode (Atelier)",
}
