"""Few-step model nodes: each published model with the loader and sampler its authors run it with, in either host.

The outputs are the custom-sampling sockets (MODEL, SAMPLER, SIGMAS and the guidance scale), for ComfyUI's
SamplerCustom: inside ComfyUI they are ComfyUI's own objects, standalone Atelier's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..models.comfy_adapters import (model_family, model_network, model_with_lora, noise_schedule,
                                     noise_shift_table)
from ..models.formats import check_safetensors
from ..models.lora import MAX_STRENGTH
from ..models.refs import ModelRef, ModelsFolder
from ..models.sources import list_models, resolve_model_path
from ..sampling.ddim import trailing_timesteps
from ..sampling.k_samplers import Sampler, sample_tcd
from ..sampling.model_sampling import DiscreteModelSampling, RectifiedFlowSampling
from ..sampling.patches import patch_model
from ..sampling.schedules import TCD_ORIGINAL_STEPS, timestep_sigmas
from .hypersd import (AUTO_PRESET, HYPER_SD_PRESETS, HYPER_SDXL_UNET_TIMESTEP, check_lora_family, family_label,
                      hyper_sd_sigmas, preset_name_for_file)
from .koala import KOALA_LABELS, KOALA_PRESETS, koala_timesteps, koala_unet_of_model
from .rectified_diffusion import RECTIFIED_DIFFUSION_PRESETS, comfy_linear_beta_model, linear_beta_schedule
from .rectified_flow import RECTIFIED_FLOW_PRESETS, comfy_rectified_flow_model, rectified_flow_sigmas
from .speedupnet import SUN_STEPS, SpeedUpNetPatch, read_speedupnet, with_negative_tokens

CATEGORY = "atelier/fewstep"
MAX_PRESET_STEPS = 100  # the cards' settings go up to 25 (50 for KOALA-Lightning's demo); more only costs time
# TCD's grid has 50 timesteps; the DDIM presets take as many (their cards use 2 to 12)
MAX_HYPER_SD_STEPS = TCD_ORIGINAL_STEPS
LORA_FOLDER = "loras"
SPEEDUPNET_FOLDER = "speedupnet"


class _SamplingPreset:
    """What the preset nodes share: the custom-sampling sockets they give SamplerCustom."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "SAMPLER", "SIGMAS", "FLOAT")
    RETURN_NAMES = ("MODEL", "SAMPLER", "SIGMAS", "cfg")
    FUNCTION = "apply"


class AtelierHyperSD(_SamplingPreset, ModelsFolder):
    DESCRIPTION = ("Hyper-SD (ByteDance): applies one of its published LoRAs (Hyper-SD15-… or Hyper-SDXL-…, in "
                   "models/loras) and gives the sampler, noise levels and guidance scale its model card runs that "
                   "LoRA with, for SamplerCustom: DDIM on trailing timesteps for the N-step LoRAs (cfg 5 for the "
                   "CFG ones, else none), TCD with eta 1 for the 1-step unified LoRA. The preset comes from the "
                   "file's published name.")
    OUTPUT_TOOLTIPS = ("The model with the Hyper-SD LoRA.",
                       "The preset's sampler (DDIM or TCD), for SamplerCustom.",
                       "The preset's noise levels, for SamplerCustom.",
                       "The preset's guidance scale, for SamplerCustom's cfg (1 = no guidance).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5- or SDXL-family model, matching the LoRA."}),
            "lora_name": (list_models(LORA_FOLDER, cls.models_dir), {
                "tooltip": "A Hyper-SD LoRA in models/loras, e.g. Hyper-SD15-8steps-CFG-lora.safetensors."}),
            "preset": ([AUTO_PRESET, *HYPER_SD_PRESETS], {
                "tooltip": "auto: from the file's published name; or the LoRA the file is, when it was renamed "
                           "(a wrong choice cannot be told from the file: the N-step LoRAs share one layout)."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
                                         "round": 0.001, "tooltip": "The LoRA's strength; the card uses 1."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": MAX_HYPER_SD_STEPS, "step": 1,
                              "tooltip": "0: the preset's. The 1-step unified LoRA runs well at 1 to 8 steps."}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.001,
                              "tooltip": "TCD's gamma, for the 1-step unified LoRA only: 1 as the card; lower keeps "
                                         "more detail over several steps. 0 is DDIM."}),
        }}

    def apply(self, model: Any, lora_name: str, preset: str, strength_model: float, steps: int,
              eta: float) -> dict[str, Any]:
        path = resolve_model_path(LORA_FOLDER, lora_name, self.models_dir)
        check_safetensors(path)
        name = preset_name_for_file(path) if preset == AUTO_PRESET else preset
        chosen = HYPER_SD_PRESETS[name]
        check_lora_family(path, name, model_family(model))
        steps = steps or chosen.steps
        if chosen.sampler == "tcd":
            sampler = Sampler(sample_tcd, {"gamma": float(eta)}, name="tcd")
        else:
            sampler = Sampler.from_name("ddim")
        sigmas = hyper_sd_sigmas(noise_schedule(model), chosen.sampler, steps)
        summary = f"{name}: {chosen.describe(steps, eta)}"
        return {"ui": {"text": [summary]},
                "result": (model_with_lora(model, path, strength_model), sampler.for_host(), sigmas, chosen.cfg)}


class AtelierHyperSDXLUNet(_SamplingPreset):
    DESCRIPTION = ("Hyper-SD's SDXL 1-step UNet (Hyper-SDXL-1step-Unet.safetensors, loaded with Load Checkpoint + UNet "
                   "File beside SDXL, or the ComfyUI checkpoint version with Load Checkpoint) with its model card's "
                   "sampler for SamplerCustom: one LCM step from timestep 800, no guidance.")
    OUTPUT_TOOLTIPS = ("The model, unchanged.", "LCM, for SamplerCustom.",
                       "The timestep's noise level, then 0, for SamplerCustom.",
                       "1 (the card's guidance 0: none), for SamplerCustom's cfg.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "SDXL with Hyper-SDXL's 1-step UNet."}),
            "timestep": ("INT", {"default": HYPER_SDXL_UNET_TIMESTEP, "min": 1, "max": 999, "step": 1,
                                 "tooltip": "The training timestep the one step starts from: the card's 800."}),
        }}

    def apply(self, model: Any, timestep: int) -> tuple:
        family = model_family(model)
        if family != "sdxl":
            raise ValueError(f"Hyper-SDXL-1step-Unet is SDXL's UNet; this MODEL is {family_label(family)}")
        schedule = noise_schedule(model)
        if timestep >= schedule.num_train_timesteps:
            raise ValueError(f"timestep must be below this model's {schedule.num_train_timesteps} training timesteps; "
                             f"got {timestep}")
        sigmas = timestep_sigmas(schedule, torch.tensor([timestep]))
        return model, Sampler.from_name("lcm").for_host(), sigmas, 1.0


class AtelierRectifiedFlow(_SamplingPreset):
    DESCRIPTION = ("InstaFlow and 2-Rectified Flow (Liu et al., ICLR 2024): makes the MODEL sample as the rectified "
                   "flow its UNet was retrained to be, and gives the authors' sampler for SamplerCustom: Euler on "
                   "the flow from t = 1000, one step without guidance for InstaFlow-0.9B, 25 steps at guidance 1.5 "
                   "for 2-Rectified Flow. Load the published diffusers folder as the checkpoint (models/diffusers).")
    OUTPUT_TOOLTIPS = ("The model, sampling as a rectified flow.",
                       "Euler on the flow, for SamplerCustom.",
                       "The flow times 1 − i/steps, then 0, for SamplerCustom.",
                       "The model card's guidance scale, for SamplerCustom's cfg (1 = none).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "InstaFlow's or 2-Rectified Flow's UNet (their diffusers folder, loaded "
                                           "as a checkpoint): an SD1.5-family model retrained as a flow."}),
            "weights": (list(RECTIFIED_FLOW_PRESETS), {"tooltip": "Which published model it is: its steps and "
                                                                  "guidance."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": MAX_PRESET_STEPS, "step": 1,
                              "tooltip": "0: the model card's (1 for InstaFlow, 25 for 2-Rectified Flow, which "
                                         "also works at 2 to 8)."}),
        }}

    def apply(self, model: Any, weights: str, steps: int) -> tuple:
        family = model_family(model)
        if family != "sd1":
            raise ValueError(f"{weights} is an SD1.5-family UNet; this MODEL is {family_label(family)}: "
                             f"load the published diffusers folder as the checkpoint")
        if noise_shift_table(model) is not None:
            raise ValueError("this MODEL carries a NoiseShift table, calibrated on its diffusion sigmas: give this "
                             "node the model from before NoiseShift Apply")
        preset = RECTIFIED_FLOW_PRESETS[weights]
        if isinstance(model, ModelRef):
            flowing = dataclasses.replace(model, model_sampling_override=RectifiedFlowSampling())
        else:
            flowing = comfy_rectified_flow_model(model)
        sigmas = rectified_flow_sigmas(steps or preset.steps)
        return flowing, Sampler.from_name("euler").for_host(), sigmas, preset.cfg


class AtelierKOALA(_SamplingPreset):
    DESCRIPTION = ("KOALA (ETRI, 2024): SDXL distilled into a 700M or 1B UNet. Checks that the MODEL's UNet is the "
                   "chosen KOALA's and gives the authors' sampler for SamplerCustom: Euler on trailing timesteps, "
                   "10 steps at guidance 3.5 for the Lightning models; 25 steps at guidance 7.5 for KOALA-700M/1B, "
                   "on SDXL's Euler grid (their scheduler is assumed to be SDXL's). Load the published diffusers "
                   "folder as the checkpoint (models/diffusers).")
    OUTPUT_TOOLTIPS = ("The model, unchanged.", "Euler, for SamplerCustom.",
                       "The card's timesteps as noise levels, for SamplerCustom.",
                       "The card's guidance scale, for SamplerCustom's cfg.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "A KOALA model (its diffusers folder, loaded as a checkpoint)."}),
            "weights": (list(KOALA_PRESETS), {"tooltip": "Which published KOALA it is: its sampler settings."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": MAX_PRESET_STEPS, "step": 1,
                              "tooltip": "0: the card's (25, or 10 for the Lightning models, which run at 8 to 50)."}),
        }}

    def apply(self, model: Any, weights: str, steps: int) -> tuple:
        preset = KOALA_PRESETS[weights]
        found = koala_unet_of_model(model)
        if found != preset.unet:
            family = model_family(model)
            what = KOALA_LABELS[found] + "'s" if found else f"not a KOALA UNet ({family_label(family)})"
            raise ValueError(f"{weights} expects {KOALA_LABELS[preset.unet]}'s UNet; this MODEL's UNet is {what}")
        schedule = noise_schedule(model)
        sigmas = timestep_sigmas(schedule, koala_timesteps(preset, steps or preset.steps,
                                                           schedule.num_train_timesteps))
        return model, Sampler.from_name("euler").for_host(), sigmas, preset.cfg


class AtelierRectifiedDiffusion(_SamplingPreset):
    DESCRIPTION = ("Rectified Diffusion (Wang et al. 2024): its published UNets (rd, cm, phased for SD1.5; phasedxl "
                   "for SDXL), loaded with Load Checkpoint + UNet File beside their base checkpoint, with the "
                   "authors' sampler for SamplerCustom: DDIM on trailing timesteps; rd and cm sample on the linear "
                   "betas they were retrained on. rd 2 steps at guidance 1.5 (1 to 25 work), cm 2 steps without "
                   "guidance, the phased models 4 steps at 1.5.")
    OUTPUT_TOOLTIPS = ("The model, on the betas its UNet was trained on (linear for rd and cm).",
                       "DDIM (deterministic), for SamplerCustom.",
                       "The trailing timesteps' noise levels, then 0, for SamplerCustom.",
                       "The authors' guidance scale, for SamplerCustom's cfg (1 = none).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Rectified Diffusion UNet on its base model: Load Checkpoint + UNet "
                                           "File with SD1.5 and rd/cm/phased, or SDXL and phasedxl."}),
            "weights": (list(RECTIFIED_DIFFUSION_PRESETS), {"tooltip": "Which published UNet it is: its betas, "
                                                                       "steps and guidance."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": MAX_PRESET_STEPS, "step": 1,
                              "tooltip": "0: the preset's (2 for rd and cm, 4 for the phased models). rd was "
                                         "evaluated at 1 to 25, cm at 1 and 2."}),
        }}

    def apply(self, model: Any, weights: str, steps: int) -> tuple:
        preset = RECTIFIED_DIFFUSION_PRESETS[weights]
        family = model_family(model)
        if family != preset.family:
            raise ValueError(f"{weights} is a UNet for {family_label(preset.family)}; this MODEL is "
                             f"{family_label(family)}: load it beside an {family_label(preset.family)} checkpoint")
        replaced = (model.model_sampling_override if isinstance(model, ModelRef)
                    else model.object_patches.get("model_sampling"))
        if replaced is not None and getattr(replaced, "noise_shift", None) is None:
            raise ValueError("this MODEL samples on another schedule already (a rectified flow's, or Rectified "
                             "Diffusion's linear betas): give this node the model from the loader")
        schedule = noise_schedule(model)
        if preset.linear_betas:
            if noise_shift_table(model) is not None:
                raise ValueError("this MODEL carries a NoiseShift table, calibrated on its own betas: give this node "
                                 "the model from before NoiseShift Apply")
            schedule = linear_beta_schedule(schedule.prediction_type)
            if isinstance(model, ModelRef):
                model = dataclasses.replace(model,
                                            model_sampling_override=DiscreteModelSampling.from_noise_schedule(schedule))
            else:
                model = comfy_linear_beta_model(model)
        sigmas = timestep_sigmas(schedule, trailing_timesteps(steps or preset.steps, schedule.num_train_timesteps))
        return model, Sampler.from_name("ddim").for_host(), sigmas, preset.cfg


class AtelierSpeedUpNet(ModelsFolder):
    DESCRIPTION = ("SpeedUpNet (Chai et al., ECCV 2024): its published adapter (models/speedupnet) on an SD1.5-family "
                   "MODEL, which carries the negative prompt's effect into the cross-attention, with the authors' "
                   "sampler for SamplerCustom: DPM-Solver++(2M) on trailing timesteps, 4 steps, no guidance. Give "
                   "SamplerCustom this node's positive (the prompt with the negative's tokens appended).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "SAMPLER", "SIGMAS", "FLOAT")
    RETURN_NAMES = ("MODEL", "positive", "SAMPLER", "SIGMAS", "cfg")
    OUTPUT_TOOLTIPS = ("The model with SUN's processors in its cross-attention while it samples.",
                       "The prompt with the negative prompt's 77 tokens appended, for SamplerCustom's positive.",
                       "DPM-Solver++(2M), for SamplerCustom.",
                       "The trailing timesteps' noise levels, then 0, for SamplerCustom.",
                       "1 (no guidance: the adapter carries the negative prompt), for SamplerCustom's cfg.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5-family model (the adapter was trained on SD1.5 and plugs into "
                                           "its fine-tunes)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (one chunk: at most 75 tokens)."}),
            "adapter_name": (list_models(SPEEDUPNET_FOLDER, cls.models_dir), {
                "tooltip": "The adapter in models/speedupnet: sun_adapter_sdv15_4step_addpos.safetensors."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": MAX_PRESET_STEPS, "step": 1,
                              "tooltip": "0: the authors' 4."}),
        }}

    def apply(self, model: Any, positive: list, negative: list, adapter_name: str, steps: int) -> tuple:
        family = model_family(model)
        if family != "sd1":
            raise ValueError(f"SpeedUpNet's adapter is for SD1.5-family models; this MODEL is {family_label(family)}")
        path = resolve_model_path(SPEEDUPNET_FOLDER, adapter_name, self.models_dir)
        check_safetensors(path)
        patch = SpeedUpNetPatch(path, read_speedupnet(path, model_network(model)))
        schedule = noise_schedule(model)
        sigmas = timestep_sigmas(schedule, trailing_timesteps(steps or SUN_STEPS, schedule.num_train_timesteps))
        return (patch_model(model, patch), with_negative_tokens(positive, negative),
                Sampler.from_name("dpmpp_2m").for_host(), sigmas, 1.0)


NODE_CLASS_MAPPINGS = {"AtelierHyperSD": AtelierHyperSD, "AtelierHyperSDXLUNet": AtelierHyperSDXLUNet,
                       "AtelierRectifiedFlow": AtelierRectifiedFlow, "AtelierKOALA": AtelierKOALA,
                       "AtelierRectifiedDiffusion": AtelierRectifiedDiffusion, "AtelierSpeedUpNet": AtelierSpeedUpNet}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierHyperSD": "Hyper-SD LoRA + Preset",
                              "AtelierHyperSDXLUNet": "Hyper-SDXL 1-Step UNet Preset",
                              "AtelierRectifiedFlow": "InstaFlow / Rectified Flow Sampling",
                              "AtelierKOALA": "KOALA Preset",
                              "AtelierRectifiedDiffusion": "Rectified Diffusion Preset",
                              "AtelierSpeedUpNet": "SpeedUpNet Adapter + Preset"}
