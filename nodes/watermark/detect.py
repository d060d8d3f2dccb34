"""Detection: from an image and a key to a payload, a bit accuracy, and a decision with an exact p-value.

Every decision is taken at a false-positive rate the user picks, from exact null tails (``watermark.md`` §9,
"honest metrics"):

- with the expected payload: the matched coded bits against Binomial(n, ½), P(X >= matches);
- without it: the chance that random bits decode under the Reed-Solomon code with as few corrections
  (:func:`~nodes.watermark.payload.rs_false_decode_probability`);
- Tree-Ring: its χ² test (:func:`~nodes.watermark.latent.tree_ring_p_value`).

The post-hoc detector reads each image up to ``MAX_READINGS`` ways and keeps the first that decodes, so its
p-value is the chosen reading's times ``MAX_READINGS`` (a union bound over the readings).

Gaussian Shading's sealed codeword changes both: without the expected text a payload counts only when its HMAC
tag verifies, which random bits do with chance 2^-32 on top of decoding; with it, the expected codeword depends on
the image's nonce, which the detector reads from the image's own nonce bits. It tries the ``NONCE_CANDIDATES``
nonces those bits give when their least reliable ones are flipped, compares the other 208 bits with each
candidate's codeword, and multiplies the best tail by the number of candidates (a union bound: the false-positive
rate stays at most the one asked for, whatever the image).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..common.denoiser import Conditioning, Denoiser, LatentCodec
from . import latent as generative
from .payload import (binomial_tail, bits_to_bytes, decode_bytes, decode_text, encode_text,
                      open_sealed, rs_false_decode_probability)
from .posthoc import MAX_READINGS, detect_posthoc

POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES = 4, 4  # 64 coded bits; corrects 2 wrong bytes
POSTHOC_CODE_BITS = 8 * (POSTHOC_DATA_BYTES + POSTHOC_PARITY_BYTES)
NONCE_FLIPS = 8  # the least reliable nonce bits tried both ways: 2^8 nonces, and the Reed-Solomon-corrected one
NONCE_CANDIDATES = 2 ** NONCE_FLIPS + 1


@dataclasses.dataclass(frozen=True)
class Detection:
    """What a detector found in one image."""

    mode: str
    payload: str | None  # the error-corrected text; None when nothing decodes (or zero-bit Tree-Ring)
    bit_accuracy: float | None  # coded bits matching the expected payload's codeword; None without one
    p_value: float  # the chance of so strong a reading in an image without this key's mark
    detected: bool  # p_value <= fpr
    fpr: float
    nonce: str | None = None  # Gaussian Shading: the mark's per-image nonce (hex) when its payload verifies

    def summary(self) -> str:
        """One line for the node's display."""
        verdict = "watermarked" if self.detected else "no watermark found"
        accuracy = "" if self.bit_accuracy is None else f", bit accuracy {self.bit_accuracy:.3f}"
        payload = "" if self.payload is None else f", payload {self.payload!r}"
        nonce = "" if self.nonce is None else f", mark {self.nonce}"
        return f"{self.mode}: {verdict} (p = {self.p_value:.3g} at FPR {self.fpr:g}{accuracy}{payload}{nonce})"


def _decide(mode: str, bits: torch.Tensor, soft: torch.Tensor, expected: str | None, data_bytes: int,
            parity_bytes: int, fpr: float, readings: int) -> Detection:
    """The decision on ``bits`` (their correlations ``soft``), the reading a detector chose among ``readings``: each
    was a chance for an unmarked image to pass, so the single reading's p-value is multiplied by their number (a
    union bound).

    A bit whose correlation is exactly 0 was not read (a flat region, such as a black background, correlates with
    nothing): its 0 is no coin flip, and a word of such zeros is a codeword (the empty text). It counts as wrong
    against an expected text, and a word holding one does not decode."""
    read = soft != 0
    text, corrected = decode_text(bits, data_bytes, parity_bytes) if bool(read.all()) else (None, -1)
    if expected is not None:
        truth = encode_text(expected, data_bytes, parity_bytes)
        matches = int(((bits == truth) & read).sum())
        single = binomial_tail(bits.numel(), matches)
        accuracy = matches / bits.numel()
    else:
        single = 1.0 if text is None else rs_false_decode_probability(data_bytes, parity_bytes, corrected)
        accuracy = None
    p_value = min(1.0, readings * single)
    return Detection(mode, text, accuracy, p_value, p_value <= fpr, fpr)


def _check_fpr(fpr: float) -> None:
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1); got {fpr}")


def detect_posthoc_payload(image: torch.Tensor, key: str, expected: str | None, fpr: float) -> list[Detection]:
    """Post-hoc detection, one :class:`Detection` per image of ``image`` (B, 3, H, W) in [0, 1].

    Example:
        >>> from nodes.watermark.posthoc import embed_posthoc
        >>> marked = embed_posthoc(torch.rand(1, 3, 128, 128), encode_text("ok", 4, 4), "k")
        >>> found = detect_posthoc_payload(marked, "k", None, 1e-3)[0]
        >>> found.payload, found.detected
        ('ok', True)
    """
    _check_fpr(fpr)
    # The factor is MAX_READINGS, not the number of readings this image was given: the detector stops at the
    # first reading that decodes, so a count read off the image would depend on the readings themselves (a decode
    # at the k-th reading multiplied by k bounds the rate only by (1 + 1/2 + … + 1/12) · fpr ≈ 3.1 fpr), and the
    # template that decides whether the zoomed readings are tried is the image's own. A constant factor keeps the
    # bound whatever the image, as NONCE_CANDIDATES does for Gaussian Shading.
    bits, soft = detect_posthoc(
        image, POSTHOC_CODE_BITS, key,
        accept=lambda b: decode_text(b, POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES)[0] is not None)
    return [_decide("post-hoc", row, correlations, expected, POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES, fpr,
                    MAX_READINGS) for row, correlations in zip(bits, soft)]


def invert_image(image: torch.Tensor, denoiser: Denoiser, codec: LatentCodec, empty: Conditioning,
                 steps: int, exact_iterations: int = 0, decode=None) -> torch.Tensor:
    """The initial latents x_T (B, C, h, w) an image came from: VAE encode (posterior mean), scale, DDIM
    inversion with the empty prompt and guidance 1.

    With ``exact_iterations`` > 0 and a differentiable ``decode`` (scaled latents → images in [−1, 1]), the
    encoder's latent is refined by decoder inversion and each DDIM step is corrected (Hong et al., CVPR 2024:
    :func:`~nodes.watermark.latent.decoder_inversion`, :func:`~nodes.watermark.latent.ddim_invert`).
    """
    scaled = (codec.encode(image) - codec.shift_factor) * codec.scaling_factor
    if exact_iterations and decode is not None:
        scaled = generative.decoder_inversion(decode, image.to(scaled.device), scaled)
    return generative.ddim_invert(denoiser, scaled, empty, steps, exact_iterations)


def nonce_candidates(bits: torch.Tensor, soft: torch.Tensor, corrected: bytes | None) -> list[bytes]:
    """The ``NONCE_CANDIDATES`` nonces an image's read codeword (256,) gives: the Reed-Solomon-corrected nonce
    (or the read one when decoding failed), then the read nonce bits with every subset of the ``NONCE_FLIPS``
    least reliable (smallest |soft|) flipped. Always that many, so the union bound's factor does not depend on
    the image."""
    read = bits[:generative.NONCE_BITS].clone()
    weakest = soft[:generative.NONCE_BITS].abs().argsort()[:NONCE_FLIPS]
    found = [corrected[:generative.NONCE_BYTES] if corrected is not None else bits_to_bytes(read)]
    for flips in itertools.product((0, 1), repeat=NONCE_FLIPS):
        candidate = read.clone()
        candidate[weakest] ^= torch.tensor(flips, dtype=torch.uint8)
        found.append(bits_to_bytes(candidate))
    return found


def decide_gaussian_shading(bits: torch.Tensor, soft: torch.Tensor, key: str, expected: str | None,
                            fpr: float) -> Detection:
    """The decision on one image's read codeword: bits (256,) and soft values (256,) from
    :func:`~nodes.watermark.latent.gaussian_shading_bits`.

    The payload is reported only when the codeword decodes and its tag verifies under ``key``. Without an
    expected text, p = P(random bits decode with as few corrections) · 2^-32 (the tag); with one, p is the union
    bound over :func:`nonce_candidates` of the Binomial(208, ½) tail of the non-nonce bits matching that nonce's
    codeword, and the bit accuracy is the best candidate's share of those 208 bits.
    """
    data, corrected = decode_bytes(bits, generative.DATA_BYTES, generative.PARITY_BYTES)
    text = None if data is None else open_sealed(data, key, generative.NONCE_BYTES, generative.TAG_BYTES)
    nonce = None if text is None else data[:generative.NONCE_BYTES].hex()
    if expected is None:
        p_value = 1.0 if text is None else (rs_false_decode_probability(
            generative.DATA_BYTES, generative.PARITY_BYTES, corrected) * 2.0 ** (-8 * generative.TAG_BYTES))
        return Detection("gaussian shading", text, None, p_value, p_value <= fpr, fpr, nonce)
    compared = generative.CODE_BITS - generative.NONCE_BITS
    payload_bits = bits[generative.NONCE_BITS:]
    best = max(int((payload_bits == generative.gaussian_shading_code(expected, key, candidate)[
        generative.NONCE_BITS:]).sum()) for candidate in nonce_candidates(bits, soft, data))
    p_value = min(1.0, NONCE_CANDIDATES * binomial_tail(compared, best))
    return Detection("gaussian shading", text, best / compared, p_value, p_value <= fpr, fpr, nonce)


def detect_generative(initial: torch.Tensor, key: str, mode: str, expected: str | None,
                      fpr: float) -> list[Detection]:
    """Generative detection on inverted initial latents (B, C, h, w): ``mode`` "gaussian_shading" or
    "tree_ring".

    Example:
        >>> code = generative.gaussian_shading_code("hello", "k", bytes(6))
        >>> noise = generative.gaussian_shading_noise(code[None], "k", (1, 4, 16, 16),
        ...                                           torch.Generator().manual_seed(0))
        >>> found = detect_generative(noise, "k", "gaussian_shading", "hello", 1e-6)[0]
        >>> found.payload, found.bit_accuracy, found.detected, found.nonce
        ('hello', 1.0, True, '000000000000')
    """
    _check_fpr(fpr)
    if mode == "tree_ring":
        return [Detection("tree-ring", None, None, float(p), float(p) <= fpr, fpr)
                for p in generative.tree_ring_p_value(initial, key)]
    if mode != "gaussian_shading":
        raise ValueError(f"mode must be 'gaussian_shading' or 'tree_ring'; got {mode!r}")
    bits, soft = generative.gaussian_shading_bits(initial, key)
    return [decide_gaussian_shading(row, row_soft, key, expected, fpr) for row, row_soft in zip(bits, soft)]
