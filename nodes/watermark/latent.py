"""The generative watermarks: written into the initial latent, read back by DDIM inversion. Training-free.

**Gaussian Shading** (multi-bit). A 256-bit Reed-Solomon codeword is repeated over the latent's elements,
XORed with a ChaCha20 stream under the user's key, and each element of the initial noise is drawn from the
half of N(0, 1) its encrypted bit names: |z| for 1, −|z| for 0. The stream is uniform, so each element is still
exactly N(0, 1) ("performance-lossless"). The detector inverts the image back to its initial noise, takes signs,
decrypts, votes over the copies and corrects errors.

**Tree-Ring** (zero-bit). A ring key replaces the centre of one channel's Fourier spectrum; the detector
measures the L1 distance between the inverted latent's spectrum and the key inside the mask, and calibrates it
against the distances of a non-watermarked latent (complex Gaussian ring values).

Sources: Gaussian Shading (Yang et al., CVPR 2024, arXiv 2404.04956), bsmhmmlf/Gaussian-Shading ``watermark.py``
(``Gaussian_Shading_chacha``: ``truncSampling``, ``diffusion_inverse``, ``eval_watermark``), defaults
``channel_copy 1``, ``hw_copy 8`` (k = 256 bits), inversion with an empty prompt, guidance 1; Tree-Ring (Wen et
al., NeurIPS 2023, arXiv 2305.20030), YuxinWenRick/tree-ring-watermark ``optim_utils.py``
(``get_watermarking_pattern`` "ring", ``get_watermarking_mask``, ``eval_watermark``), defaults ``w_channel 3``,
``w_radius 10`` at a 64×64 latent, ``w_seed 999999``.

Departures: (1) the copies of a bit are spread round-robin over the latent (element i carries bit i mod 256)
instead of an 8×8 spatial tile, so a local crop or blot hits every bit alike; (2) the key and nonce come from the
user's key instead of a fresh pair per image (see :func:`~nodes.watermark.payload.chacha20_bits`); (3) the
ring radius scales with the latent (10 at 64 × 64); (4) Tree-Ring's key comes from the user's key, not seed
999999, and its p-value is the paper's χ² test taken on ring means (see :func:`tree_ring_p_value`).

Notation: x_T = the initial latent (the denoiser's scale); k = ``CODE_BITS``; r = ring radius; ᾱ_t as in
``nodes.common.denoiser``.
"""

from __future__ import annotations

import math

import torch

from ..common.denoiser import Conditioning, Denoiser, guided_eps
from ..common.progress import progress
from .payload import chacha20_bits, key_seed

DATA_BYTES, PARITY_BYTES = 16, 16  # 256 coded bits (Gaussian Shading's k); corrects 8 wrong bytes
CODE_BITS = 8 * (DATA_BYTES + PARITY_BYTES)
DEFAULT_INVERSION_STEPS = 50  # Source: Gaussian Shading and Tree-Ring, inversion with 50 DDIM steps
TREE_RING_RADIUS_AT_64 = 10  # Source: Tree-Ring, --w_radius 10 at the 64 × 64 latent of 512² images
TREE_RING_CHANNEL = 3  # Source: Tree-Ring's scripts, --w_channel 3
_STREAM = "gaussian-shading"


def _check_latent_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ValueError(f"latent shape must be (B, C, h, w); got {shape}")
    elements = shape[1] * shape[2] * shape[3]
    if elements % CODE_BITS:
        raise ValueError(f"the latent must hold a multiple of {CODE_BITS} elements per image (C·h·w) for the "
                         f"{CODE_BITS}-bit payload; got {shape[1]}×{shape[2]}×{shape[3]} = {elements} "
                         f"(use an image size whose latent area is a multiple of {CODE_BITS // shape[1]})")


def gaussian_shading_noise(code: torch.Tensor, key: str, shape: tuple[int, ...],
                           generator: torch.Generator) -> torch.Tensor:
    """Initial noise that carries the coded bits ``code`` under ``key`` and is still exactly N(0, I).

    Args:
        code: (256,) of 0/1, a codeword from :func:`~nodes.watermark.payload.encode_text`.
        key: the user's secret.
        shape: (B, C, h, w) with C·h·w a multiple of 256.
        generator: draws the magnitudes |z| (the seed).
    Returns:
        float32 noise of ``shape``: sign from the encrypted bit, magnitude from the generator.
    Example:
        >>> code = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(0))
        >>> noise = gaussian_shading_noise(code, "k", (1, 4, 8, 8), torch.Generator().manual_seed(1))
        >>> bool(((noise > 0).to(torch.uint8) == encrypted_bits(code, "k", (4, 8, 8))).all())
        True
    """
    if code.shape != (CODE_BITS,):
        raise ValueError(f"code must have shape ({CODE_BITS},); got {tuple(code.shape)}")
    _check_latent_shape(tuple(shape))
    bits = encrypted_bits(code, key, tuple(shape[1:]))
    magnitude = torch.randn(tuple(shape), generator=generator).abs()
    return magnitude * (bits.float() * 2 - 1)


def encrypted_bits(code: torch.Tensor, key: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The bits one latent (C, h, w) carries: ``code`` repeated round-robin, XOR the key's ChaCha20 stream."""
    elements = shape[0] * shape[1] * shape[2]
    tiled = code.to(torch.uint8).repeat(elements // CODE_BITS)
    return (tiled ^ chacha20_bits(key, _STREAM, elements)).reshape(shape)


def gaussian_shading_bits(latent: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the coded bits from (inverted) initial latents: sign, decrypt, majority vote over the copies.

    Args:
        latent: (B, C, h, w), C·h·w a multiple of 256.
        key: the user's secret.
    Returns:
        (bits (B, 256) of 0/1, votes (B, 256): the share of copies that voted 1).
    Example:
        >>> code = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(0))
        >>> noise = gaussian_shading_noise(code, "k", (1, 4, 16, 16), torch.Generator().manual_seed(1))
        >>> bits, votes = gaussian_shading_bits(noise, "k")
        >>> bool((bits[0] == code).all()), float(votes[0][code == 1].min())
        (True, 1.0)
    """
    _check_latent_shape(tuple(latent.shape))
    stream = chacha20_bits(key, _STREAM, latent[0].numel()).reshape(latent.shape[1:])
    decrypted = (latent.cpu() > 0).to(torch.uint8) ^ stream
    votes = decrypted.reshape(latent.shape[0], -1, CODE_BITS).float().mean(dim=1)
    # Source: Gaussian Shading's vote keeps a bit when more than half of its copies say 1 (threshold copies / 2).
    return (votes > 0.5).to(torch.uint8), votes


def tree_ring_mask(height: int, width: int) -> torch.Tensor:
    """The centred circular mask (h, w) of the ring key: radius 10 at 64 × 64, scaled with the latent."""
    radius = TREE_RING_RADIUS_AT_64 * min(height, width) / 64
    y = torch.arange(height, dtype=torch.float32) - height // 2
    x = torch.arange(width, dtype=torch.float32) - width // 2
    return (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2


def tree_ring_key(key: str, height: int, width: int) -> torch.Tensor:
    """The ring key (h, w), complex: Tree-Ring's "ring" pattern, concentric rings each holding one value of the
    FFT of a Gaussian latent drawn from ``key``."""
    generator = torch.Generator().manual_seed(key_seed(key, "tree-ring"))
    spectrum = torch.fft.fftshift(torch.fft.fft2(torch.randn(height, width, generator=generator)))
    y = torch.arange(height, dtype=torch.float32) - height // 2
    x = torch.arange(width, dtype=torch.float32) - width // 2
    distance = (y[:, None] ** 2 + x[None, :] ** 2).sqrt()
    pattern = torch.zeros(height, width, dtype=spectrum.dtype)
    radius = TREE_RING_RADIUS_AT_64 * min(height, width) / 64
    # Source: Tree-Ring get_watermarking_pattern("ring"): from the outer ring inwards, ring i takes the value
    # at (centre, centre + i) of the Gaussian's spectrum.
    for ring in range(math.ceil(radius), 0, -1):
        pattern[distance <= ring] = spectrum[height // 2, width // 2 + min(ring, width // 2 - 1)]
    return pattern


def tree_ring_noise(noise: torch.Tensor, key: str) -> torch.Tensor:
    """``noise`` (B, C, h, w) with the ring key written into channel 3's centred spectrum (real part kept).

    Example:
        >>> noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> tree_ring_distance(tree_ring_noise(noise, "k"), "k")[0] < tree_ring_distance(noise, "k")[0]
        tensor(True)
    """
    if noise.ndim != 4 or noise.shape[1] <= TREE_RING_CHANNEL:
        raise ValueError(f"noise must have shape (B, C, h, w) with C > {TREE_RING_CHANNEL}; "
                         f"got {tuple(noise.shape)}")
    height, width = noise.shape[-2:]
    mask = tree_ring_mask(height, width)
    spectrum = torch.fft.fftshift(torch.fft.fft2(noise[:, TREE_RING_CHANNEL].float()), dim=(-2, -1))
    spectrum[:, mask] = tree_ring_key(key, height, width)[mask]
    out = noise.clone().float()
    out[:, TREE_RING_CHANNEL] = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return out


def tree_ring_distance(latent: torch.Tensor, key: str) -> torch.Tensor:
    """Tree-Ring's score: the mean |FFT(x_T) − key| inside the mask, per image (B,); lower means watermarked."""
    height, width = latent.shape[-2:]
    mask = tree_ring_mask(height, width)
    spectrum = torch.fft.fftshift(torch.fft.fft2(latent[:, TREE_RING_CHANNEL].float().cpu()), dim=(-2, -1))
    return (spectrum[:, mask] - tree_ring_key(key, height, width)[mask]).abs().mean(dim=-1)


def _ring_index(height: int, width: int) -> torch.Tensor:
    """Which ring (1..R) each position of the centred spectrum belongs to; 0 outside the mask."""
    y = torch.arange(height, dtype=torch.float32) - height // 2
    x = torch.arange(width, dtype=torch.float32) - width // 2
    distance = (y[:, None] ** 2 + x[None, :] ** 2).sqrt()
    return torch.where(tree_ring_mask(height, width), distance.ceil().clamp(min=1), 0).long()


def tree_ring_p_value(latent: torch.Tensor, key: str) -> torch.Tensor:
    """The chance (B,) that a latent without the ring key lies as close to it: Tree-Ring's χ² test, on rings.

    Keeping the real part of the inverse FFT makes the embedded spectrum Hermitian, so inside the mask it holds
    Re(key), constant on each ring. Per ring r, the mean m_r of Re(FFT(x_T)) over its n_r positions is, without
    the key, normal with variance h·w / n_r (half the positions mirror the other half). η = Σ_r (m_r − Re k_r)²
    / var_r is then non-central χ² with R degrees of freedom and non-centrality λ = Σ_r (Re k_r)² / var_r, and
    P(χ² <= η) is the p-value (Wilson–Hilferty's normal approximation of the non-central χ²).

    Departure: Tree-Ring's test sums over every masked position as if they were independent, which overstates
    the evidence (the ring key repeats one value over each ring, and the spectrum mirrors itself).
    """
    height, width = latent.shape[-2:]
    rings = _ring_index(height, width)
    count = int(rings.max())
    sizes = torch.bincount(rings.flatten(), minlength=count + 1)[1:].double()
    key_real = tree_ring_key(key, height, width).real.double()
    key_rings = torch.zeros(count + 1, dtype=torch.float64).index_add_(0, rings.flatten(), key_real.flatten())
    key_rings = key_rings[1:] / sizes
    spectrum = torch.fft.fftshift(torch.fft.fft2(latent[:, TREE_RING_CHANNEL].double().cpu()), dim=(-2, -1)).real
    means = torch.zeros(latent.shape[0], count + 1, dtype=torch.float64).index_add_(
        1, rings.flatten(), spectrum.reshape(latent.shape[0], -1))[:, 1:] / sizes
    variance = height * width / sizes
    eta = ((means - key_rings) ** 2 / variance).sum(dim=-1)
    k, lam = count, float((key_rings ** 2 / variance).sum())
    # Wilson–Hilferty for the non-central χ²(k, λ): (η/(k+λ))^h is about normal.
    h = 1 - 2 * (k + lam) * (k + 3 * lam) / (3 * (k + 2 * lam) ** 2)
    p = (k + 2 * lam) / (k + lam) ** 2
    mean = 1 + h * p * (h - 1 - 0.5 * (2 - h) * (1 - 3 * h) * p)
    std = h * math.sqrt(2 * p) * (1 + 0.5 * (1 - h) * (1 - 3 * h) * p)
    z = ((eta / (k + lam)) ** h - mean) / std
    return 0.5 * torch.erfc(-z / math.sqrt(2))


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, latent: torch.Tensor, conditioning: Conditioning,
                steps: int = DEFAULT_INVERSION_STEPS) -> torch.Tensor:
    """Run deterministic DDIM backwards: from clean latents x_0 to the initial noise x_T that would produce them.

    x_{t'} = √ᾱ_{t'}·x̂_0 + √(1−ᾱ_{t'})·ε̂ with ε̂ = ε(x_t, t') and x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, for the
    timesteps t < t' of a ``steps``-step trailing grid, up to t = T−1; guidance 1 with ``conditioning`` (the empty
    prompt, as both papers invert). Reports progress once per step.

    Source: diffusers ``DDIMInverseScheduler`` (used by both papers' detectors); Tree-Ring ``inversion_utils``.

    Args:
        denoiser: the model's denoiser.
        latent: x_0 as the denoiser sees it (scaled), (B, C, h, w).
        conditioning: batch 1 or B.
        steps: inversion steps, >= 1.
    Returns:
        x_T, (B, C, h, w), unit variance where the inversion is exact.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    schedule = denoiser.schedule
    total = schedule.num_train_timesteps
    # The sampler node's DDIM grid (trailing spacing: T−1, ..., T/steps − 1), walked upwards from x_0 at t = 0.
    points = [0] + [round(total - i * total / steps) - 1 for i in range(steps - 1, -1, -1)]
    x = latent.float()
    for index, (t_from, t_to) in enumerate(zip(points[:-1], points[1:])):
        # ε is taken at the current point but the target timestep, as DDIMInverseScheduler does: the sampling step
        # t_to → t_from it undoes used ε(x_{t_to}, t_to). ᾱ of x_0 itself is 1 (set_alpha_to_one).
        t = torch.full((x.shape[0],), float(t_to), device=x.device)
        eps = guided_eps(denoiser, x, t, conditioning, conditioning, 1.0)
        alpha_from = 1.0 if index == 0 else float(schedule.alpha_bar(torch.tensor(float(t_from))))
        alpha_to = float(schedule.alpha_bar(torch.tensor(float(t_to))))
        x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
        x = alpha_to ** 0.5 * x0 + (1 - alpha_to) ** 0.5 * eps
        progress(index + 1, steps)
    return x
