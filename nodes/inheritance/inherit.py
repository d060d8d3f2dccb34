"""Feature inheritance (A-SDM's idea, ``techniques.md`` §4.6): parts of the UNet reuse, at some steps, what they
computed at the last full step instead of running.

A-SDM (Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature Inheritance
Strategies", arXiv 2406.00210, TNNLS 2025) states only this much in its abstract: tuning-free feature inheritance
that skips local computations at block, layer or unit level by reusing features, with several time-step sampling
modes, for about 40 % faster generation. Everything below is therefore our design (the settings are ours, not the
paper's):

- **What inherits.** The layers whose feature maps are at least ``2**min_level`` times smaller than the latent (the
  low-resolution middle of the UNet, which the DeepCache and Faster Diffusion line of work finds slowest to
  change), at one of three granularities: ``unit`` (the self-attention, cross-attention and feed-forward units of
  each transformer block), ``layer`` (each ResNet and transformer layer), ``unet`` (the whole network: an inherited
  step returns the last full step's prediction). A ``block`` inherits as all of its layers do.
- **How.** A layer whose output has its input's shape (a residual layer) keeps its residual (output − input) and
  adds it to its current input when it inherits; any other part (a unit, a layer that changes the width) keeps its
  output and returns it.
- **When** (step modes): ``uniform`` (a full step every ``interval`` steps) or ``front_dense`` (every step full
  in the first ``front`` fraction of the run, where the picture's layout forms, then every ``interval`` steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
import contextlib
from typing import Any

import torch

from ..common.unet_split import TRANSFORMER_BLOCK_CLASSES, UNetCall, feature_level
from ..sampling.patches import CallSlots, StepSchedule

GRANULARITIES = ("unit", "layer", "unet")
MODES = ("uniform", "front_dense")
# The layers that inherit, by class name in either host: diffusers' and ComfyUI's (openaimodel.py, attention.py)
LAYER_CLASSES = frozenset(("ResnetBlock2D", "Transformer2DModel", "ResBlock", "SpatialTransformer"))
UNITS = ("attn1", "attn2", "ff")
# Our defaults (no paper numbers): the two innermost levels of an SD UNet, a full step every second one after the
# first fifth of the run
DEFAULT_GRANULARITY, DEFAULT_MODE, DEFAULT_INTERVAL, DEFAULT_FRONT, DEFAULT_MIN_LEVEL = "layer", "front_dense", 2, \
    0.2, 2


def full_steps(count: int, mode: str = DEFAULT_MODE, interval: int = DEFAULT_INTERVAL,
               front: float = DEFAULT_FRONT) -> frozenset[int]:
    """The steps (0 = noisiest) at which everything runs; the others inherit.

    Example:
        >>> sorted(full_steps(10, "uniform", 3))
        [0, 3, 6, 9]
        >>> sorted(full_steps(10, "front_dense", 3, 0.3))
        [0, 1, 2, 5, 8]
    """
    if count < 1 or interval < 1 or not 0 <= front <= 1:
        raise ValueError(f"count and interval must be >= 1 and front in [0, 1]; got {count}, {interval}, {front}")
    if mode == "uniform":
        return frozenset(range(0, count, interval))
    if mode != "front_dense":
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    dense = max(1, math.ceil(front * count))
    return frozenset(range(dense)) | frozenset(range(dense - 1, count, interval))


class FeatureInheritance:
    """Feature inheritance as a step-aware sampling patch (:class:`~nodes.sampling.patches.SamplingPatch`).

    ``runs`` counts, per part name, how often each part ran (its call counts, for tests and the log).
    """

    def __init__(self, granularity: str = DEFAULT_GRANULARITY, mode: str = DEFAULT_MODE,
                 interval: int = DEFAULT_INTERVAL, front: float = DEFAULT_FRONT, min_level: int = DEFAULT_MIN_LEVEL):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
        if min_level < 0:
            raise ValueError(f"min_level must be >= 0; got {min_level}")
        full_steps(1, mode, interval, front)  # checks the step mode
        self.granularity, self.mode, self.interval, self.front = granularity, mode, interval, front
        self.min_level = min_level
        self._kept: dict[tuple, Any] = {}
        self._slots = CallSlots()
        self.runs: dict[str, int] = {}

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        return apply(x)

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        index = steps.index_of_timestep(timesteps)
        if self._slots.starts_run(index):
            self._kept.clear()
        slot = self._slots.name(index, x)
        inherit = index not in full_steps(steps.count, self.mode, self.interval, self.front)
        if self.granularity == "unet":
            if inherit and (slot, "unet") in self._kept:
                return self._kept[slot, "unet"]
            self._count("unet")
            self._kept[slot, "unet"] = prediction = call.forward(x, timesteps)
            return prediction
        with self._wrapped(call.network, slot, inherit, tuple(x.shape[-2:])):
            return call.forward(x, timesteps)

    def _count(self, name: str) -> None:
        self.runs[name] = self.runs.get(name, 0) + 1

    def _parts(self, network: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, module in network.named_modules():
            kind = type(module).__name__
            if self.granularity == "layer" and kind in LAYER_CLASSES:
                yield name, module
            elif self.granularity == "unit" and kind in TRANSFORMER_BLOCK_CLASSES:
                for unit in UNITS:
                    if getattr(module, unit, None) is not None:
                        yield f"{name}.{unit}", getattr(module, unit)

    @contextlib.contextmanager
    def _wrapped(self, network: torch.nn.Module, slot: tuple, inherit: bool, latent_size: tuple[int, int]):
        """Each part's forward replaced, for one call, by one that inherits or runs and keeps (the class's own
        forward is untouched: other models of the class, and other calls, run as they are)."""
        parts = list(self._parts(network))
        for name, module in parts:
            module.forward = self._inheriting(name, module.forward, slot, inherit, latent_size)
        try:
            yield
        finally:
            for _, module in parts:
                del module.forward

    def _inheriting(self, name: str, forward: Callable, slot: tuple, inherit: bool,
                    latent_size: tuple[int, int]) -> Callable:
        key = (slot, name)
        residual_kind = self.granularity == "layer"

        def run(hidden, *args, **kwargs):
            if feature_level(hidden, latent_size) < self.min_level:
                return forward(hidden, *args, **kwargs)
            if inherit and key in self._kept:
                is_residual, kept = self._kept[key]
                return _rebuild(kept, hidden, is_residual)
            self._count(name)
            output = forward(hidden, *args, **kwargs)
            tensor = output[0] if isinstance(output, tuple) else output
            is_residual = residual_kind and tensor.shape == hidden.shape
            self._kept[key] = (is_residual, _structure(output, tensor - hidden if is_residual else tensor))
            return output

        return run


def _structure(output: Any, tensor: torch.Tensor) -> Any:
    """What to keep: ``tensor`` in the place of the output's first tensor (diffusers' layers may return tuples)."""
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _rebuild(kept: Any, hidden: torch.Tensor, is_residual: bool) -> Any:
    tensor = kept[0] if isinstance(kept, tuple) else kept
    tensor = hidden + tensor if is_residual else tensor
    return (tensor, *kept[1:]) if isinstance(kept, tuple) else tensor
