"""NoiseShift nodes: calibrate a model's noise level at a resolution, and apply the table as a MODEL patch.

Calibrate takes clean latents at the target size (a VAE Encode of pictures of that size, or latents the model made
at its native size and scaled down) and the prompt they go with; Apply gives a MODEL whose every sampler, the user's
own KSampler included, evaluates the network at the shifted noise level. The table travels on the
``ATELIER_NOISESHIFT`` socket as a :class:`~.shift.NoiseShiftTable`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..common.comfy_host import inside_comfyui
from ..common.limits import MAX_SEED
from ..common.progress import progress
from ..models.comfy_adapters import denoiser_and_latent_space, model_device, model_family, noise_shift_table
from ..models.refs import ModelRef, SavedFilesFolder, SaveToFolder
from ..sampling.guidance import to_conditioning
from ..sampling.model_sampling import is_flow_sampling
from .shift import (DEFAULT_LEVELS, NoiseShiftTable, calibrate, denoiser_x0, load_table, log_grid,
                    nearest_training_sigma, save_table)

CATEGORY = "atelier/noiseshift"
TABLE_TYPE = "ATELIER_NOISESHIFT"
MIN_LEVELS, MAX_LEVELS = 2, 64
MAX_CALIBRATION_LATENTS = 64  # a batch of clean latents evaluated 30 times per level
TABLES_FOLDER = "noiseshift"


def _check_unshifted(model: Any) -> None:
    """Calibration measures the model itself: a table applied before (Atelier's ref, or ComfyUI's object patch of
    ``model_sampling``) would compound with the one being found."""
    if noise_shift_table(model) is not None:
        raise ValueError("this MODEL is NoiseShift-patched already: calibrate the model from before NoiseShift Apply")


class AtelierNoiseShiftCalibrate:
    DESCRIPTION = ("NoiseShift calibration: for noise levels across the model's range, finds the level to tell the "
                   "network so that its one-step denoising of your clean latents is best at their resolution (a "
                   "grid search, no training). Feed the table to NoiseShift Apply.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (TABLE_TYPE, "STRING")
    RETURN_NAMES = ("table", "report")
    OUTPUT_TOOLTIPS = ("The NoiseShift table of this model at this latent size.",
                       "Each calibrated noise level and the level the network is told instead.")
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate (before NoiseShift Apply)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt the clean latents go with (the empty prompt "
                                                     "serves too)."}),
            "latent": ("LATENT", {"tooltip": "Clean latents at the target resolution, e.g. VAE Encode of pictures of "
                                             "that size; 4 or more give a steadier table."}),
            "levels": ("INT", {"default": DEFAULT_LEVELS, "min": MIN_LEVELS, "max": MAX_LEVELS, "step": 1,
                               "tooltip": "Noise levels calibrated, log-spaced over the model's range; between "
                                          "them the shift is interpolated. Each costs 30 model calls per latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                             "tooltip": "Seeds the noise added to the clean latents."}),
        }}

    def calibrate(self, model, positive: list, latent: dict, levels: int, seed: int) -> tuple[NoiseShiftTable, str]:
        _check_unshifted(model)
        samples = latent["samples"]
        if samples.ndim != 4 or not 1 <= samples.shape[0] <= MAX_CALIBRATION_LATENTS:
            raise ValueError(f"latent must hold 1 to {MAX_CALIBRATION_LATENTS} latents (B, C, h, w); got shape "
                             f"{tuple(samples.shape)}")
        if not torch.isfinite(samples).all():
            raise ValueError("latent holds NaN or infinite values")
        conditioning = to_conditioning(positive, model_family(model), "positive")
        device = model_device(model)
        with denoiser_and_latent_space(model) as (denoiser, space):
            if samples.shape[1] != space.latent_channels:
                raise ValueError(f"this model's latents have {space.latent_channels} channels; the LATENT has "
                                 f"{samples.shape[1]}")
            clean = ((samples.float() - space.shift_factor) * space.scaling_factor).to(device)
            training = denoiser.schedule.ve_sigmas()
            snap = nearest_training_sigma(denoiser.schedule)
            sigmas = torch.tensor(sorted({snap(float(s)) for s in log_grid(float(training.min()),
                                                                           float(training.max()), levels)}),
                                  dtype=torch.float64)
            table = calibrate(denoiser_x0(denoiser, conditioning), clean, sigmas,
                              torch.Generator().manual_seed(seed), snap, progress)
        report = "\n".join(f"sigma {s:.4f} -> {t:.4f} (x{t / s:.3f})"
                           for s, t in zip(table.sigmas.tolist(), table.shifted.tolist()))
        return table, f"NoiseShift at latent {table.latent_size[0]}x{table.latent_size[1]}:\n{report}"


class AtelierNoiseShiftApply:
    DESCRIPTION = ("NoiseShift: a copy of the model that tells the network the calibrated noise level instead of the "
                   "sampler's, for sampling at the resolution the table was calibrated at. The sampler's schedule and "
                   "steps are unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with NoiseShift; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the table was calibrated on."}),
            "table": (TABLE_TYPE, {"tooltip": "From NoiseShift Calibrate; it replaces any table applied before."}),
        }}

    def apply(self, model, table: NoiseShiftTable) -> tuple:
        flow_refusal = ("NoiseShift's table recalibrates a diffusion model's own sigmas; this MODEL samples as a flow "
                        "or on other betas than its checkpoint's")
        if isinstance(model, ModelRef):
            if model.model_sampling_override is not None:
                raise ValueError(flow_refusal)
            return (dataclasses.replace(model, noise_shift=table),)
        if not inside_comfyui():
            raise TypeError(f"model must be Atelier's or ComfyUI's MODEL; got {type(model).__name__}")
        if is_flow_sampling(model.get_model_object("model_sampling")):
            raise ValueError(flow_refusal)
        patched = model.clone()
        patched.add_object_patch("model_sampling", table.model_sampling(model.get_model_object("model_sampling")))
        return (patched,)


class _TablesFolder(SavedFilesFolder):
    """Nodes that read or write NoiseShift tables: ``models_dir/noiseshift``, or ComfyUI's ``models/noiseshift``."""

    FOLDER, PURPOSE = TABLES_FOLDER, "NoiseShift tables"


class AtelierNoiseShiftSave(SaveToFolder, _TablesFolder):
    DESCRIPTION = ("Saves a NoiseShift table as a small .safetensors file in the models folder's noiseshift/, so "
                   "that a model is calibrated once per resolution; NoiseShift Load reads it back.")
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "table": (TABLE_TYPE, {"tooltip": "The table to save."}),
            "filename": ("STRING", {"default": "noiseshift", "tooltip": "The file name inside models/noiseshift "
                                                                          "(name it after the model and size); "
                                                                          ".safetensors is added when missing."}),
        }}

    def save(self, table: NoiseShiftTable, filename: str) -> dict:
        return self.saved(filename, lambda path: save_table(table, path))


class AtelierNoiseShiftLoad(_TablesFolder):
    DESCRIPTION = "Loads a NoiseShift table (.safetensors) from the models folder's noiseshift/."
    CATEGORY = CATEGORY
    RETURN_TYPES = (TABLE_TYPE,)
    RETURN_NAMES = ("table",)
    OUTPUT_TOOLTIPS = ("The table, as it was saved.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "table_name": (cls.saved_names(), {"tooltip": "A NoiseShift table in models/noiseshift."}),
        }}

    @classmethod
    def IS_CHANGED(cls, table_name: str) -> str:
        return cls.saved_digest(table_name)

    def load(self, table_name: str) -> tuple[NoiseShiftTable]:
        return (load_table(self.saved_path(table_name)),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (AtelierNoiseShiftCalibrate, AtelierNoiseShiftApply,
                                                     AtelierNoiseShiftSave, AtelierNoiseShiftLoad)}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierNoiseShiftCalibrate": "NoiseShift Calibrate",
                              "AtelierNoiseShiftApply": "NoiseShift Apply",
                              "AtelierNoiseShiftSave": "NoiseShift Save", "AtelierNoiseShiftLoad": "NoiseShift Load"}
