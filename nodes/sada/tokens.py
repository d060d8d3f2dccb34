"""SADA's token-wise sparsity (``techniques.md`` §4.5): at the steps that are computed, the transformer blocks at full
latent resolution run on a subset of the tokens, and the others keep their last computed value.

The subset: one random token in each sx×sy window, plus every token the stability criterion found unstable at the
last computed step (channel mean of M ≥ 0, the ``max_fix`` highest if more). A pruned block's output for the
dropped tokens comes from its cache, which a full pass refreshes every ``max_interval`` steps (counted from the
acceleration range's start, or from the step after the last skipped one) and every pruned pass updates for the
tokens it ran.

Source: the official code (``sada/prune.py``, ``sada/module.py``): windows sx = sy = 3, max_downsample 1 (full
resolution only), max_fix 5·1024, pruning only inside the acceleration range, the refresh rule above. Departures:
the window draws come from a generator seeded at every run's start (the official one is seeded once per process);
with a batch of several latents the criterion is averaged over the batch (the official code assumes one); tokens
outside the last whole window of a row or column are dropped, as there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch

from ..common.unet_split import TRANSFORMER_BLOCK_CLASSES, UNetCall, feature_level
from ..sampling.patches import CallSlots, StepSchedule
from .solver import MIN_ACC_START, SadaSettings

# Source: the official README's apply_patch call
DEFAULT_WINDOW, DEFAULT_MAX_DOWNSAMPLE, DEFAULT_MAX_FIX = 3, 1, 5 * 1024
WINDOW_SEED = 0  # our choice (see the module docstring)


@dataclasses.dataclass
class TokenScores:
    """What SADA's sampler tells its token pruning during a run: the latent's unstable tokens (H, W) from the last
    computed step's criterion, and the last skipped step."""

    settings: SadaSettings
    max_fix: int = DEFAULT_MAX_FIX
    unstable: torch.Tensor | None = None
    last_skipped: int = -1

    def start_run(self) -> None:
        self.unstable, self.last_skipped = None, -1

    def record(self, score: torch.Tensor) -> None:
        """The unstable tokens of a criterion ``score`` (B, C, H, W): channel (and batch) mean ≥ 0, at most
        ``max_fix`` of them, the highest."""
        mean = score.mean(dim=(0, 1)).flatten()
        unstable = mean >= 0
        if int(unstable.sum()) > self.max_fix:
            unstable = torch.zeros_like(unstable)
            unstable[mean.topk(self.max_fix).indices] = True
        self.unstable = unstable.reshape(score.shape[-2:])


def window_tokens(height: int, width: int, sx: int, sy: int, generator: torch.Generator) -> torch.Tensor:
    """A (height·width,) mask of one random token in each whole sy×sx window.

    Example:
        >>> int(window_tokens(6, 9, 3, 3, torch.Generator().manual_seed(0)).sum())
        6
    """
    rows, columns = height // sy, width // sx
    choice = torch.randint(sy * sx, (rows, columns), generator=generator)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[torch.arange(rows)[:, None] * sy + choice // sx, torch.arange(columns)[None, :] * sx + choice % sx] = True
    return mask.flatten()


class TokenPruning:
    """The token-wise half of SADA as a step-aware sampling patch on the MODEL (its sampler writes ``scores``)."""

    def __init__(self, scores: TokenScores, sx: int = DEFAULT_WINDOW, sy: int = DEFAULT_WINDOW,
                 max_downsample: int = DEFAULT_MAX_DOWNSAMPLE):
        if min(sx, sy, max_downsample) < 1:
            raise ValueError(f"sx, sy and max_downsample must be >= 1; got {sx}, {sy}, {max_downsample}")
        self.scores, self.sx, self.sy, self.max_downsample = scores, sx, sy, max_downsample
        self._slots = CallSlots()
        self._cache: dict[tuple, torch.Tensor] = {}
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        self._generator = torch.Generator()
        self.pruned_passes = 0  # block passes run on a subset (for tests and the log)

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        return apply(x)

    def mode(self, index: int) -> str | None:
        """At step ``index``: None (no pruning), ``"full"`` (every token, refreshing the caches) or ``"prune"``."""
        settings = self.scores.settings
        start = max(settings.acc_start, MIN_ACC_START)
        if not start <= index < settings.acc_end or self.scores.unstable is None:
            return None
        last = self.scores.last_skipped
        since = index - start if start > last else index - last - 1
        return "full" if since % settings.max_interval == 0 else "prune"

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        index = steps.index_of_timestep(timesteps)
        if self._slots.starts_run(index):
            self._cache.clear()
            self._generator.manual_seed(WINDOW_SEED)
        new_step = index != self._slots.step
        slot = self._slots.name(index, x)
        mode = self.mode(index)
        if mode is None:
            return call.forward(x, timesteps)
        if new_step:
            self._kept.clear()  # the windows are drawn once per step, for all of its calls and blocks
        with self._wrapped(call.network, slot, mode, tuple(x.shape[-2:])):
            return call.forward(x, timesteps)

    def _kept_tokens(self, height: int, width: int) -> torch.Tensor:
        """The step's kept token indices at a level of size (height, width)."""
        if (height, width) not in self._kept:
            unstable = self.scores.unstable
            if unstable.shape != (height, width):  # a coarser level: the official pooling, a quarter or more
                factor = unstable.shape[0] // height
                pooled = torch.nn.functional.avg_pool2d(unstable[None, None].float(), factor, factor)
                unstable = pooled[0, 0] > 0.25
            mask = window_tokens(height, width, self.sx, self.sy, self._generator) | unstable.flatten().cpu()
            self._kept[height, width] = mask.nonzero().flatten()
        return self._kept[height, width]

    @contextlib.contextmanager
    def _wrapped(self, network: torch.nn.Module, slot: tuple, mode: str, latent_size: tuple[int, int]):
        blocks = [(name, module) for name, module in network.named_modules()
                  if type(module).__name__ in TRANSFORMER_BLOCK_CLASSES]
        for name, module in blocks:
            module.forward = self._pruning(module.forward, (slot, name), mode, latent_size)
        try:
            yield
        finally:
            for _, module in blocks:
                del module.forward

    def _pruning(self, forward: Callable, key: tuple, mode: str, latent_size: tuple[int, int]) -> Callable:
        def run(hidden, *args, **kwargs):
            level = feature_level(hidden, latent_size)
            if 2 ** level > self.max_downsample:
                return forward(hidden, *args, **kwargs)
            if mode == "full" or key not in self._cache:
                self._cache[key] = output = forward(hidden, *args, **kwargs)
                return output
            scale = 2 ** level
            kept = self._kept_tokens(math.ceil(latent_size[0] / scale), math.ceil(latent_size[1] / scale))
            kept = kept.to(hidden.device)
            output = self._cache[key].clone()
            output[:, kept] = forward(hidden[:, kept], *args, **kwargs)
            self._cache[key] = output
            self.pruned_passes += 1
            return output

        return run
