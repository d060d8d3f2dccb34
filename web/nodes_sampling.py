"""ComfyUI's sampling nodes in the standalone app: KSampler, KSamplerAdvanced and the custom-sampling family.

They draw noise, choose sigmas and update latents exactly as ComfyUI does (``nodes.sampling``: ``noise``,
``sigmas``, ``k_samplers``), and guide Atelier's diffusers model with ComfyUI's CONDITIONING rules
(``nodes.sampling.guidance``), so that the same workflow, checkpoint and seed give ComfyUI's picture.
NOISE carries a :class:`RandomNoise`-made object, SAMPLER a :class:`~nodes.sampling.k_samplers.Sampler`, SIGMAS a
descending 1-D tensor and GUIDER a :class:`~nodes.sampling.guiders.Guider`.
"""

from __future__ import annotations

import dataclasses

import torch

from nodes.common.limits import MAX_CFG, MAX_SEED, MAX_STEPS
from nodes.models.refs import ModelRef
from nodes.sampling.guiders import Guider, model_sampling_of
from nodes.sampling.k_samplers import SAMPLER_NAMES, Sampler
from nodes.sampling.latents import INITIAL_NOISE_KEY, latent_samples
from nodes.sampling.noise import prepare_noise
from nodes.sampling.sigmas import SCHEDULER_NAMES, basic_scheduler_sigmas, exponential_sigmas, karras_sigmas, \
    ksampler_sigmas, sd_turbo_sigmas, split_sigmas, split_sigmas_denoise, step_range

SD_SIGMA_MAX, SD_SIGMA_MIN = 14.614642, 0.0291675  # SD1.x's σ range: ComfyUI's KarrasScheduler defaults


@dataclasses.dataclass(frozen=True)
class SeededNoise:
    """The NOISE socket: ComfyUI's ``Noise_RandomNoise`` (seeded Gaussian noise drawn on the CPU).

    A LATENT that carries its own starting noise (``INITIAL_NOISE_KEY``: the watermark's marked noise) starts from
    it instead; the seed still drives the step noise of ancestral and SDE samplers.
    """

    seed: int

    def generate_noise(self, latent: dict) -> torch.Tensor:
        samples = latent["samples"]
        carried = latent.get(INITIAL_NOISE_KEY)
        if carried is not None:
            if carried.shape != samples.shape:
                raise ValueError(f"the LATENT's {INITIAL_NOISE_KEY} has shape {tuple(carried.shape)}, its samples "
                                 f"{tuple(samples.shape)}")
            return carried.float().cpu()
        return prepare_noise(samples, self.seed, latent.get("batch_index"))


@dataclasses.dataclass(frozen=True)
class NoNoise:
    """The NOISE socket with noise disabled (ComfyUI's ``Noise_EmptyNoise``): sampling starts from the latent."""

    seed: int = 0

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return torch.zeros_like(latent["samples"], device="cpu")


def _seed(tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "control_after_generate": True,
                    "tooltip": tooltip})


def _steps(default: int = 20, tooltip: str = "The number of steps used in the denoising process.") -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 1, "max": MAX_STEPS, "step": 1, "tooltip": tooltip})


def _cfg() -> tuple[str, dict]:
    return ("FLOAT", {"default": 8.0, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                      "tooltip": "Classifier-free guidance: how strongly the prompt steers; 1 skips the negative."})


def _denoise(tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.001, "tooltip": tooltip})


def run_guider(guider: Guider, noise, sampler: Sampler, sigmas: torch.Tensor, latent: dict
               ) -> tuple[dict, dict]:
    """SamplerCustom(Advanced)'s run: the sampled LATENT and the last step's x̂₀ estimate as a LATENT."""
    samples = latent_samples(latent, "latent_image")
    last_denoised = {}

    def keep_last(step: dict) -> None:
        last_denoised["x0"] = step["denoised"]

    result = guider.sample(noise.generate_noise(latent), samples, sampler, sigmas,
                           denoise_mask=latent.get("noise_mask"), seed=noise.seed, callback=keep_last)
    out = _sampled(latent, result)
    denoised = out
    if "x0" in last_denoised:
        denoised = _sampled(latent, guider.unscale(last_denoised["x0"]))
    return out, denoised


def _sampled(latent: dict, samples: torch.Tensor) -> dict:
    """The output LATENT: sampled latents are no longer at their starting noise, so a later pass draws its own."""
    return {**{key: value for key, value in latent.items() if key != INITIAL_NOISE_KEY}, "samples": samples}


def common_ksampler(model: ModelRef, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: list, negative: list, latent: dict, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[dict]:
    """ComfyUI's KSampler and KSamplerAdvanced, on Atelier's model."""
    samples = latent_samples(latent, "latent_image")
    noise = NoNoise() if disable_noise else SeededNoise(seed)
    sigmas = ksampler_sigmas(model_sampling_of(model), scheduler, steps, denoise, sampler_name)
    if sigmas.numel():
        sigmas = step_range(sigmas, start_step, last_step, force_full_denoise)
    guider = Guider(model, {"positive": positive, "negative": negative}, cfg)
    result = guider.sample(noise.generate_noise(latent), samples, Sampler.from_name(sampler_name), sigmas,
                           denoise_mask=latent.get("noise_mask"), seed=seed)
    return (_sampled(latent, result),)


class KSampler:
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": _seed("The random seed used for creating the noise."),
            "steps": _steps(),
            "cfg": _cfg(),
            "sampler_name": (list(SAMPLER_NAMES), {"tooltip": "The algorithm used when sampling."}),
            "scheduler": (list(SCHEDULER_NAMES), {"tooltip": "How noise levels are spread over the steps."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": _denoise("The amount of denoising applied; below 1 keeps some of the input (img2img)."),
        }}

    def sample(self, model: ModelRef, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> tuple[dict]:
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise)


class KSamplerAdvanced:
    DESCRIPTION = ("KSampler over a range of its steps, with or without adding noise: for passes split between two "
                   "models (SDXL base then refiner).")
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent (with leftover noise if asked).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        step = {"min": 0, "max": MAX_STEPS, "step": 1}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising."}),
            "add_noise": (["enable", "disable"], {"tooltip": "Add the seeded noise first (disable to continue)."}),
            "noise_seed": _seed("The random seed used for creating the noise."),
            "steps": _steps(),
            "cfg": _cfg(),
            "sampler_name": (list(SAMPLER_NAMES), {"tooltip": "The algorithm used when sampling."}),
            "scheduler": (list(SCHEDULER_NAMES), {"tooltip": "How noise levels are spread over the steps."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "start_at_step": ("INT", {"default": 0, **step, "tooltip": "The first step to run."}),
            "end_at_step": ("INT", {"default": 10000, **step, "tooltip": "The step to stop at."}),
            "return_with_leftover_noise": (["disable", "enable"], {
                "tooltip": "enable: stop with the noise of end_at_step left in, for another sampler to finish."}),
        }}

    def sample(self, model: ModelRef, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, positive: list, negative: list, latent_image: dict, start_at_step: int,
               end_at_step: int, return_with_leftover_noise: str, denoise: float = 1.0) -> tuple[dict]:
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise, disable_noise=add_noise == "disable",
                               start_step=start_at_step, last_step=end_at_step,
                               force_full_denoise=return_with_leftover_noise != "enable")


class SamplerCustom:
    DESCRIPTION = "Samples with a SAMPLER and SIGMAS of your choice, guided by a positive and a negative prompt."
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    OUTPUT_TOOLTIPS = ("The sampled latent.", "The model's last estimate of the clean latent.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising."}),
            "add_noise": ("BOOLEAN", {"default": True, "tooltip": "Add the seeded noise first."}),
            "noise_seed": _seed("The random seed used for creating the noise."),
            "cfg": _cfg(),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
            "sampler": ("SAMPLER", {"tooltip": "From KSamplerSelect or another sampler node."}),
            "sigmas": ("SIGMAS", {"tooltip": "The noise levels, from a scheduler node."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
        }}

    def sample(self, model: ModelRef, add_noise: bool, noise_seed: int, cfg: float, positive: list, negative: list,
               sampler: Sampler, sigmas: torch.Tensor, latent_image: dict) -> tuple[dict, dict]:
        noise = SeededNoise(noise_seed) if add_noise else NoNoise()
        guider = Guider(model, {"positive": positive, "negative": negative}, cfg)
        return run_guider(guider, noise, sampler, sigmas, latent_image)


class SamplerCustomAdvanced:
    DESCRIPTION = "Samples with a NOISE, a GUIDER, a SAMPLER and SIGMAS, each chosen by its own node."
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    OUTPUT_TOOLTIPS = ("The sampled latent.", "The model's last estimate of the clean latent.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "noise": ("NOISE", {"tooltip": "From RandomNoise or DisableNoise."}),
            "guider": ("GUIDER", {"tooltip": "From CFGGuider or BasicGuider."}),
            "sampler": ("SAMPLER", {"tooltip": "From KSamplerSelect or another sampler node."}),
            "sigmas": ("SIGMAS", {"tooltip": "The noise levels, from a scheduler node."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
        }}

    def sample(self, noise, guider: Guider, sampler: Sampler, sigmas: torch.Tensor,
               latent_image: dict) -> tuple[dict, dict]:
        return run_guider(guider, noise, sampler, sigmas, latent_image)


class KSamplerSelect:
    DESCRIPTION = "A sampler by its ComfyUI name, for SamplerCustom(Advanced)."
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sampler_name": (list(SAMPLER_NAMES), {"tooltip": "The sampling algorithm."})}}

    def get_sampler(self, sampler_name: str) -> tuple[Sampler]:
        return (Sampler.from_name(sampler_name),)


class BasicScheduler:
    DESCRIPTION = "The noise levels of one of ComfyUI's schedulers for a model."
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels, descending, ending at 0.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose noise schedule to use."}),
            "scheduler": (list(SCHEDULER_NAMES), {"tooltip": "How noise levels are spread over the steps."}),
            "steps": _steps(),
            "denoise": _denoise("Below 1: only the last part of a longer schedule (img2img)."),
        }}

    def get_sigmas(self, model: ModelRef, scheduler: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return (basic_scheduler_sigmas(model_sampling_of(model), scheduler, steps, denoise),)


def _sigma(default: float, tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False,
                      "tooltip": tooltip})


class KarrasScheduler:
    DESCRIPTION = "Karras et al.'s noise levels (ρ-spaced between σ_max and σ_min), then 0."
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels, descending, ending at 0.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "steps": _steps(),
            "sigma_max": _sigma(SD_SIGMA_MAX, "The first noise level."),
            "sigma_min": _sigma(SD_SIGMA_MIN, "The last noise level before 0."),
            "rho": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": False,
                              "tooltip": "Higher spends more steps at low noise."}),
        }}

    def get_sigmas(self, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[torch.Tensor]:
        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler:
    DESCRIPTION = "Noise levels evenly spaced in log σ between σ_max and σ_min, then 0."
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels, descending, ending at 0.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"steps": _steps(), "sigma_max": _sigma(SD_SIGMA_MAX, "The first noise level."),
                             "sigma_min": _sigma(SD_SIGMA_MIN, "The last noise level before 0.")}}

    def get_sigmas(self, steps: int, sigma_max: float, sigma_min: float) -> tuple[torch.Tensor]:
        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class SDTurboScheduler:
    DESCRIPTION = "SD-Turbo's noise levels (timesteps 999, 899, ...): 1 to 10 steps."
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels, descending, ending at 0.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD-Turbo or SDXL-Turbo model."}),
            "steps": ("INT", {"default": 1, "min": 1, "max": 10, "step": 1, "tooltip": "The number of steps."}),
            "denoise": _denoise("Below 1 starts lower down the schedule (img2img)."),
        }}

    def get_sigmas(self, model: ModelRef, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return (sd_turbo_sigmas(model_sampling_of(model), steps, denoise),)


class SplitSigmas:
    DESCRIPTION = "Splits a schedule at a step: the two parts share the sigma at that step."
    CATEGORY = "sampling/custom_sampling/sigmas"
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    OUTPUT_TOOLTIPS = ("The schedule up to the step.", "The schedule from the step.")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sigmas": ("SIGMAS", {"tooltip": "The schedule to split."}),
                             "step": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "step": 1,
                                              "tooltip": "Where to split."})}}

    def get_sigmas(self, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return split_sigmas(sigmas, step)


class SplitSigmasDenoise:
    DESCRIPTION = "Splits a schedule so that the low part is the last 'denoise' fraction of its steps."
    CATEGORY = "sampling/custom_sampling/sigmas"
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    OUTPUT_TOOLTIPS = ("The schedule's first part.", "Its last 'denoise' fraction.")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sigmas": ("SIGMAS", {"tooltip": "The schedule to split."}),
                             "denoise": _denoise("The fraction of the steps that go to the low part.")}}

    def get_sigmas(self, sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
        return split_sigmas_denoise(sigmas, denoise)


class RandomNoise:
    DESCRIPTION = "Seeded Gaussian noise, drawn on the CPU as ComfyUI draws it (the same seed gives its picture)."
    CATEGORY = "sampling/custom_sampling/noise"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("NOISE",)
    OUTPUT_TOOLTIPS = ("The seeded noise.",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"noise_seed": _seed("The random seed used for creating the noise.")}}

    def get_noise(self, noise_seed: int) -> tuple[SeededNoise]:
        return (SeededNoise(noise_seed),)


class DisableNoise:
    DESCRIPTION = "No noise: sampling starts from the latent as it is."
    CATEGORY = "sampling/custom_sampling/noise"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("NOISE",)
    OUTPUT_TOOLTIPS = ("No noise.",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    def get_noise(self) -> tuple[NoNoise]:
        return (NoNoise(),)


class CFGGuider:
    DESCRIPTION = "Guides the model toward the positive and away from the negative conditioning, by cfg."
    CATEGORY = "sampling/custom_sampling/guiders"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("The guider.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The model used for denoising."}),
                             "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
                             "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
                             "cfg": _cfg()}}

    def get_guider(self, model: ModelRef, positive: list, negative: list, cfg: float) -> tuple[Guider]:
        return (Guider(model, {"positive": positive, "negative": negative}, cfg),)


class BasicGuider:
    DESCRIPTION = "Runs the model on one conditioning, without classifier-free guidance (for distilled models)."
    CATEGORY = "sampling/custom_sampling/guiders"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("The guider.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The model used for denoising."}),
                             "conditioning": ("CONDITIONING", {"tooltip": "What the image should show."})}}

    def get_guider(self, model: ModelRef, conditioning: list) -> tuple[Guider]:
        return (Guider(model, {"positive": conditioning}),)


NODE_CLASSES = (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced, KSamplerSelect, BasicScheduler,
                KarrasScheduler, ExponentialScheduler, SDTurboScheduler, SplitSigmas, SplitSigmasDenoise, RandomNoise,
                DisableNoise, CFGGuider, BasicGuider)
DISPLAY_NAMES = {"KSamplerAdvanced": "KSampler (Advanced)"}
