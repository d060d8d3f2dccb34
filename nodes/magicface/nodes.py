"""The MagicFace nodes: references (image, mask, prompt, concept word) chained on a ``MAGICFACE_REFS`` socket of our
own, and a sampler that runs them with the prompt on either host's MODEL and VAE (``interop.md`` §3). See
:mod:`.attention`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..common.images import mask_batch, single_image
from ..common.limits import MAX_CFG, MAX_SEED, MAX_STEPS
from ..models.comfy_adapters import (denoiser_and_codec, denoiser_network, model_device, model_family,
                                     refuse_attention_patches)
from ..sampling.generate import with_image_size
from ..sampling.guidance import to_conditioning
from ..sampling.latents import latent_samples
from ..sampling.noise import prepare_noise
from ..sampling.previews import progress_reporter
from .attention import (CA_SCALE_ONE, CA_SCALE_SEVERAL, DEFAULT_CFG, DEFAULT_INJECT_STEP, DEFAULT_MASK_WEIGHT,
                        DEFAULT_STEPS, MagicFaceAttention, parse_layers)
from .sampler import magicface_sample

CATEGORY = "atelier/creative"
MAGICFACE_REFS = "MAGICFACE_REFS"
MAX_REFERENCES = 8
MAX_TOKEN_INDEX = 1023  # a long (LongAlign) prompt's tokens
MAX_MASK_WEIGHT = 20.0
DEFAULT_TOKEN_INDEX = 2  # the official example's: "a woman ..." → [start, a, woman]


@dataclasses.dataclass(frozen=True)
class MagicFaceReference:
    """One concept: its picture (1, 3, H, W), mask (1, 1, H, W), prompt as it arrived, concept word's position."""

    image: torch.Tensor
    mask: torch.Tensor
    prompt: Any
    token_index: int
    mask_weight: float


class AtelierMagicFaceReference:
    DESCRIPTION = ("A MagicFace reference: a picture of one concept (a face, a hat, a texture), the mask of where "
                   "it is in that picture, a short prompt for it and the position of its word in the sampler's "
                   "prompt. Chain several for several concepts.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MAGICFACE_REFS,)
    RETURN_NAMES = ("references",)
    OUTPUT_TOOLTIPS = ("The references so far, for MagicFace Sampler or another MagicFace Reference.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The concept's picture (one RGB image; resized to the sampled size)."}),
            "mask": ("MASK", {"tooltip": "1 where the concept is in the picture (the authors cut it with "
                                         "Grounded-SAM); the target may borrow only from there."}),
            "prompt": ("CONDITIONING", {"tooltip": "The reference's own prompt, e.g. 'a woman' (the authors'); an "
                                                   "empty prompt is their 'null reference prompt' option."}),
            "token_index": ("INT", {"default": DEFAULT_TOKEN_INDEX, "min": 1, "max": MAX_TOKEN_INDEX, "step": 1,
                                    "tooltip": "Where the concept's word is in the sampler's prompt: 1 for the first "
                                               "word (0 is the start token; a word CLIP splits takes several)."}),
            "mask_weight": ("FLOAT", {"default": DEFAULT_MASK_WEIGHT, "min": 0.1, "max": MAX_MASK_WEIGHT,
                                      "step": 0.1, "round": 0.01,
                                      "tooltip": "Attention bonus toward the reference's masked pixels (the "
                                                 "authors': 3; more copies more of it)."}),
        }, "optional": {
            "references": (MAGICFACE_REFS, {"tooltip": "References to add this one to."}),
        }}

    def add(self, image: torch.Tensor, mask: torch.Tensor, prompt: Any, token_index: int, mask_weight: float,
            references: tuple = ()) -> tuple[tuple]:
        pixels, weights = single_image(image, "image"), mask_batch(mask)[:1]
        if weights.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask must be the image's size {tuple(pixels.shape[-2:])}; got "
                             f"{tuple(weights.shape[-2:])}")
        if not bool((weights > 0.5).any()):
            raise ValueError("mask is empty: it must mark where the concept is in the image")
        if len(references) >= MAX_REFERENCES:
            raise ValueError(f"at most {MAX_REFERENCES} references (each adds two UNet passes per step)")
        reference = MagicFaceReference(pixels.clone(), weights.clone(), prompt, token_index, mask_weight)
        return (tuple(references) + (reference,),)


class AtelierMagicFaceSampler:
    DESCRIPTION = ("MagicFace (Wang et al. 2024): personalises a picture with reference concepts, without training. "
                   "While the layout forms, the prompt's picture attends to the references' masked pixels; then each "
                   "concept's region, found from the prompt word's attention, borrows from its own reference only; "
                   "guidance is adapted per region. Official settings: DDIM 50 steps, CFG 7.5, switch after step 20.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("The personalised latents; decode with VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (SD1 or SD2; the authors use SD 2.1 base)."}),
            "vae": ("VAE", {"tooltip": "The model's VAE (encodes the references)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, with each reference's concept word at its "
                                                     "token_index."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (the references' too)."}),
            "references": (MAGICFACE_REFS, {"tooltip": "From MagicFace Reference nodes."}),
            "latent_image": ("LATENT", {"tooltip": "Its size and batch (each sampled from fresh noise, as the "
                                                   "authors do)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                             "tooltip": "Seed of the starting noise and of the references' re-noising."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": MAX_STEPS, "step": 1,
                              "tooltip": "DDIM steps (the authors': 50)."}),
            "cfg": ("FLOAT", {"default": DEFAULT_CFG, "min": 1.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance scale (the authors': 7.5)."}),
            "inject_step": ("INT", {"default": DEFAULT_INJECT_STEP, "min": 0, "max": MAX_STEPS, "step": 1,
                                    "tooltip": "Reference self-attention up to this step, region-bound attention "
                                               "after it (the authors': 20 of 50)."}),
            "layers": ("STRING", {"default": "auto",
                                  "tooltip": "Transformer blocks (counted from 0 in the order they run) that "
                                             "borrow from the references, e.g. '10-15'; auto: the decoder's two "
                                             "highest resolutions (10-15 on SD1/SD2, the authors')."}),
            "ca_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                                   "tooltip": "Weakens the other words' attention when finding each concept's "
                                              f"region; 0: the authors' ({CA_SCALE_ONE} for one reference, "
                                              f"{CA_SCALE_SEVERAL} for several)."}),
            "adaptive_guidance": ("BOOLEAN", {"default": True,
                                              "tooltip": "Scale guidance per region by the foreground's over the "
                                                         "region's strength (the authors' default)."}),
        }}

    def sample(self, model: Any, vae: Any, positive: list, negative: list, references: tuple, latent_image: dict,
               seed: int, steps: int, cfg: float, inject_step: int, layers: str, ca_scale: float,
               adaptive_guidance: bool) -> tuple[dict]:
        if not references:
            raise ValueError("references: connect at least one MagicFace Reference")
        refuse_attention_patches(model, "MagicFace Sampler")
        layer_set = parse_layers(layers)
        latents = latent_samples(latent_image)
        family = model_family(model)
        ca_scale = ca_scale or (CA_SCALE_ONE if len(references) == 1 else CA_SCALE_SEVERAL)
        device = model_device(model)
        with denoiser_and_codec(model, vae) as (denoiser, codec):
            height, width = (side * codec.downscale for side in latents.shape[-2:])
            prompts = [with_image_size(to_conditioning(conditioning, family, name), height, width)
                       for conditioning, name in ((positive, "positive"), (negative, "negative"))]
            reference_prompts = [with_image_size(to_conditioning(reference.prompt, family, "reference prompt"),
                                                 height, width) for reference in references]
            _check_prompts(prompts[0], prompts[1], reference_prompts, references)
            pixels = torch.cat([_resized(reference.image, (height, width), "bilinear") for reference in references])
            masks = torch.cat([_resized(reference.mask, (height, width), "nearest") for reference in references])
            clean = ((codec.encode(pixels.to(codec.device)) - codec.shift_factor) * codec.scaling_factor).to(device)
            attention = MagicFaceAttention(masks[:, 0], [reference.mask_weight for reference in references],
                                           [reference.token_index for reference in references], layer_set,
                                           inject_step, ca_scale)
            noise = prepare_noise(latents, seed).to(device)
            generator = torch.Generator().manual_seed(seed)
            sampled = [magicface_sample(denoiser, denoiser_network(denoiser), noise[index:index + 1],
                                        clean, *prompts, reference_prompts, attention, generator, steps,
                                        cfg, adaptive_guidance, progress_reporter(family))
                       for index in range(latents.shape[0])]
        samples = torch.cat(sampled) / codec.scaling_factor + codec.shift_factor
        return ({"samples": samples.cpu()},)


def _check_prompts(positive: Any, negative: Any, reference_prompts: list, references: tuple) -> None:
    """One prompt length for all (the regions are read per token position) and every concept word inside it."""
    length = positive.embeds.shape[1]
    lengths = {length, negative.embeds.shape[1], *(prompt.embeds.shape[1] for prompt in reference_prompts)}
    if len(lengths) > 1:
        raise ValueError(f"MagicFace needs the prompt, the negative and the references' prompts of one length (77 "
                         f"tokens: one chunk each); got lengths {sorted(lengths)}")
    for reference in references:
        if reference.token_index >= length:
            raise ValueError(f"token_index {reference.token_index} is beyond the prompt's {length} tokens")


def _resized(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, C, H, W) at ``size``: bilinear with antialiasing for pictures, nearest for masks."""
    if tuple(image.shape[-2:]) == size:
        return image.float()
    if mode == "nearest":
        return F.interpolate(image.float(), size=size, mode="nearest")
    return F.interpolate(image.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)


NODE_CLASS_MAPPINGS = {"AtelierMagicFaceReference": AtelierMagicFaceReference,
                       "AtelierMagicFaceSampler": AtelierMagicFaceSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierMagicFaceReference": "MagicFace Reference",
                              "AtelierMagicFaceSampler": "MagicFace Sampler"}
