"""Seeded noise drawn exactly as ComfyUI draws it, so that the same seed gives the same picture.

Three sources:

- :func:`prepare_noise`: the starting noise of a run. One ``torch.manual_seed(seed)`` and one ``torch.randn`` over
  the whole latent batch, on the CPU (the same numbers on every machine), or per-index draws for a latent batch
  that carries ``batch_index`` (so that image k of a batch is the same as image k drawn alone).
- :func:`default_noise_sampler`: the fresh Gaussian noise of ancestral steps, from a generator seeded once per run
  on the latents' device.
- :class:`BrownianTreeNoiseSampler`: the increments W(σ') − W(σ) of one seeded Brownian motion over the run's
  sigma range, normalised to unit variance (torchsde's Brownian tree, Li et al. 2020, "Scalable Gradients for
  Stochastic Differential Equations", §4). The SDE samplers use it, so that their noise depends on the sigma
  interval and not on the step count alone: a finer schedule refines the same path.

A noise sampler is called as ``noise_sampler(sigma, sigma_next)`` and returns a tensor shaped like the latents.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchsde

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """The starting noise of a run for ``latent``'s shape and dtype, on the CPU.

    Args:
        latent: (B, ...) latents; only the shape, dtype and layout are used.
        seed: the run's seed.
        batch_index: for latents cut from a larger batch, each one's index in it: draws go in index order up to the
            largest, one sample each, and sample k takes draw ``batch_index[k]`` (repeated indices share a draw).
    Returns:
        (B, ...) standard normal noise on the CPU.
    """
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    if len(batch_index) != latent.shape[0]:
        raise ValueError(f"batch_index has {len(batch_index)} entries for a batch of {latent.shape[0]}")
    if min(batch_index) < 0:
        raise ValueError(f"batch_index entries must be >= 0; got {list(batch_index)}")
    wanted, position = np.unique(batch_index, return_inverse=True)
    one_sample = [1] + list(latent.size())[1:]
    draws = []
    for index in range(int(wanted[-1]) + 1):
        draw = torch.randn(one_sample, dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
        if index in wanted:
            draws.append(draw)
    return torch.cat([draws[k] for k in position.reshape(-1)], dim=0)


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh N(0, I) noise shaped like ``x`` at each call, from one generator on ``x``'s device seeded with ``seed``
    (the global generator when ``seed`` is None)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


class BrownianTreeNoiseSampler:
    """Unit-variance Brownian increments (W(σ') − W(σ))/√|σ' − σ| over [sigma_min, sigma_max], shaped like ``x``.

    One torchsde ``BrownianTree`` (entropy = ``seed``) spans the interval, or one per sample when ``seed`` is a
    sequence of B seeds. With ``cpu=True`` the tree lives on the CPU in float32 and its draws are moved to ``x``'s
    device, so a seed gives the same path on every machine (ComfyUI's ``*_sde`` samplers; the ``*_gpu`` variants
    build it on the device instead).

    Args:
        x: (B, ...) tensor whose shape, device and dtype the noise takes.
        sigma_min, sigma_max: the interval of sigmas that will be queried.
        seed: an int, B ints, or None for a random entropy.
        cpu: build the tree on the CPU.
    """

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float,
                 seed: int | Sequence[int] | None = None, cpu: bool = True):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._sign = 1
        if not t0 < t1:
            t0, t1, self._sign = t1, t0, -1
        w0 = torch.zeros_like(x)
        self._batched = isinstance(seed, (tuple, list))
        if self._batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"{len(seed)} seeds for a batch of {x.shape[0]}: give one per sample")
            seeds, w0 = tuple(seed), w0[0]
        elif seed is None:
            seeds = (torch.randint(0, 2 ** 63 - 1, ()).item(),)
        else:
            seeds = (seed,)
        self._cpu = cpu
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self._trees = tuple(torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds)

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        device, dtype = low.device, low.dtype
        if self._cpu:
            low, high = low.detach().cpu().float(), high.detach().cpu().float()
        with warnings.catch_warnings():
            # torchsde warns when a query at σ_min or σ_max rounds (float32) just outside its stored ends; the
            # draw there is still the right one.
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            increment = torch.stack([tree(low, high) for tree in self._trees]).to(device=device, dtype=dtype)
        increment = increment * (self._sign * sign)
        if not self._batched:
            increment = increment[0]
        return increment / (sigma_next - sigma).abs().sqrt()
