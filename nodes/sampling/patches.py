"""Step-aware model patches: a technique that changes how the model is evaluated, step by step, in both hosts
(``techniques.md`` §3.2, ``interop.md`` §4).

A :class:`SamplingPatch` has two hooks, each given the run's :class:`StepSchedule` (which step of how many, at
which σ and timestep):

- ``denoised(apply, x, sigma, steps)`` around the guided-or-not denoiser D(x, σ) → x̂₀ in the k-diffusion view,
  where ``apply(x)`` evaluates the model at the step's σ (Faster Diffusion's prior noise injection);
- ``unet(call, x, timesteps, steps)`` around the network itself, with the call split into encoder and decoder
  (:class:`~nodes.common.unet_split.UNetCall`): Faster Diffusion's encoder propagation, feature inheritance.

Standalone, a patch travels on Atelier's MODEL (``ModelRef.sampling_patch``) and the KSampler nodes' guider runs it
(:mod:`.guiders`); the nodes that run a model with samplers of their own refuse a patched one. Inside ComfyUI,
:func:`patch_comfy_model` registers the two hooks as ComfyUI's ``apply_model`` and ``diffusion_model`` wrappers on a
clone of the user's MODEL, which ComfyUI's own samplers then run; ComfyUI's CFGGuider puts the run's sigmas in
``transformer_options["sample_sigmas"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..common.comfy_host import SAMPLING_PATCH_KEY, comfy_module, has_sampling_patch
from ..common.unet_split import ComfyUNetCall, UNetCall
from ..models.refs import ModelRef

# transformer_options key under which the apply_model wrapper hands the step schedule to the diffusion_model one
STEPS_OPTION = "atelier_steps"


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """A sampling run's steps: ``sigmas`` (N + 1,) descending, the last usually 0, and ``timesteps`` (N,), the
    network timestep of each step's σ (as the model's sampling maps it)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def of(cls, sigmas: torch.Tensor, timestep: Callable[[torch.Tensor], torch.Tensor]) -> StepSchedule:
        """The schedule of ``sigmas`` under the model sampling's ``timestep`` (σ → t)."""
        sigmas = sigmas.detach().float().cpu()
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(f"a run's sigmas must be 1-D with at least 2 values; got shape {tuple(sigmas.shape)}")
        return cls(sigmas, timestep(sigmas[:-1]).float().cpu())

    @property
    def count(self) -> int:
        """N, the number of steps."""
        return self.timesteps.numel()

    def index_of_sigma(self, sigma: torch.Tensor | float) -> int:
        """The step whose σ is nearest to ``sigma``, a call's σ (B,) or one value: a call's batch is at one step (a
        second-order sampler's extra evaluations count as the step they end at)."""
        return int((self.sigmas[:-1] - _first(sigma)).abs().argmin())

    def index_of_timestep(self, timestep: torch.Tensor | float) -> int:
        """The step whose timestep is nearest to ``timestep``, a call's timesteps (B,) or one value."""
        return int((self.timesteps - _first(timestep)).abs().argmin())


def _first(value: torch.Tensor | float) -> float:
    return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)


class CallSlots:
    """Names the model calls of a run's steps, so that a patch finds at step j what it kept for the same call at
    step i: the host evaluates a step in one call (both guidance halves) or in several (each half, or batches it
    chose), the same way every step. A slot is (the call's rank within its step, the input's shape)."""

    def __init__(self):
        self._step, self._calls = -1, 0

    @property
    def step(self) -> int:
        """The step of the last call named; -1 before the first."""
        return self._step

    def starts_run(self, index: int) -> bool:
        """Whether a call at step ``index`` begins a new run: a patch drops what it kept for the last one."""
        return index == 0 and self._step != 0

    def name(self, index: int, x: torch.Tensor) -> tuple:
        """The slot of a call at step ``index`` with input ``x``."""
        if index != self._step:
            self._step, self._calls = index, 0
        slot = (self._calls, tuple(x.shape))
        self._calls += 1
        return slot


class SamplingPatch(Protocol):
    """What a step-aware patch provides; either hook may pass straight through."""

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        """x̂₀ for VE latents ``x`` (B, C, h, w) at ``sigma`` (B,); ``apply(x)`` is the unpatched D(x, σ)."""
        ...

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        """The network's raw prediction for its input ``x`` at ``timesteps`` (B,); ``call.forward`` is the
        unpatched network."""
        ...


ALREADY_PATCHED = ("this MODEL has an Atelier sampling patch already (Faster Diffusion, feature inheritance ...): "
                   "apply one of them")


def patch_model(model: Any, patch: SamplingPatch) -> Any:
    """What arrived on a MODEL socket, with ``patch``: Atelier's ref with ``sampling_patch`` set, or a clone of
    ComfyUI's MODEL whose samplers run it (:func:`patch_comfy_model`). The input is not changed.

    Raises:
        TypeError: neither host's MODEL.
        ValueError: the MODEL carries an Atelier sampling patch already (two would fight over the same calls).
    """
    if isinstance(model, ModelRef):
        if model.sampling_patch is not None:
            raise ValueError(ALREADY_PATCHED)
        return dataclasses.replace(model, sampling_patch=patch)
    model_patcher = comfy_module("comfy.model_patcher")
    if model_patcher is None or not isinstance(model, model_patcher.ModelPatcher):
        raise TypeError(f"model must be Atelier's or ComfyUI's MODEL; got {type(model).__name__}")
    return patch_comfy_model(model, patch)


def patch_comfy_model(patcher: Any, patch: SamplingPatch) -> Any:
    """A clone of ComfyUI's MODEL whose samplers run ``patch`` (the clone shares the input's weights).

    Raises:
        ValueError: the MODEL carries an Atelier sampling patch already.
    """
    extension = comfy_module("comfy.patcher_extension")
    kinds = (extension.WrappersMP.APPLY_MODEL, extension.WrappersMP.DIFFUSION_MODEL)
    if has_sampling_patch(patcher):
        raise ValueError(ALREADY_PATCHED)
    patched = patcher.clone()
    patched.add_wrapper_with_key(kinds[0], SAMPLING_PATCH_KEY, _comfy_apply_model_wrapper(patch))
    patched.add_wrapper_with_key(kinds[1], SAMPLING_PATCH_KEY, _comfy_diffusion_model_wrapper(patch))
    return patched


def _comfy_apply_model_wrapper(patch: SamplingPatch) -> Callable:
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sample_sigmas = transformer_options.get("sample_sigmas")
        if sample_sigmas is None:  # a call outside a sampler's run (a preview, another node): unpatched
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        steps = StepSchedule.of(sample_sigmas, executor.class_obj.model_sampling.timestep)
        options = {**transformer_options, STEPS_OPTION: steps}
        return patch.denoised(lambda x_in: executor(x_in, t, c_concat, c_crossattn, control, options, **kwargs),
                              x, t, steps)

    return wrapper


def _comfy_diffusion_model_wrapper(patch: SamplingPatch) -> Callable:
    def wrapper(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        steps = transformer_options.get(STEPS_OPTION)
        if steps is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        call = ComfyUNetCall(executor.class_obj, context, y, control, transformer_options, x.dtype, **kwargs)
        return patch.unet(call, x, timesteps, steps)

    return wrapper
