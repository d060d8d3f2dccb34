"""GD (gradient decomposition): OmniSSR's range-null-space projection of an estimate onto the low-resolution input.

Notation (DDNM, Wang et al. 2023, Eq. 4; OmniSSR §3.3):

- ``downsample`` -> H, bicubic ↓s as separable 1-D matrices (Keys kernel a = -0.5, stretched by s for antialiasing);
- ``pseudo_inverse`` -> H⁺, from the SVD with singular values below 3e-2 zeroed (DDRM's ``SRConv``);
- ``gd_project`` -> x̂ = x − H⁺(Hx − y), so that Hx̂ = y on the kept subspace.

Source: OmniSSR ``test_sr_val_ddpm_text_T_oldcanvas_TAN-OmniSSR-TAN.py`` at 9ca4a4f and DDRM's ``svd_replacement.py``.
Departure: OmniSSR applies H on non-overlapping 256×256 HR patches; we apply the separable operator to the whole
image, which has no patch seams and is the same operator inside each patch away from its borders.
"""

from __future__ import annotations

import functools

import torch

KEYS_A = -0.5  # Source: DDRM svd_replacement.py bicubic kernel, a = -0.5
SINGULAR_CUTOFF = 3e-2  # Source: DDRM SRConv / OmniSSR: singular values below 3e-2 are zeroed


def _keys(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    near = (KEYS_A + 2) * t ** 3 - (KEYS_A + 3) * t ** 2 + 1
    far = KEYS_A * t ** 3 - 5 * KEYS_A * t ** 2 + 8 * KEYS_A * t - 4 * KEYS_A
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


@functools.lru_cache(maxsize=8)
def bicubic_matrix(size: int, scale: int) -> torch.Tensor:
    """The (size/scale, size) float64 matrix of antialiased bicubic ↓scale along one axis, edges replicated.

    Example:
        >>> m = bicubic_matrix(8, 2)
        >>> m.shape, torch.allclose(m.sum(1), torch.ones(4, dtype=torch.float64))
        (torch.Size([4, 8]), True)
    """
    if scale < 1 or size % scale:
        raise ValueError(f"size must be a multiple of scale >= 1; got size {size}, scale {scale}")
    out = torch.arange(size // scale, dtype=torch.float64)
    centre = (out + 0.5) * scale - 0.5
    taps = torch.arange(-2 * scale, 2 * scale + 1, dtype=torch.float64)
    source = centre.floor()[:, None] + taps
    weight = _keys((source - centre[:, None]) / scale)
    weight = weight / weight.sum(1, keepdim=True)
    matrix = torch.zeros(size // scale, size, dtype=torch.float64)
    return matrix.scatter_add_(1, source.clamp(0, size - 1).long(), weight)


@functools.lru_cache(maxsize=8)
def pseudo_inverse(size: int, scale: int) -> torch.Tensor:
    """H⁺ of :func:`bicubic_matrix`, (size, size/scale) float64, singular values below 3e-2 zeroed."""
    u, s, vh = torch.linalg.svd(bicubic_matrix(size, scale), full_matrices=False)
    inverse = torch.where(s >= SINGULAR_CUTOFF, 1 / s, torch.zeros_like(s))
    return vh.T @ (inverse[:, None] * u.T)


def downsample(image: torch.Tensor, scale: int) -> torch.Tensor:
    """H: antialiased bicubic ↓scale of (B, C, H, W) images, H and W multiples of ``scale``.

    Example:
        >>> downsample(torch.ones(1, 3, 8, 16), 2).shape
        torch.Size([1, 3, 4, 8])
    """
    rows = bicubic_matrix(image.shape[-2], scale).to(image)
    columns = bicubic_matrix(image.shape[-1], scale).to(image)
    return rows @ image @ columns.T


def gd_project(estimate: torch.Tensor, low_res: torch.Tensor, scale: int, strength: float = 1.0) -> torch.Tensor:
    """GD: replaces the range-space part of ``estimate`` by ``low_res``'s: x̂ = x − γ·H⁺(Hx − y).

    Args:
        estimate: (B, C, sH, sW) high-resolution estimate x.
        low_res: (B, C, H, W) observation y.
        scale: the factor s, >= 1.
        strength: γ in [0, 1] (OmniSSR's γ_e = 1 during sampling, γ_p = 1 in post-processing).
    Returns:
        (B, C, sH, sW) x̂; with γ = 1, downsample(x̂) = y on the kept subspace.
    Raises:
        ValueError: shapes that do not match ``scale`` or ``strength`` outside [0, 1].
    Example:
        >>> y = torch.rand(1, 3, 4, 8, dtype=torch.float64)
        >>> x = gd_project(torch.zeros(1, 3, 8, 16, dtype=torch.float64), y, 2)
        >>> torch.allclose(downsample(x, 2), y)
        True
    """
    if estimate.ndim != 4 or low_res.shape[:2] != estimate.shape[:2] or \
            (low_res.shape[-2] * scale, low_res.shape[-1] * scale) != estimate.shape[-2:]:
        raise ValueError(f"low_res must be estimate ↓{scale}; got estimate {tuple(estimate.shape)} and low_res "
                         f"{tuple(low_res.shape)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
    residual = downsample(estimate, scale) - low_res
    rows = pseudo_inverse(estimate.shape[-2], scale).to(estimate)
    columns = pseudo_inverse(estimate.shape[-1], scale).to(estimate)
    return estimate - strength * (rows @ residual @ columns.T)
