"""Faster Diffusion: encoder propagation, prior noise injection and parallel decoding (``techniques.md`` §4.1).

The UNet's encoder features change little from one step to the next while its decoder's change a lot. At the key
steps the whole UNet runs and the encoder's features (skips and mid output) are kept; at the other steps only the
decoder runs, on the kept features, with the current step's time embedding. Its input then does not depend on the
current latent, so the decoder calls of a key step and the non-key steps after it can run as one batch (parallel
mode), each with its own timestep.

Prior noise injection: before every step whose timestep is below τ the initial latent z_T, times α, is added to
the latent (z ← z + α·z_T), which restores high-frequency detail lost by reusing features.

Sources:
    - Li, Hu et al., "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference",
      NeurIPS 2024 (arXiv 2312.09608).
    - Official code (hutaiHang/Faster-Diffusion, ``utils_sd.py``): the key-step sets (50 steps: {0, 1, 2, 3, 5, 10,
      15, 25, 35}; 75 steps: i < 10 or i > 65 or i mod 5 = 0; 100 steps: i < 10 or i > 85 or i mod 5 = 0; uniform:
      i mod m = 0), the injection ``if t/1000 < 0.5: latents = latents + 0.003*init_latents`` before each step,
      and the parallel batches, which span a key step and the non-key steps up to the next key.

Departures:
    - The paper's set exists for 50, 75 and 100 steps only; at another step count N the 50-step set is scaled to N
      (each key k at round(k·N/50)).
    - The injection is made by the sampler's own step: the patch sees D(x, σ), not the sampler's state, so it
      evaluates the model at x + δ (δ the injection in the k-diffusion view, α·z_T·√(1 + σ²)) and returns
      D(x + δ) + δ·σ'/(σ − σ'), σ' the next step's σ. An Euler (DDIM) step from x then lands exactly where it lands
      from x + δ; a multistep sampler's history sees the corrected x̂₀, a close approximation.
    - The encoder cache is kept per model call of a step (the batch of both guidance halves, or each half where the
      host evaluates them apart); a call with no kept features (a second-order sampler's extra evaluation)
      runs the whole UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..common.unet_split import UNetCall, UNetFeatures
from ..sampling.patches import CallSlots, StepSchedule

KEY_MODES = ("paper", "uniform")
# Source: official utils_sd.py, the default "50ls" set.
PAPER_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
PAPER_STEPS = 50
DEFAULT_INTERVAL = 4  # Source: official README, uniform mode for community (Civitai) checkpoints
NOISE_ALPHA = 0.003  # Source: official utils_sd.py, latents + 0.003*init_latents
NOISE_TAU = 500  # Source: official utils_sd.py, t/1000 < 0.5
DEFAULT_MAX_GROUP = 10  # our choice: the default set's largest groups (10 and 15 steps) are split to bound memory
# Parallel decoding is the official code's only mode (its forward always decodes a key step's span in one batch);
# it is faster on the CPU too (bench/acceleration.py)
DEFAULT_PARALLEL = True


def key_steps(count: int, mode: str = "paper", interval: int = DEFAULT_INTERVAL) -> frozenset[int]:
    """The steps (0 = noisiest) at which the encoder runs.

    Args:
        count: N, the number of sampling steps, >= 1.
        mode: ``"paper"`` (the official non-uniform sets) or ``"uniform"`` (every ``interval``-th step).
        interval: m of the uniform mode, >= 1 (1: every step is a key, the unpatched UNet).
    Example:
        >>> sorted(key_steps(50))
        [0, 1, 2, 3, 5, 10, 15, 25, 35]
        >>> sorted(key_steps(10, "uniform", 4))
        [0, 4, 8]
    """
    if count < 1 or interval < 1:
        raise ValueError(f"count and interval must be >= 1; got {count} and {interval}")
    if mode == "uniform":
        return frozenset(range(0, count, interval))
    if mode != "paper":
        raise ValueError(f"mode must be one of {KEY_MODES}; got {mode!r}")
    if count == 100:
        return frozenset(i for i in range(count) if i < 10 or i > 85 or i % 5 == 0)
    if count == 75:
        return frozenset(i for i in range(count) if i < 10 or i > 65 or i % 5 == 0)
    return frozenset(min(count - 1, round(k * count / PAPER_STEPS)) for k in PAPER_KEYS_50)


class EncoderPropagation:
    """Faster Diffusion as a step-aware sampling patch (:class:`~nodes.sampling.patches.SamplingPatch`).

    One instance serves one MODEL's runs, one run at a time (the host's model lock, or ComfyUI's queue); its caches
    are reset at every run's first step.
    """

    def __init__(self, mode: str = "paper", interval: int = DEFAULT_INTERVAL, noise_alpha: float = NOISE_ALPHA,
                 noise_tau: float = NOISE_TAU, parallel: bool = DEFAULT_PARALLEL, max_group: int = DEFAULT_MAX_GROUP):
        key_steps(1, mode, interval)  # checks mode and interval
        if noise_alpha < 0 or not 0 <= noise_tau <= 1000 or max_group < 1:
            raise ValueError(f"noise_alpha must be >= 0, noise_tau in [0, 1000], max_group >= 1; got {noise_alpha}, "
                             f"{noise_tau}, {max_group}")
        self.mode, self.interval = mode, interval
        self.noise_alpha, self.noise_tau = noise_alpha, noise_tau
        self.parallel, self.max_group = parallel, max_group
        self._features: dict[tuple, UNetFeatures] = {}
        self._decoded: dict[tuple, torch.Tensor] = {}  # parallel mode: predictions of the coming non-key steps
        self._initial: dict[tuple, torch.Tensor] = {}  # z_T of each batch shape, for the injection
        self._slots = CallSlots()
        self._injected_step = -1

    def keys(self, steps: StepSchedule) -> frozenset[int]:
        return key_steps(steps.count, self.mode, self.interval)

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        if self.noise_alpha == 0:
            return apply(x)
        index = steps.index_of_sigma(sigma)
        level = float(steps.sigmas[index])
        shape = tuple(x.shape)
        if index == 0:
            if self._injected_step != 0:  # a new run: the last one's latents go
                self._initial.clear()
            self._initial[shape] = x / math.sqrt(1 + level ** 2)  # z_T, the VP latent the run starts from
        self._injected_step = index
        if float(steps.timesteps[index]) >= self.noise_tau:
            return apply(x)
        if shape not in self._initial:
            raise ValueError(f"Faster Diffusion's noise injection needs the first step's latents of batch shape "
                             f"{shape}; this run did not start with them (set noise_alpha to 0 to sample from here)")
        next_level = float(steps.sigmas[index + 1])
        delta = self.noise_alpha * self._initial[shape] * math.sqrt(1 + level ** 2)
        return apply(x + delta) + delta * (next_level / (level - next_level))

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        index = steps.index_of_timestep(timesteps)
        if self._slots.starts_run(index):
            self._features.clear()
            self._decoded.clear()
        slot = self._slots.name(index, x)
        keys = self.keys(steps)
        if index in keys or slot not in self._features:
            self._features[slot] = call.encode(x, timesteps)
            self._decoded = {key: value for key, value in self._decoded.items() if key[0] != slot}
        elif (slot, index) in self._decoded:
            return self._decoded.pop((slot, index))
        features = self._features[slot]
        if not (self.parallel and call.batches_steps):
            return call.decode(features, timesteps)
        # parallel: this step and the non-key steps after it (at most max_group) in one decoder batch
        group = [index]
        while len(group) < self.max_group and group[-1] + 1 < steps.count and group[-1] + 1 not in keys:
            group.append(group[-1] + 1)
        batch = x.shape[0]
        group_timesteps = torch.cat([timesteps.reshape(-1).expand(batch)]
                                    + [steps.timesteps[j].to(timesteps).expand(batch) for j in group[1:]])
        predictions = call.decode(features.repeat(len(group)), group_timesteps).split(batch)
        for step, prediction in zip(group[1:], predictions[1:]):
            self._decoded[slot, step] = prediction
        return predictions[0]
