"""Few-step model nodes: each published model with the loader and sampler its authors run it with, in either host.

The outputs are the custom-sampling sockets (MODEL, SAMPLER, SIGMAS and the guidance scale), for ComfyUI's
SamplerCustom: inside ComfyUI they are ComfyUI's own objects, standalone Atelier's.
"""

from __future__ import annotations

from typing import Any

from ..models.comfy_adapters import model_family, model_with_lora, noise_schedule
from ..models.formats import check_safetensors
from ..models.lora import MAX_STRENGTH
from ..models.refs import ModelsFolder
from ..models.sources import list_models, resolve_model_path
from ..sampling.k_samplers import Sampler, sample_tcd
from ..sampling.schedules import TCD_ORIGINAL_STEPS
from .hypersd import (AUTO_PRESET, HYPER_SD_PRESETS, check_lora_family, hyper_sd_sigmas, preset_name_for_file)

CATEGORY = "atelier/fewstep"
LORA_FOLDER = "loras"


class AtelierHyperSD(ModelsFolder):
    DESCRIPTION = ("Hyper-SD (ByteDance): applies one of its published LoRAs (Hyper-SD15-… or Hyper-SDXL-…, in "
                   "models/loras) and gives the sampler, noise levels and guidance scale its model card runs that "
                   "LoRA with, for SamplerCustom: DDIM on trailing timesteps for the N-step LoRAs (cfg 5 for the "
                   "CFG ones, else none), TCD with eta 1 for the 1-step unified LoRA. The preset comes from the "
                   "file's published name.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "SAMPLER", "SIGMAS", "FLOAT")
    RETURN_NAMES = ("MODEL", "SAMPLER", "SIGMAS", "cfg")
    OUTPUT_TOOLTIPS = ("The model with the Hyper-SD LoRA.",
                       "The preset's sampler (DDIM or TCD), for SamplerCustom.",
                       "The preset's noise levels, for SamplerCustom.",
                       "The preset's guidance scale, for SamplerCustom's cfg (1 = no guidance).")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5- or SDXL-family model, matching the LoRA."}),
            "lora_name": (list_models(LORA_FOLDER, cls.models_dir), {
                "tooltip": "A Hyper-SD LoRA in models/loras, e.g. Hyper-SD15-8steps-CFG-lora.safetensors."}),
            "preset": ([AUTO_PRESET, *HYPER_SD_PRESETS], {
                "tooltip": "auto: from the file's published name; or the LoRA the file is, when it was renamed."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
                                         "round": 0.001, "tooltip": "The LoRA's strength; the card uses 1."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": TCD_ORIGINAL_STEPS, "step": 1,
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


NODE_CLASS_MAPPINGS = {"AtelierHyperSD": AtelierHyperSD}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierHyperSD": "Hyper-SD LoRA + Preset"}
