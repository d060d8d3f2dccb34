"""The GUIDER socket of the standalone app: a model with its prompts, sampled as ComfyUI samples.

:class:`Guider` is what ComfyUI's ``CFGGuider`` / ``BasicGuider`` give, over Atelier's diffusers-backed model:
``Guider(model, {"positive": ..., "negative": ...}, cfg).sample(noise, latent, sampler, sigmas, ...)`` scales the
latents into the model's space, resolves the CONDITIONING lists (:mod:`.guidance`), runs the sampler in the
k-diffusion convention and scales back. The KSampler nodes build one and call it; so can any technique.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable

import torch

from ..common.denoiser import DiffusersCodec, DiffusersDenoiser
from ..common.unet_split import DiffusersUNetCall
from ..models.loaded import LoadedModel
from ..models.refs import ModelRef
from .guidance import CONDITIONING_KINDS, add_inpaint_concat, classifier_free_guidance, mirror_areas, \
    resolve_conditioning
from .k_samplers import EVALUATIONS_PER_STEP, Sampler, prepare_mask, run_sampler
from .model_sampling import DiscreteModelSampling, RectifiedFlowSampling
from .patches import StepSchedule
from .previews import LATENT_RGB_MAPS, progress_reporter

logger = logging.getLogger(__name__)

INPAINT_UNET_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels


def model_sampling_of(model: ModelRef) -> DiscreteModelSampling | RectifiedFlowSampling:
    """The VE view (σ ↔ timestep, x̂₀ from the network's output) of a loaded model's training schedule, computed
    from its scheduler config as ComfyUI computes it (float64 betas), or the ref's override (a rectified flow's);
    with the ref's NoiseShift table, the network is evaluated at the shifted σ (``noise_shift.shifted_model_sampling``,
    set by NoiseShift Apply)."""
    loaded = model.model
    sampling = model.model_sampling_override
    if sampling is None:
        sampling = DiscreteModelSampling.from_scheduler_config(loaded.scheduler_config, loaded.schedule.prediction_type)
    return sampling if model.noise_shift is None else model.noise_shift.model_sampling(sampling)


def _preview_family(family: str) -> str:
    return family if family in LATENT_RGB_MAPS else "sdxl" if family.startswith("sdxl") else "sd1"


@dataclasses.dataclass
class Guider:
    """A model, its prompts by kind ("positive", optionally "negative"), and the guidance scale.

    ``cfg`` applies when a negative is present; a guider with a positive only (BasicGuider) returns its x̂₀.
    """

    model: ModelRef
    conds: dict[str, list]
    cfg: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.conds) - set(CONDITIONING_KINDS)
        if "positive" not in self.conds or unknown:
            raise ValueError(f"a guider takes a positive and optionally a negative conditioning; got "
                             f"{sorted(self.conds)}")

    def sample(self, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Sampler, sigmas: torch.Tensor, *,
               denoise_mask: torch.Tensor | None = None, seed: int | None = None, preview: bool = True,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Sampled latents, unscaled as a LATENT holds them.

        Args:
            noise: the starting noise (B, C, h, w) (zeros when noise is disabled), from the NOISE socket.
            latent_image: the LATENT's samples, unscaled (zeros for text-to-image).
            sampler: from the SAMPLER socket.
            sigmas: descending noise levels (the SIGMAS socket); an empty schedule returns ``latent_image``.
            denoise_mask: the LATENT's noise_mask; 1 where to paint, 0 where to keep the image.
            seed: seeds the step noise of ancestral and SDE samplers, as ComfyUI's ``extra_args["seed"]``.
            preview: report progress with a preview every step.
            callback: also called every step with the sampler's step dict (``"i"``, ``"x"``, ``"denoised"``, ...),
                latents scaled as the model sees them (:meth:`unscale` turns them into a LATENT's).
        """
        if sigmas.numel() == 0:
            return latent_image
        if noise.shape != latent_image.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and latent {tuple(latent_image.shape)} shapes differ")
        with self.model.in_use("unet", when_ready=True) as loaded:
            codec = DiffusersCodec(loaded.vae)
            if latent_image.shape[1] != codec.latent_channels:
                raise ValueError(f"this model's latents have {codec.latent_channels} channels; the LATENT has "
                                 f"{latent_image.shape[1]}")
            device = loaded.device
            model_sampling = model_sampling_of(self.model)
            latent = latent_image.to(device, torch.float32)
            if torch.count_nonzero(latent) > 0:  # ComfyUI leaves an empty latent as it is
                latent = (latent - codec.shift_factor) * codec.scaling_factor
            mask = None if denoise_mask is None else prepare_mask(denoise_mask, latent.shape).to(device)
            conds = {kind: resolve_conditioning(conditioning, kind, latent.shape, model_sampling,
                                                family=loaded.family, downscale=codec.downscale, device=device)
                     for kind, conditioning in self.conds.items()}
            if loaded.unet.config.in_channels == INPAINT_UNET_CHANNELS:
                add_inpaint_concat(conds, latent, mask)
            mirror_areas(conds)
            model_fn = self._bringing_in_loras(self._guided(loaded, model_sampling, conds, sigmas), sampler)
            report = progress_reporter(_preview_family(loaded.family)) if preview else None
            total = sigmas.numel() - 1

            def on_step(step: dict) -> None:
                if callback is not None:
                    callback(step)
                if report is not None:
                    report(step["i"] + 1, total, step["denoised"])

            samples = run_sampler(sampler, model_fn, model_sampling, sigmas.to(device), noise.to(device), latent,
                                  seed, denoise_mask=mask, callback=on_step)
            late = self.model.pending_loras()
            if late:
                logger.warning("sampling ended before %s was read; it did not run",
                               ", ".join(os.path.basename(spec.path) for spec in late))
        return self.unscale(samples)

    def _guided(self, loaded: LoadedModel, model_sampling: DiscreteModelSampling, conds: dict,
                sigmas: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The guided denoiser D(x, σ) the sampler calls, through the ref's sampling patch if it has one."""
        patch = self.model.sampling_patch
        if patch is None:
            return classifier_free_guidance(DiffusersDenoiser(loaded.unet, loaded.schedule), model_sampling, conds,
                                            self.cfg)
        steps = StepSchedule.of(sigmas, model_sampling.timestep)

        def unet_patch(unet, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None):
            return patch.unet(DiffusersUNetCall(unet, embeds, added), x, t, steps)

        guided = classifier_free_guidance(DiffusersDenoiser(loaded.unet, loaded.schedule, unet_patch),
                                          model_sampling, conds, self.cfg)

        def patched(x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor:
            return patch.denoised(lambda x_in: guided(x_in, sigma, **extra), x, sigma, steps)

        return patched

    def _bringing_in_loras(self, model_fn: Callable[..., torch.Tensor], sampler: Sampler
                           ) -> Callable[..., torch.Tensor]:
        """``model_fn`` bringing in the ref's ``when_ready`` LoRAs at the first step boundary after their files are
        read (SwiftDiffusion's asynchronous loading): before the first model call of a step, never inside one."""
        pending = self.model.pending_loras()
        if not pending:
            return model_fn
        every = EVALUATIONS_PER_STEP.get(sampler.name)
        names = ", ".join(os.path.basename(spec.path) for spec in pending)
        if every is None:
            logger.info("sampler %s calls the model a varying number of times per step; waiting for %s",
                        sampler.name, names)
            self.model.bring_in_loras(pending, wait=True)
            return model_fn
        logger.info("sampling starts without %s, which comes in when read", names)
        calls = itertools.count()

        def at_step_starts(x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor:
            nonlocal pending
            call = next(calls)
            if pending and call and call % every == 0:
                pending = self.model.bring_in_loras(pending)
                if not pending:
                    logger.info("%s in from step %d", names, call // every)
            return model_fn(x, sigma, **extra)

        return at_step_starts

    def unscale(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents as the model sees them, back to a LATENT's unscaled values (on the CPU)."""
        codec = DiffusersCodec(self.model.model.vae)
        return (latent.float() / codec.scaling_factor + codec.shift_factor).cpu()
