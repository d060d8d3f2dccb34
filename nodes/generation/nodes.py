"""Atelier's own generation nodes: LongAlign prompt encoding and a sampler with what ComfyUI's KSampler lacks.

They speak ComfyUI's sockets (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE) and carry Atelier's objects on them,
as the standalone app's core nodes do (``web/nodes_*.py``: CheckpointLoaderSimple, CLIPTextEncode, KSampler, ...):
MODEL a :class:`~nodes.models.refs.ModelRef`, CLIP a :class:`~nodes.models.clip.Clip`, VAE a
:class:`~nodes.common.denoiser.DiffusersCodec`, CONDITIONING ComfyUI's list of ``[embeds, options]``.
Checkpoints, latents and the VAE go through ComfyUI's core nodes. The sampler offers what ComfyUI's KSampler does
not: diffusers' TCD, the heavy-ball momentum samplers (HB, GHVB, HB-DPM++2M) and the truncated F-scheduler.
Inside ComfyUI the same nodes take ComfyUI's CLIP and MODEL (an SD1 or SD2 model), through the adapters of
``nodes/models/comfy_adapters.py``.

The momentum samplers and the F-scheduler also come as a SAMPLER and SIGMAS for the custom-sampling nodes, in the
objects of the host that runs them: inside ComfyUI, a ``comfy.samplers.KSAMPLER`` and sigmas from its MODEL's
``model_sampling``.
"""

from __future__ import annotations

import torch

from ..common.checks import range_errors
from ..common.limits import MAX_CFG, MAX_SEED, MAX_STEPS
from ..models.clip import Clip
from ..models.comfy_adapters import (comfy_prompt_conditioning, denoiser_and_latent_space, model_device, model_family,
                                     noise_schedule)
from ..models.text import ENCODINGS, LONGALIGN_TOKENS, encode_prompt
from ..sampling.generate import generate
from ..sampling.guidance import from_conditioning, to_conditioning
from ..sampling.latents import INITIAL_NOISE_KEY
from ..sampling.samplers import (MOMENTUM_DEFAULTS, MOMENTUM_RANGES, SAMPLERS, SCHEDULERS, check_momentum,
                                 check_sampler_settings, momentum_sampler)
from ..sampling.schedules import F_SCHEDULER_STEPS, f_scheduler_schedule

CATEGORY = "atelier/generation"
MAX_MOMENTUM = max(high for _, high in MOMENTUM_RANGES.values())


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

    def encode(self, clip, text: str, encoding: str) -> tuple[list]:
        if not isinstance(clip, Clip):  # ComfyUI's CLIP, inside ComfyUI
            return (comfy_prompt_conditioning(clip, text, encoding),)
        with clip.ref.in_use("text") as loaded:
            return (from_conditioning(encode_prompt(loaded.tokenizers, loaded.text_encoders, loaded.family, text,
                                                    max_tokens=LONGALIGN_TOKENS, encoding=encoding).to("cpu")),)


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

    def sample(self, model, positive: list, negative: list, latent_image: dict, seed: int, steps: int, cfg: float,
               sampler_name: str, scheduler: str, denoise: float, momentum: float) -> tuple[dict]:
        if "noise_mask" in latent_image:
            raise ValueError("AtelierSampler does not support a LATENT noise_mask (inpainting) yet; remove the "
                             "mask or use a latent without one")
        family = model_family(model)
        with denoiser_and_latent_space(model) as (denoiser, latent_space):
            positive, negative = (to_conditioning(c, family, name) for c, name in
                                  ((positive, "positive"), (negative, "negative")))
            latent = generate(denoiser, latent_space, family, positive, negative,
                              latent_image["samples"].to(model_device(model)), seed, steps, cfg, sampler_name,
                              scheduler, denoise, momentum or None, initial_noise=latent_image.get(INITIAL_NOISE_KEY))
        # The output is no longer at its starting noise: a later pass (hires fix) draws its own.
        kept = {key: value for key, value in latent_image.items() if key != INITIAL_NOISE_KEY}
        return ({**kept, "samples": latent.cpu()},)


class AtelierMomentumSampler:
    DESCRIPTION = ("Heavy-ball momentum samplers (Wizadwongsa et al., ICLR 2024), as a SAMPLER for SamplerCustom: "
                   "HB-PLMS, GHVB and HB-DPM++2M damp the divergence artifacts of few-step sampling at high "
                   "guidance. Inside ComfyUI it is ComfyUI's own SAMPLER, for its custom-sampling nodes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler, for SamplerCustom or SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "method": (list(MOMENTUM_RANGES), {
                "tooltip": "hb_plms: momentum on PLMS; ghvb: the generalised heavy ball (the paper's recommendation); "
                           "hb_dpmpp_2m: momentum on DPM-Solver++(2M)."}),
            "momentum": ("FLOAT", {"default": MOMENTUM_DEFAULTS["ghvb"], "min": 0.05, "max": MAX_MOMENTUM,
                                   "step": 0.05, "round": 0.001,
                                   "tooltip": "hb_plms and ghvb: the momentum number m, order ceil(m), beta "
                                              "m - ceil(m) + 1; 1 is DDIM. hb_dpmpp_2m: beta in (0, 1]; 1 is "
                                              f"DPM++2M. Defaults: {dict(MOMENTUM_DEFAULTS)}."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, method: str | None, momentum: float | None) -> bool | str:
        # Naming momentum switches off its built-in range check (ComfyUI's rule); check_momentum holds it and
        # hb_dpmpp_2m's narrower one. A linked value is checked when get_sampler runs.
        if method is None or momentum is None:
            return True
        try:
            check_momentum(method, momentum)
        except ValueError as error:
            return str(error)
        return True

    def get_sampler(self, method: str, momentum: float) -> tuple:
        return (momentum_sampler(method, momentum).for_host(),)


class AtelierFScheduler:
    DESCRIPTION = ("The F-scheduler's truncated schedule (\"Hyperparameters are all you need\"): 5, 6 or 8 steps that "
                   "stop at a small non-zero noise level, as SIGMAS for SamplerCustom, from the model's own training "
                   "schedule (Atelier's model, or ComfyUI's inside ComfyUI).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels, ending at the schedule's s_end.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose training schedule to truncate (SD1, SD2 or SDXL)."}),
            "steps": (list(F_SCHEDULER_STEPS), {"default": 8, "tooltip": "The paper's step counts."}),
        }}

    def get_sigmas(self, model, steps: int) -> tuple[torch.Tensor]:
        _, sigmas = f_scheduler_schedule(noise_schedule(model), int(steps), model_family(model))
        return (sigmas.float(),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (AtelierTextEncode, AtelierSampler, AtelierMomentumSampler,
                                                     AtelierFScheduler)}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierTextEncode": "Encode Long Prompt (LongAlign)",
                              "AtelierSampler": "Sampler (Atelier: HB, GHVB, TCD, F-scheduler)",
                              "AtelierMomentumSampler": "Momentum Sampler (HB, GHVB, HB-DPM++2M)",
                              "AtelierFScheduler": "F-Scheduler"}
