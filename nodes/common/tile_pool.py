"""Where a tiled denoiser's tile batches run: in this process, or spread over the workers of a pool.

The standalone app's Ray workers (``web/ray_workers.py``) each set a pool of their peers here, so the tiled sampler
and the 16K generator that run in one worker hand batches of tiles to the others every step, and blend the
predictions in tile order, exactly as they would alone; the tiled VAE decode hands over part of each tile row.
Elsewhere (the plain standalone app, ComfyUI) there is no pool and every tile runs where the node runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from .denoiser import Conditioning

Tile = tuple[int, int, int, int]  # (top, left, height, width) in latent pixels


class TilePool(Protocol):
    def predictions(self, model: Any, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                    chunks: list[list[Tile]], local: Callable[[list[Tile]], torch.Tensor]) -> Iterator[torch.Tensor]:
        """The denoiser's prediction for each chunk of ``x``'s tiles, in chunk order: some chunks from peers that
        load ``model`` (a ``ModelRef``) themselves, the rest from ``local(chunk)``, this process's own.

        Args:
            x: (B, C, H, W) the latent the tiles are cropped from.
            t: (B,) timesteps.
            conditioning: of batch B.
            chunks: tile batches, each evaluated as one call.
        """
        ...

    def decoded_windows(self, vae: Any, statistics: list[tuple[torch.Tensor, torch.Tensor]],
                        dtype: torch.dtype | None, latent: torch.Tensor, windows: list[tuple],
                        local: Callable[[tuple], torch.Tensor]) -> Iterator[torch.Tensor]:
        """One tile row of a tiled VAE decode (``nodes/common/tiled_vae.py``), in window order: some windows
        decoded by peers that rebuild the VAE from ``vae`` (a ``ModelRecipe``) and normalise with the whole
        latent's GroupNorm ``statistics``, the rest by ``local(window)``."""
        ...


_pool: TilePool | None = None


def set_tile_pool(pool: TilePool | None) -> None:
    """Spread tiles over ``pool`` from now on in this process; None runs them here again."""
    global _pool
    _pool = pool


def tile_pool() -> TilePool | None:
    return _pool
