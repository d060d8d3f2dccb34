"""Detection: from an image and a key to a payload, a bit accuracy, and a decision with an exact p-value.

Every decision is taken at a false-positive rate the user picks, from exact null tails (``watermark.md`` §9,
"honest metrics"):

- with the expected payload: the matched coded bits against Binomial(n, ½), P(X >= matches);
- without it: the chance that random bits decode under the Reed-Solomon code with as few corrections
  (:func:`~nodes.watermark.payload.rs_false_decode_probability`);
- Tree-Ring: its χ² test (:func:`~nodes.watermark.latent.tree_ring_p_value`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..common.denoiser import Conditioning, Denoiser, LatentCodec
from . import latent as generative
from .payload import binomial_tail, decode_text, encode_text, rs_false_decode_probability
from .posthoc import detect_posthoc

POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES = 4, 4  # 64 coded bits; corrects 2 wrong bytes
POSTHOC_CODE_BITS = 8 * (POSTHOC_DATA_BYTES + POSTHOC_PARITY_BYTES)


@dataclasses.dataclass(frozen=True)
class Detection:
    """What a detector found in one image."""

    mode: str
    payload: str | None  # the error-corrected text; None when nothing decodes (or zero-bit Tree-Ring)
    bit_accuracy: float | None  # coded bits matching the expected payload's codeword; None without one
    p_value: float  # the chance of so strong a reading in an image without this key's mark
    detected: bool  # p_value <= fpr
    fpr: float

    def summary(self) -> str:
        """One line for the node's display."""
        verdict = "watermarked" if self.detected else "no watermark found"
        accuracy = "" if self.bit_accuracy is None else f", bit accuracy {self.bit_accuracy:.3f}"
        payload = "" if self.payload is None else f", payload {self.payload!r}"
        return f"{self.mode}: {verdict} (p = {self.p_value:.3g} at FPR {self.fpr:g}{accuracy}{payload})"


def _decide(mode: str, bits: torch.Tensor, expected: str | None, data_bytes: int, parity_bytes: int,
            fpr: float) -> Detection:
    text, corrected = decode_text(bits, data_bytes, parity_bytes)
    if expected is not None:
        truth = encode_text(expected, data_bytes, parity_bytes)
        matches = int((bits == truth).sum())
        p_value = binomial_tail(bits.numel(), matches)
        accuracy = matches / bits.numel()
    else:
        p_value = 1.0 if text is None else rs_false_decode_probability(data_bytes, parity_bytes, corrected)
        accuracy = None
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
    bits, _ = detect_posthoc(image, POSTHOC_CODE_BITS, key,
                             accept=lambda b: decode_text(b, POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES)[0] is not None)
    return [_decide("post-hoc", row, expected, POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES, fpr) for row in bits]


def invert_image(image: torch.Tensor, denoiser: Denoiser, codec: LatentCodec, empty: Conditioning,
                 steps: int) -> torch.Tensor:
    """The initial latents x_T (B, C, h, w) an image came from: VAE encode (posterior mean), scale, DDIM
    inversion with the empty prompt and guidance 1."""
    scaled = (codec.encode(image) - codec.shift_factor) * codec.scaling_factor
    return generative.ddim_invert(denoiser, scaled, empty, steps)


def detect_generative(initial: torch.Tensor, key: str, mode: str, expected: str | None,
                      fpr: float) -> list[Detection]:
    """Generative detection on inverted initial latents (B, C, h, w): ``mode`` "gaussian_shading" or
    "tree_ring".

    Example:
        >>> code = encode_text("hello", 16, 16)
        >>> noise = generative.gaussian_shading_noise(code, "k", (1, 4, 16, 16), torch.Generator().manual_seed(0))
        >>> found = detect_generative(noise, "k", "gaussian_shading", "hello", 1e-6)[0]
        >>> found.payload, found.bit_accuracy, found.detected
        ('hello', 1.0, True)
    """
    _check_fpr(fpr)
    if mode == "tree_ring":
        return [Detection("tree-ring", None, None, float(p), float(p) <= fpr, fpr)
                for p in generative.tree_ring_p_value(initial, key)]
    if mode != "gaussian_shading":
        raise ValueError(f"mode must be 'gaussian_shading' or 'tree_ring'; got {mode!r}")
    bits, _ = generative.gaussian_shading_bits(initial, key)
    return [_decide("gaussian shading", row, expected, generative.DATA_BYTES, generative.PARITY_BYTES, fpr)
            for row in bits]
