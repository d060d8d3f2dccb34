"""Fusing feature sources into one descriptor: per-layer co-PCA, resampling to one grid, per-source L2 normalisation and
weighted concatenation.

Source: "A Tale of Two Features" (arXiv 2305.15347), §3: the fused descriptor is the concatenation of the
L2-normalised SD and DINOv2 descriptors weighted α and 1 − α, α = 0.5; official code sd-dino (b85df18): co-PCA of
each SD layer over the tokens of both images to 256 dims (``--PCA_DIMS 256 256 256``), DINOv2 kept whole
(``CO_PCA_DINO = 0``: the fused descriptor is 3·256 + 768 = 1536-d for DINOv2-B), coarse layers upsampled
bilinearly to the 60×60 grid, concatenated, then each half L2-normalised and joined with weights 1 and 1.

Notation: x = a token (one row), μ = the mean token, U = the top-k principal directions, x̂ = (x − μ)·U.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import FeatureMaps

PCA_DIMS = 256  # Source: sd-dino --PCA_DIMS 256 256 256 (the SD layers)
SECOND_SOURCE_PCA_DIMS = 0  # Source: sd-dino CO_PCA_DINO = 0: DINOv2 (the second source) keeps all its channels
FUSION_WEIGHT = 0.5  # Source: the paper's α = 0.5 (sd-dino's equal weights 1 and 1 give the same neighbours)
_NORM_EPS = 1e-12  # keeps an all-zero token (a flat patch's SIFT) at zero instead of NaN


@dataclasses.dataclass(frozen=True, eq=False)
class PCABasis:
    """A fixed projection per layer (the ``ATELIER_FEATURE_BASIS`` socket): ``means[i]`` (C_i,) and
    ``components[i]`` (C_i, k_i), fitted once and reused, so that descriptors of different pairs are comparable."""

    means: tuple[torch.Tensor, ...]
    components: tuple[torch.Tensor, ...]
    source: str


def _tokens(layer: torch.Tensor) -> torch.Tensor:
    return layer.flatten(1).T  # (h·w, C)


def fit_pca_basis(maps: list[FeatureMaps], dims: int = PCA_DIMS) -> PCABasis:
    """Principal directions of each layer, fitted on the tokens of all ``maps`` together (co-PCA).

    Exact PCA through the eigenvectors of the covariance, in float64, each direction's sign fixed so that its
    largest entry is positive: the same maps always give the same basis.

    Args:
        maps: feature maps of one source (the same layers), e.g. both images of a pair.
        dims: k, the dimensions kept per layer, in [1, 4096]; a layer narrower than k keeps all its C_i directions.
    Returns:
        The basis.
    Raises:
        ValueError: no maps, maps of different sources or layer widths, or a bad ``dims``.
    Source:
        sd-dino's co-PCA (``torch.pca_lowrank`` on both images' tokens). Departure: exact eigen-decomposition
        instead of the randomised low-rank SVD, so that the basis is deterministic.
    Example:
        >>> maps = FeatureMaps((torch.randn(8, 4, 4),), "demo", (16, 16))
        >>> [c.shape for c in fit_pca_basis([maps], dims=3).components]
        [torch.Size([8, 3])]
    """
    if not maps:
        raise ValueError("fit_pca_basis needs at least one feature map")
    if not 1 <= dims <= 4096:
        raise ValueError(f"dims must be in [1, 4096]; got {dims}")
    first = maps[0]
    for other in maps[1:]:
        if other.source != first.source or [m.shape[0] for m in other.layers] != [m.shape[0] for m in first.layers]:
            raise ValueError(f"co-PCA needs maps of one source with the same layers; got {first.source!r} and "
                             f"{other.source!r}")
    means, components = [], []
    for index in range(len(first.layers)):
        tokens = torch.cat([_tokens(m.layers[index]) for m in maps]).double()
        mean = tokens.mean(0)
        centred = tokens - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        top = vectors.flip(1)[:, :min(dims, tokens.shape[1])]
        signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
        components.append((top * signs).to(first.layers[index].dtype))
        means.append(mean.to(first.layers[index].dtype))
    return PCABasis(tuple(means), tuple(components), first.source)


def project(maps: FeatureMaps, basis: PCABasis) -> FeatureMaps:
    """Each layer's tokens projected on its basis: x̂ = (x − μ)·U, as (k_i, h_i, w_i) maps.

    Raises:
        ValueError: a basis fitted on features of another source or width.
    """
    if basis.source != maps.source or [m.shape[0] for m in basis.means] != [m.shape[0] for m in maps.layers]:
        raise ValueError(f"basis was fitted on {basis.source!r} features; got {maps.source!r}")
    layers = []
    for layer, mean, component in zip(maps.layers, basis.means, basis.components):
        projected = (_tokens(layer) - mean.to(layer.device)) @ component.to(layer.device)
        layers.append(projected.T.reshape(-1, *layer.shape[1:]))
    return FeatureMaps(tuple(layers), maps.source, maps.image_size)


def stack_layers(maps: FeatureMaps, grid: tuple[int, int]) -> torch.Tensor:
    """The layers resampled bilinearly to ``grid`` = (h, w) and concatenated along channels: (ΣC_i, h, w)."""
    return torch.cat([layer if tuple(layer.shape[1:]) == grid else
                      F.interpolate(layer[None], size=grid, mode="bilinear", align_corners=False)[0]
                      for layer in maps.layers])


def l2_normalise(descriptor: torch.Tensor) -> torch.Tensor:
    """Each location's descriptor scaled to unit L2 norm (an all-zero one stays zero).

    Example:
        >>> l2_normalise(torch.tensor([[[3.0]], [[4.0]]])).flatten().tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    return descriptor / descriptor.norm(dim=0, keepdim=True).clamp_min(_NORM_EPS)


def finest_grid(maps: list[FeatureMaps]) -> tuple[int, int]:
    """The grid with the most cells among all layers of ``maps``."""
    return max((tuple(layer.shape[1:]) for m in maps for layer in m.layers), key=lambda grid: grid[0] * grid[1])


def fuse_pair(sources: list[tuple[FeatureMaps, FeatureMaps]], weights: list[float],
              pca_dims: int | Sequence[int] = PCA_DIMS,
              bases: list[PCABasis | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused descriptors of an image pair.

    For each source: project every layer by co-PCA fitted on both images (or by the given fixed basis), resample the
    layers to the finest grid of the pair, concatenate them, L2-normalise each location, multiply by the source's
    weight; then concatenate the sources. Each source's part of a token has norm equal to its weight.

    Args:
        sources: per source, the maps of image A and of image B (e.g. [(sd_a, sd_b), (dino_a, dino_b)]).
        weights: per source, in [0, 1]; the paper's α = 0.5 for both of two sources.
        pca_dims: k per layer for co-PCA, in [0, 4096], one for every source or one per source; 0 keeps the raw
            channels (no PCA). sd-dino: 256 for SD, 0 for DINOv2 (``[PCA_DIMS, SECOND_SOURCE_PCA_DIMS]``).
        bases: per source, a fixed basis to use instead of fitting one on the pair, or None.
    Returns:
        (descriptor A (D, h, w), descriptor B (D, h', w')); A and B each on the finest grid of its own maps.
    Raises:
        ValueError: no sources, mismatched lengths, a negative weight, or maps that do not belong together.
    Example:
        >>> a = FeatureMaps((torch.randn(6, 4, 4),), "x", (8, 8))
        >>> b = FeatureMaps((torch.randn(6, 4, 4),), "x", (8, 8))
        >>> fused_a, fused_b = fuse_pair([(a, b)], [0.5], pca_dims=2)
        >>> fused_a.shape, round(float(fused_a[:, 0, 0].norm()), 4)
        (torch.Size([2, 4, 4]), 0.5)
    """
    bases = bases if bases is not None else [None] * len(sources)
    dims = [pca_dims] * len(sources) if isinstance(pca_dims, int) else list(pca_dims)
    if not sources or not len(weights) == len(bases) == len(dims) == len(sources):
        raise ValueError(f"give one weight, one basis (or None) and one pca_dims per source; got {len(sources)} "
                         f"sources, {len(weights)} weights, {len(bases)} bases and {len(dims)} pca_dims")
    if any(weight < 0 for weight in weights):
        raise ValueError(f"weights must be >= 0; got {weights}")
    if not all(0 <= k <= 4096 for k in dims):
        raise ValueError(f"pca_dims must be in [0, 4096]; got {pca_dims}")
    grid_a = finest_grid([a for a, _ in sources])
    grid_b = finest_grid([b for _, b in sources])
    parts_a, parts_b = [], []
    for (maps_a, maps_b), weight, basis, source_dims in zip(sources, weights, bases, dims):
        if maps_a.source != maps_b.source:
            raise ValueError(f"images A and B must be described by the same extractor; got {maps_a.source!r} and "
                             f"{maps_b.source!r}")
        if basis is None and source_dims:
            basis = fit_pca_basis([maps_a, maps_b], source_dims)
        if basis is not None:
            maps_a, maps_b = project(maps_a, basis), project(maps_b, basis)
        parts_a.append(weight * l2_normalise(stack_layers(maps_a, grid_a)))
        parts_b.append(weight * l2_normalise(stack_layers(maps_b, grid_b)))
    return torch.cat(parts_a), torch.cat(parts_b)
