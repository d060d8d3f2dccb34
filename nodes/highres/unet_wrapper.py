"""Tiled diffusion as ComfyUI's UNet-call wrapper: the MODEL → MODEL patch of ``interop.md`` §4.

ComfyUI calls a model's ``model_options["model_function_wrapper"]`` in place of ``apply_model`` for every batch of
conditionings it evaluates (``comfy/samplers.py``, ``calc_cond_batch``)::

    wrapper(apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": cond_or_uncond}) -> x̂₀

with ``x`` (B, C, H, W) the noisy latents of every conditioning in the batch, ``sigma`` (B,) their noise levels
(k-diffusion σ, not a timestep), ``c`` the keyword arguments of ``apply_model`` (``c_crossattn``, ``y`` for SDXL,
``c_concat`` for inpainting models, ``control``, ``transformer_options``) and ``cond_or_uncond`` which conditioning
each of the B / len(cond_or_uncond) row groups is. :class:`TiledUnetWrapper` cuts ``x`` into the tiles of
:mod:`.tiling`, calls ``apply_model`` on them in batches and blends the x̂₀ with the same partition of unity as the
standalone tiled sampler (blending x̂₀ equals blending ε: x̂₀ is affine in ε at a fixed x). Nothing here imports
``comfy``: the wrapper only calls what it is given.

Conditioning per tile: tensors laid out on the latent grid (``c_concat``, the masked image and mask of inpainting
models) are cropped to the tile; the others (text embeddings, SDXL's ``y``) repeat once per tile. ControlNet is not
supported: ComfyUI computes its residuals for the whole latent before the wrapper runs, at every UNet resolution,
and cropping those is left out; a MODEL sampled with a ControlNet raises.

The ``shifted`` mode's grid moves every step; ComfyUI may call the wrapper several times per step (cond and uncond
apart when they cannot share a batch), so the step is read from σ's place in the schedule
(``transformer_options["sample_sigmas"]``), not counted. A solver's evaluations between two schedule sigmas (Heun's
second, DPM-2's midpoint) use the grid of the step they lead to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .tiling import Tile, TilePlanner, TileSettings, blend_tiles

# ComfyUI sets it on every sampling run (CFGGuider.inner_sample); a shifted grid cannot know its step without it.
SAMPLE_SIGMAS_KEY = "sample_sigmas"
# The schedule's σ and the σ ComfyUI passes are the same float32 numbers; the tolerance only guards a dtype cast.
SIGMA_RELATIVE_TOLERANCE = 1e-4


def step_of_sigma(sigma: float, sample_sigmas: torch.Tensor) -> int:
    """The step a call at noise level ``sigma`` belongs to: how many of the schedule's sigmas lie above it.

    Args:
        sigma: the call's σ.
        sample_sigmas: the run's descending schedule.
    Returns:
        i for ``sigma == sample_sigmas[i]``; i + 1 for a σ strictly between ``sample_sigmas[i]`` and ``[i + 1]``.
    Example:
        >>> sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
        >>> step_of_sigma(14.6, sigmas), step_of_sigma(3.0, sigmas), step_of_sigma(1.2, sigmas)
        (0, 1, 2)
    """
    above = sample_sigmas.detach().float().cpu() > sigma * (1 + SIGMA_RELATIVE_TOLERANCE)
    return int(above.sum())


def tile_conditioning(c: dict, chunk: list[Tile], batch: int, height: int, width: int) -> dict:
    """``apply_model``'s keyword arguments for ``chunk``'s tiles stacked tile-major on the batch axis.

    Tensors on the latent grid (last two dims ``height`` × ``width``) are cropped to each tile; other tensors, whose
    first dim is the batch, repeat once per tile; ``transformer_options`` gets ``cond_or_uncond`` and ``uuids``
    repeated to match, so patches that split the batch by conditioning still find their rows.

    Raises:
        ValueError: a ControlNet in ``c``, or a tensor that is neither on the latent grid nor batched.
    """
    if c.get("control") is not None:
        raise ValueError("tiled diffusion does not support ControlNet: its residuals are computed for the whole "
                         "latent before the UNet call and are not cropped per tile; apply the ControlNet without "
                         "the tiled-diffusion patch")
    tiled = {}
    for key, value in c.items():
        if key == "transformer_options":
            options = dict(value)
            for listed in ("cond_or_uncond", "uuids"):
                if listed in options:
                    options[listed] = list(options[listed]) * len(chunk)
            tiled[key] = options
        elif not isinstance(value, torch.Tensor):
            tiled[key] = value
        elif value.ndim >= 4 and tuple(value.shape[-2:]) == (height, width):
            tiled[key] = torch.cat([value[..., top:top + h, left:left + w] for top, left, h, w in chunk])
        elif value.shape[0] == batch:
            tiled[key] = torch.cat([value] * len(chunk))
        else:
            raise ValueError(f"cannot tile the conditioning {key!r} of shape {tuple(value.shape)}: it is neither on "
                             f"the {height}×{width} latent grid nor batched by {batch}")
    return tiled


class TiledUnetWrapper:
    """ComfyUI's ``model_function_wrapper`` that evaluates the UNet tile by tile (see the module docstring).

    Example (a stand-in ``apply_model`` that returns its input: the blend gives the input back):

        >>> wrapper = TiledUnetWrapper(TileSettings("mixture", tile=8, overlap=2, offset_stride=4))
        >>> x = torch.randn(2, 4, 12, 20)
        >>> params = {"input": x, "timestep": torch.ones(2), "c": {"c_crossattn": torch.zeros(2, 77, 8)},
        ...           "cond_or_uncond": [0, 1]}
        >>> torch.allclose(wrapper(lambda x, t, **c: x, params), x, atol=1e-6)
        True
    """

    def __init__(self, settings: TileSettings):
        self.settings = settings
        self.plan = TilePlanner(settings)

    def __call__(self, apply_model: Callable[..., torch.Tensor], params: dict) -> torch.Tensor:
        x, sigma, c = params["input"], params["timestep"], params["c"]
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        tiles, weights = self.plan(height, width, self._step(sigma, c))

        def evaluate(crops: torch.Tensor, chunk: list[Tile]) -> torch.Tensor:
            return apply_model(crops, torch.cat([sigma] * len(chunk)),
                               **tile_conditioning(c, chunk, batch, height, width))

        return blend_tiles(x, tiles, weights, self.settings.tile_batch_size, evaluate)

    def _step(self, sigma: torch.Tensor, c: dict) -> int:
        """The sampling step of this call; only the shifted grid depends on it (0 for the other modes)."""
        if self.settings.mode != "shifted":
            return 0
        sample_sigmas = c.get("transformer_options", {}).get(SAMPLE_SIGMAS_KEY)
        if sample_sigmas is None:
            raise ValueError("the shifted mode needs the run's schedule (transformer_options['sample_sigmas'], set "
                             "by ComfyUI's samplers) to know the step; call the model through a sampler")
        return step_of_sigma(float(sigma.max()), sample_sigmas)
