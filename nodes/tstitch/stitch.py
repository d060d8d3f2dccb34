"""T-Stitch: trajectory stitching between a small and a large denoiser (``techniques.md`` §4.2).

Early steps shape the layout and colours, which a small model of the same latent space gets about right; the large
model's time goes to the details of the later steps. At step i of N the small model runs if (i + 1)/N ≤ r, the
large one otherwise; within a step both halves of classifier-free guidance use the same model. The two must share
the latent space, the text encoder's width and pooled vector, the prediction type and the noise schedule: the
sampler's state passes from one to the other unchanged, whatever the sampler (multistep samplers keep past outputs,
not which model made them).

Source: Pan et al., "T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models with Trajectory Stitching",
ICLR 2025 (arXiv 2402.14167); official code (NVlabs/T-Stitch, ``tstitch_sd_utils.py``: the small model for the first
``ratio`` of the steps; r = 0.4 keeps DiT's FID at a 10× faster small model). Departure: a ControlNet acts in the
large model's steps only (its residuals are computed for the large UNet's widths).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch

from ..common.unet_split import UNetCall
from ..sampling.patches import StepSchedule

DEFAULT_RATIO = 0.4  # Source: the paper's SD and DiT setting (40 % of the early steps to the small model)


def small_model_steps(count: int, ratio: float) -> int:
    """How many of ``count`` steps, from the noisiest, the small model runs: those with (i + 1)/N ≤ r.

    Example:
        >>> small_model_steps(10, 0.4), small_model_steps(50, 0.4), small_model_steps(10, 0.0)
        (4, 20, 0)
    """
    if count < 1 or not 0 <= ratio <= 1:
        raise ValueError(f"count must be >= 1 and ratio in [0, 1]; got {count} and {ratio}")
    return sum((index + 1) / count <= ratio + 1e-9 for index in range(count))


class TrajectoryStitch:
    """T-Stitch as a step-aware sampling patch on the large model (:class:`~nodes.sampling.patches.SamplingPatch`).

    ``small()`` enters the small network for one call, giving (network, the dtype it computes in): the host's way
    of holding it (Atelier's model lock with its LoRAs, or ComfyUI's loaded ``UNetModel``).
    """

    def __init__(self, small: Callable[[], ContextManager[tuple[Any, torch.dtype]]], ratio: float = DEFAULT_RATIO):
        small_model_steps(1, ratio)  # checks the ratio
        self.small, self.ratio = small, ratio

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        return apply(x)

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        if steps.index_of_timestep(timesteps) >= small_model_steps(steps.count, self.ratio):
            return call.forward(x, timesteps)
        with self.small() as (network, dtype):
            return call.with_network(network, dtype).forward(x.to(dtype), timesteps).to(x.dtype)


def check_stitchable(small: dict[str, Any], large: dict[str, Any]) -> None:
    """Raises a ValueError naming the first property the two models' descriptions (same keys: what a sampler's
    state and the conditioning need to agree on) differ in."""
    for name, value in large.items():
        other = small[name]
        same = torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value
        if not same:
            shown = "differs" if isinstance(value, torch.Tensor) else f"is {other!r} in the small model, {value!r} " \
                                                                     f"in the large one"
            raise ValueError(f"T-Stitch needs two models of one latent space and text conditioning: the {name} "
                             f"{shown}")


@contextlib.contextmanager
def held(network: Any, dtype: torch.dtype):
    """A network that needs no holding (ComfyUI loads it with the sampled model)."""
    yield network, dtype
