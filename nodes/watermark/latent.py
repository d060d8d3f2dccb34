"""The generative watermarks: written into the initial latent, read back by DDIM inversion. Training-free.

**Gaussian Shading** (multi-bit). A 256-bit Reed-Solomon codeword is tiled over the latent, XORed with a ChaCha20
stream under the user's key, and each element of the initial noise is drawn from the half of N(0, 1) its
encrypted bit names: |z| for 1, −|z| for 0. The stream is uniform, so each element is still exactly N(0, 1)
("performance-lossless"). The detector inverts the image back to its initial noise, takes signs, decrypts, votes
over the copies and corrects errors.

The codeword's data is sealed (:func:`~nodes.watermark.payload.seal_text`): a fresh 48-bit nonce per image, the
text encrypted under it, and a 32-bit HMAC tag. Two images under one key and text therefore carry unrelated
codewords (their noises are as uncorrelated as independent draws), the detector reads the nonce back from the
image itself, and a text is reported only when its tag verifies under the key.

**Tree-Ring** (zero-bit). A ring key replaces the centre of one channel's Fourier spectrum; the detector
measures the L1 distance between the inverted latent's spectrum and the key inside the mask, and calibrates it
against the distances of a non-watermarked latent (complex Gaussian ring values).

Sources: Gaussian Shading (Yang et al., CVPR 2024, arXiv 2404.04956), bsmhmmlf/Gaussian-Shading ``watermark.py``
(``Gaussian_Shading_chacha``: ``truncSampling``, ``diffusion_inverse``, ``eval_watermark``), defaults
``channel_copy 1``, ``hw_copy 8`` (k = 256 bits, a 4 × 8 × 8 block tiled over the latent), inversion with an
empty prompt, guidance 1; Tree-Ring (Wen et al., NeurIPS 2023, arXiv 2305.20030), YuxinWenRick/tree-ring-watermark
``optim_utils.py`` (``get_watermarking_pattern`` "ring", ``get_watermarking_mask``, ``eval_watermark``), defaults
``w_channel 3``, ``w_radius 10`` at a 64×64 latent, ``w_seed 999999``; exact inversion (Hong et al., "On Exact
Inversion of DPM-Solvers", CVPR 2024, smhongok/inv-dpm: Algorithm 1's corrected DDIM steps and ``decoder_inv``).

Departures: (1) the official code draws a fresh ChaCha20 key and nonce per image and keeps them in a key store;
ours keeps one key per user and puts the fresh nonce inside the error-corrected data, with the text encrypted
under it and authenticated (the stream that hides the codeword's layout stays one per key); (2) the 256 slots
of the tiled block carry the codeword's bits in a keyed order, so the XOR of two images' signs does not show the
Reed-Solomon structure to someone without the key; (3) the block tiles latents of any size of at least one
block (copies at the edges are partial), not only 64 × 64; (4) the ring radius scales with the latent (10 at
64 × 64); (5) Tree-Ring's key comes from the user's key, not seed 999999, and its p-value is the paper's χ² test
taken on ring means (see :func:`tree_ring_p_value`).

Notation: x_T = the initial latent (the denoiser's scale); k = ``CODE_BITS``; r = ring radius; ᾱ_t as in
``nodes.common.denoiser``.
"""

from __future__ import annotations

import math

import torch

from ..common.denoiser import Conditioning, Denoiser, guided_eps
from ..common.progress import progress
from ..sampling.ddim import ddim_step
from .payload import chacha20_bits, encode_bytes, key_seed, seal_text

NONCE_BYTES, TEXT_BYTES, TAG_BYTES = 6, 12, 4  # a 48-bit nonce per image, 12 bytes of text, a 32-bit tag
DATA_BYTES, PARITY_BYTES = NONCE_BYTES + TEXT_BYTES + TAG_BYTES, 10  # 32 bytes; corrects 5 wrong bytes
CODE_BITS = 8 * (DATA_BYTES + PARITY_BYTES)  # 256, Gaussian Shading's k
NONCE_BITS = 8 * NONCE_BYTES  # the codeword's first bits (the code is systematic)
DEFAULT_INVERSION_STEPS = 50  # Source: Gaussian Shading and Tree-Ring, inversion with 50 DDIM steps
TREE_RING_RADIUS_AT_64 = 10  # Source: Tree-Ring, --w_radius 10 at the 64 × 64 latent of 512² images
TREE_RING_CHANNEL = 3  # Source: Tree-Ring's scripts, --w_channel 3
_STREAM = "gaussian-shading"
_ORDER = "gaussian-shading-order"


def block_shape(channels: int) -> tuple[int, int, int]:
    """The (C, bh, bw) block of ``CODE_BITS`` slots that tiles the latent: 4 × 8 × 8 for four channels (the
    official ``hw_copy 8``), square otherwise."""
    side = math.isqrt(CODE_BITS // channels) if CODE_BITS % channels == 0 else 0
    if channels * side * side != CODE_BITS:
        raise ValueError(f"a {channels}-channel latent cannot hold a square block of {CODE_BITS} bits; "
                         f"channels must be 1, 4, 16 or 64")
    return channels, side, side


def _check_latent_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ValueError(f"latent shape must be (B, C, h, w); got {shape}")
    _, bh, bw = block_shape(shape[1])
    if shape[2] < bh or shape[3] < bw:
        raise ValueError(f"the latent must be at least {bh}×{bw} to hold the {CODE_BITS}-bit payload once; "
                         f"got {shape[2]}×{shape[3]}")


def bit_layout(key: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Which codeword bit each element of a (C, h, w) latent carries: the block tiled over the area (as the
    official ``repeat(1, ch, hw, hw)``), so every bit's copies sit on a regular lattice over the whole latent and
    a crop of any quarter costs each bit about a quarter of its copies; the block's slots in a keyed order.

    Example:
        >>> layout = bit_layout("k", (4, 16, 16))
        >>> torch.bincount(layout.flatten()).unique().tolist()  # 4 copies of each bit
        [4]
        >>> torch.equal(layout[:, :8, :8], layout[:, 8:, 8:])
        True
    """
    channels, height, width = shape
    _, bh, bw = block_shape(channels)
    order = torch.randperm(CODE_BITS, generator=torch.Generator().manual_seed(key_seed(key, _ORDER)))
    block = order.reshape(channels, bh, bw)
    rows = torch.arange(height) % bh
    columns = torch.arange(width) % bw
    return block[:, rows[:, None], columns[None, :]]


def gaussian_shading_code(text: str, key: str, nonce: bytes) -> torch.Tensor:
    """The codeword (256,) of 0/1 for ``text`` sealed under ``key`` and the image's ``nonce`` (NONCE_BYTES).

    Example:
        >>> a, b = gaussian_shading_code("hi", "k", bytes(6)), gaussian_shading_code("hi", "k", b"\x01" * 6)
        >>> a.shape, 0.3 < float((a != b).float().mean()) < 0.7
        (torch.Size([256]), True)
    """
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes; got {len(nonce)}")
    return encode_bytes(seal_text(text, key, nonce, TEXT_BYTES, TAG_BYTES), DATA_BYTES, PARITY_BYTES)


def gaussian_shading_noise(codes: torch.Tensor, key: str, shape: tuple[int, ...],
                           generator: torch.Generator) -> torch.Tensor:
    """Initial noise that carries the coded bits ``codes`` under ``key`` and is still exactly N(0, I).

    Args:
        codes: (B, 256) of 0/1, one codeword per image (:func:`gaussian_shading_code`, each with its own nonce).
        key: the user's secret.
        shape: (B, C, h, w), h and w at least the block's (8 × 8 for four channels).
        generator: draws the magnitudes |z| (the seed).
    Returns:
        float32 noise of ``shape``: sign from the encrypted bit, magnitude from the generator.
    Example:
        >>> code = gaussian_shading_code("hi", "k", bytes(6))
        >>> noise = gaussian_shading_noise(code[None], "k", (1, 4, 8, 8), torch.Generator().manual_seed(1))
        >>> bool(((noise[0] > 0).to(torch.uint8) == encrypted_bits(code, "k", (4, 8, 8))).all())
        True
    """
    _check_latent_shape(tuple(shape))
    if codes.shape != (shape[0], CODE_BITS):
        raise ValueError(f"codes must have shape ({shape[0]}, {CODE_BITS}); got {tuple(codes.shape)}")
    bits = encrypted_bits(codes, key, tuple(shape[1:]))
    magnitude = torch.randn(tuple(shape), generator=generator).abs()
    return magnitude * (bits.float() * 2 - 1)


def encrypted_bits(codes: torch.Tensor, key: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The bits latents (C, h, w) carry: each codeword of ``codes`` (..., 256) laid out by :func:`bit_layout`,
    XOR the key's ChaCha20 stream over every element; shape (..., C, h, w)."""
    elements = shape[0] * shape[1] * shape[2]
    laid_out = codes.to(torch.uint8)[..., bit_layout(key, shape)]
    return laid_out ^ chacha20_bits(key, _STREAM, elements).reshape(shape)


def gaussian_shading_bits(latent: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the coded bits from (inverted) initial latents: decrypt each element's sign, then let each bit's
    copies vote, each weighted by its magnitude.

    Departure: Gaussian Shading counts the copies' signs (a bit is 1 when more than half say so). Weighing each
    copy by |x| is the better estimate where inversion errs (its errors sit near 0) and breaks the ties an even
    number of copies meets: on the tiny test model (4 copies) it reads every bit where the count reads 97 %. With
    one copy both are the sign.

    Args:
        latent: (B, C, h, w).
        key: the user's secret.
    Returns:
        (bits (B, 256) of 0/1, soft (B, 256): the mean over each bit's copies of the decrypted latent value,
        positive for 1; its magnitude is the bit's reliability).
    Example:
        >>> code = gaussian_shading_code("hi", "k", bytes(6))
        >>> noise = gaussian_shading_noise(code[None], "k", (1, 4, 16, 16), torch.Generator().manual_seed(1))
        >>> bits, soft = gaussian_shading_bits(noise, "k")
        >>> bool((bits[0] == code).all()), bool(((soft[0] > 0) == code.bool()).all())
        (True, True)
    """
    _check_latent_shape(tuple(latent.shape))
    layout = bit_layout(key, tuple(latent.shape[1:])).flatten()
    stream = chacha20_bits(key, _STREAM, latent[0].numel())
    flat = latent.detach().float().cpu().reshape(latent.shape[0], -1)
    signed = flat * (1 - 2 * stream.float())  # the value as if its stream bit were 0: positive reads 1
    copies = torch.bincount(layout, minlength=CODE_BITS).float()
    soft = torch.zeros(latent.shape[0], CODE_BITS).index_add_(1, layout, signed) / copies
    return (soft > 0).to(torch.uint8), soft


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


EXACT_STEP_SIZE = 0.5  # Source: Hong et al.'s code, _fixedpoint_correction(step_size=0.5) for DDIM
EXACT_WARMUP = 20  # Source: idem, warmup_time 20: the step grows linearly over the first 20 iterations
EXACT_PATIENCE, EXACT_FACTOR = 20, 0.5  # Source: idem, the step halves after 20 iterations without improvement
EXACT_TOLERANCE = 1e-3  # Source: idem, th 1e-3 on the summed squared residual (per image here)
DECODER_ITERATIONS, DECODER_LR, DECODER_WARMUP = 100, 0.1, 10  # Source: Hong et al.'s decoder_inv: Adam, cosine


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, latent: torch.Tensor, conditioning: Conditioning,
                steps: int = DEFAULT_INVERSION_STEPS, exact_iterations: int = 0,
                negative: Conditioning | None = None, cfg: float = 1.0) -> torch.Tensor:
    """Run deterministic DDIM backwards: from clean latents x_0 to the initial noise x_T that would produce them.

    x_{t'} = √ᾱ_{t'}·x̂_0 + √(1−ᾱ_{t'})·ε̂ with ε̂ = ε(x_t, t') and x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, for the
    timesteps t < t' of a ``steps``-step trailing grid, up to t = T−1; guidance 1 with ``conditioning`` (the empty
    prompt, as both papers invert). Reports progress once per step.

    That step only approximates the inverse: sampling took ε at x_{t'}, which inversion does not know yet. With
    ``exact_iterations`` > 0 each step is then corrected until sampling from x_{t'} lands on x_t (Hong et al.,
    "On Exact Inversion of DPM-Solvers", CVPR 2024, Algorithm 1 and its code's ``_fixedpoint_correction``: the
    forward step method x_{t'} ← x_{t'} − η·(DDIM(x_{t'}) − x_t), η = 0.5 warmed up over 20 iterations and halved
    after 20 without improvement, stopped when the summed squared residual is below 1e-3; the official code
    allows up to 500 iterations per step, the caller chooses here).

    Source: diffusers ``DDIMInverseScheduler`` (used by both papers' detectors); Tree-Ring ``inversion_utils``.

    Args:
        denoiser: the model's denoiser.
        latent: x_0 as the denoiser sees it (scaled), (B, C, h, w).
        conditioning: batch 1 or B.
        steps: inversion steps, >= 1.
        exact_iterations: correction iterations per step (0: plain DDIM inversion).
        negative, cfg: guidance, for measuring what the detector's unguided empty prompt costs (default: none).
    Returns:
        x_T, (B, C, h, w), unit variance where the inversion is exact.
    """
    if steps < 1 or exact_iterations < 0:
        raise ValueError(f"steps must be >= 1 and exact_iterations >= 0; got {steps}, {exact_iterations}")
    schedule = denoiser.schedule
    total = schedule.num_train_timesteps
    negative = conditioning if negative is None else negative
    # The sampler node's DDIM grid (trailing spacing: T−1, ..., T/steps − 1), walked upwards from x_0 at t = 0.
    points = [0] + [round(total - i * total / steps) - 1 for i in range(steps - 1, -1, -1)]
    x = latent.float()
    for index, (t_from, t_to) in enumerate(zip(points[:-1], points[1:])):
        t = torch.full((x.shape[0],), float(t_to), device=x.device)

        def eps_at(point: torch.Tensor) -> torch.Tensor:
            return guided_eps(denoiser, point, t, conditioning, negative, cfg)

        # ᾱ of x_0 itself is 1 (set_alpha_to_one). ε is taken at the current point but the target timestep, as
        # DDIMInverseScheduler does: the sampling step t_to → t_from it undoes used ε(x_{t_to}, t_to).
        alpha_from = 1.0 if index == 0 else float(schedule.alpha_bar(torch.tensor(float(t_from))))
        alpha_to = float(schedule.alpha_bar(torch.tensor(float(t_to))))
        target = x
        x = ddim_step(target, eps_at(target), alpha_from, alpha_to)
        if exact_iterations:
            x = _correct_step(eps_at, x, target, alpha_to, alpha_from, exact_iterations)
        progress(index + 1, steps)
    return x


def _correct_step(eps_at, x: torch.Tensor, target: torch.Tensor, alpha_noisy: float, alpha_clean: float,
                  iterations: int) -> torch.Tensor:
    """Hong et al.'s forward step method: move x (the noisier point) until its DDIM step lands on ``target``.

    Per image: each keeps its own step size and stops on its own residual. Departure: the iterate with the smallest
    residual is returned, not the last, so a step where the iteration diverges (measured on the embedded model's
    first step, x_0 → t = 49, where ε is steepest) falls back to the plain inversion instead of drifting.
    """
    batch = x.shape[0]
    shape = (-1, *([1] * (x.ndim - 1)))
    step = torch.full((batch,), EXACT_STEP_SIZE, dtype=x.dtype, device=x.device)
    best = torch.full((batch,), float("inf"), dtype=x.dtype, device=x.device)
    best_x = x
    stale = torch.zeros(batch, dtype=torch.long, device=x.device)
    for iteration in range(iterations):
        residual = ddim_step(x, eps_at(x), alpha_noisy, alpha_clean) - target
        loss = residual.square().flatten(1).sum(dim=1)
        improved = loss < best
        best = torch.where(improved, loss, best)
        best_x = torch.where(improved.reshape(shape), x, best_x)
        active = best >= EXACT_TOLERANCE
        if not bool(active.any()):
            break
        stale = torch.where(improved, 0, stale + 1)
        halve = stale > EXACT_PATIENCE
        step = torch.where(halve, step * EXACT_FACTOR, step)
        stale = torch.where(halve, 0, stale)
        warm = min(1.0, (iteration + 1) / EXACT_WARMUP)
        x = x - (step * warm * active).reshape(shape) * residual
    return best_x


def decoder_inversion(decode, image: torch.Tensor, initial: torch.Tensor,
                      iterations: int = DECODER_ITERATIONS) -> torch.Tensor:
    """The latent whose decoding is ``image``: gradient descent on the latent from the encoder's guess.

    Source: Hong et al. (CVPR 2024), ``decoder_inv``: Adam at lr 0.1 with a cosine schedule (10 warm-up steps)
    over 100 iterations, on the summed squared error of the decoded image in [−1, 1]. Departure: it starts from
    the posterior mean (what the detector encodes with) where the official code starts from a posterior sample.

    Args:
        decode: differentiable, scaled latents (B, C, h, w) → images (B, 3, H, W) in [−1, 1] (unclamped).
        image: (B, 3, H, W) in [0, 1].
        initial: the encoder's scaled latents (B, C, h, w).
        iterations: Adam steps.
    Returns:
        Scaled latents (B, C, h, w), detached.
    """
    if image.ndim != 4 or initial.ndim != 4 or image.shape[0] != initial.shape[0]:
        raise ValueError(f"image (B, 3, H, W) and initial (B, C, h, w) must share B; got {tuple(image.shape)}, "
                         f"{tuple(initial.shape)}")
    target = image.float() * 2 - 1
    latent = initial.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=DECODER_LR)

    def cosine_with_warmup(step: int) -> float:
        if step < DECODER_WARMUP:
            return (step + 1) / DECODER_WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - DECODER_WARMUP) / max(1, iterations - DECODER_WARMUP)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
    with torch.enable_grad():
        for _ in range(iterations):
            loss = (decode(latent) - target).square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return latent.detach()
