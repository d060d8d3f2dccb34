"""The CPU proxy harness (correspondence.md §5): image pairs related by a known warp, and the PCK of a dense flow
against it. Tests and ``bench/correspondence.py`` measure matching with it; no dataset is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WARP_KINDS = ("homography", "tps")
TEXTURE_CELLS = (4, 8, 16, 32, 64)  # noise octaves: detail at every scale, like a photograph
PCK_ALPHA = 0.05  # the PCK@0.05, of max(H, W) of the image (PF-Pascal's convention, correspondence.md §2)


def texture(size: int, seed: int) -> torch.Tensor:
    """A seeded multi-scale colour texture (1, 3, size, size) in 0..1.

    Example:
        >>> image = texture(16, 0)
        >>> image.shape, float(image.min()), float(image.max())
        (torch.Size([1, 3, 16, 16]), 0.0, 1.0)
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, size, size)
    for cells in TEXTURE_CELLS:
        noise = torch.rand(1, 3, cells, cells, generator=generator)
        image += F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False) / cells ** 0.25
    return (image - image.amin()) / (image.amax() - image.amin())


def _homography(size: int, strength: float) -> torch.Tensor:
    # strength 1: 4° rotation, 4% zoom and a slight tilt about the centre.
    c, angle, scale, tilt = size / 2, math.radians(4 * strength), 1 + 0.04 * strength, 0.02 * strength
    core = torch.tensor([[scale * math.cos(angle), -scale * math.sin(angle), 0.0],
                         [scale * math.sin(angle), scale * math.cos(angle), 0.0],
                         [tilt / size, -tilt / size / 2, 1.0]])
    to_centre = torch.tensor([[1.0, 0, -c], [0, 1, -c], [0, 0, 1]])
    return (torch.linalg.inv(to_centre) @ core @ to_centre)[None]


def warp_with_truth(image: torch.Tensor, kind: str, strength: float, seed: int = 7
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image B = image A warped by a known homography or thin-plate spline (kornia), and for every pixel of B where
    it came from in A.

    The truth is the same warp applied to A's own pixel coordinates (extra channels warped with the image), so it is
    exact for any warp kornia makes.

    Args:
        image: A, (1, 3, H, W).
        kind: "homography" or "tps".
        strength: 1 is mild (homography: 4° rotation and 4% zoom; TPS: 3×3 control points moved by 5% of the
            half-size on average); in (0, 4].
        seed: seeds the TPS control point moves.
    Returns:
        (B (1, 3, H, W), positions in A (H, W, 2) as (x, y), valid (H, W): the position lies inside A).
    Raises:
        ValueError: an unknown ``kind`` or a ``strength`` out of range.
    Example:
        >>> warped, truth, valid = warp_with_truth(texture(16, 0), "homography", 1.0)
        >>> warped.shape, truth.shape, bool(valid[8, 8])
        (torch.Size([1, 3, 16, 16]), torch.Size([16, 16, 2]), True)
    """
    import kornia.geometry.transform as transform

    if kind not in WARP_KINDS or not 0 < strength <= 4:
        raise ValueError(f"kind must be one of {WARP_KINDS} and strength in (0, 4]; got {kind!r} and {strength}")
    height, width = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    both = torch.cat([image, torch.stack([xs, ys, torch.ones_like(xs)])[None]], dim=1)
    if kind == "homography":
        warped = transform.warp_perspective(both, _homography(max(height, width), strength), (height, width),
                                            align_corners=True)
    else:
        source = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 3), indexing="xy"),
                             dim=-1).reshape(1, 9, 2)
        target = source + torch.randn(1, 9, 2, generator=torch.Generator().manual_seed(seed)) * 0.05 * strength
        kernel_weights, affine_weights = transform.get_tps_transform(target, source)
        warped = transform.warp_image_tps(both, source, kernel_weights, affine_weights, align_corners=True)
    return warped[:, :3], warped[0, 3:5].permute(1, 2, 0), warped[0, 5] > 0.999


def pck(flow: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor, alpha: float = PCK_ALPHA) -> float:
    """The fraction of valid pixels whose flow lands within alpha · max(H, W) of the truth.

    Args:
        flow, truth: (H, W, 2) positions; valid: (H, W) bool.
    Example:
        >>> truth = torch.zeros(2, 2, 2)
        >>> pck(truth + torch.tensor([0.0, 0.05]), truth, torch.ones(2, 2, dtype=torch.bool), alpha=0.05)
        1.0
    """
    if not valid.any():
        raise ValueError("valid holds no pixel: nothing to score")
    error = (flow - truth).norm(dim=-1)[valid]
    return float((error <= alpha * max(flow.shape[:2])).float().mean())
