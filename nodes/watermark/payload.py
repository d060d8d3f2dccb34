"""The watermark payload: text to error-corrected bits and back, the keyed bit streams, the exact null tails, and
the QR code a recovered text is rendered as.

Both carriers (the post-hoc image mark and the generative latent mark) carry a Reed-Solomon codeword over bytes
(``reedsolo``, a maintained pure-Python codec): the detector returns the exact text, or nothing, instead of
"bit accuracy 0.97". Source: Safe-SD (arXiv 2407.13188) asks for a payload that decodes to a verifiable object
(its QR watermark); we reach it without training, as ``watermark.md`` §4 says.

Keys are strings the user types; they are stretched into per-purpose 256-bit keys with SHA-256 and never stored
by this package. The generative mark seals its text (:func:`seal_text`): a fresh nonce per image, the text
encrypted under it and an HMAC tag, so that equal texts give unrelated codewords and a text nobody with the key
wrote fails :func:`open_sealed`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
import segno
from reedsolo import ReedSolomonError, RSCodec

QR_BORDER = 2  # quiet-zone modules around a rendered QR; the QR standard asks 4, 2 is enough for a preview
QR_MODULE_PX = 8  # pixels per QR module in the rendered image


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string; got {key!r}")


def derive_key(key: str, purpose: str) -> bytes:
    """A 256-bit key for one use (``purpose``) of the user's ``key``: SHA-256 with domain separation, so the
    post-hoc patterns, the latent cipher stream and the ring key never share bits.

    Example:
        >>> len(derive_key("secret", "gaussian-shading")), derive_key("a", "x") != derive_key("a", "y")
        (32, True)
    """
    _check_key(key)
    return hashlib.sha256(f"atelier-watermark/{purpose}/".encode() + key.encode("utf-8")).digest()


def key_seed(key: str, purpose: str) -> int:
    """A 63-bit seed for ``torch.Generator`` from ``key`` and ``purpose`` (for keyed permutations and signs)."""
    return int.from_bytes(derive_key(key, purpose)[:8], "little") >> 1


def chacha20_bytes(key: str, purpose: str, count: int, nonce: bytes = b"") -> bytes:
    """``count`` keystream bytes of ChaCha20 under the key derived for ``purpose``, for the image ``nonce``.

    Source: Gaussian Shading (arXiv 2404.04956), ``watermark.py`` of bsmhmmlf/Gaussian-Shading, which XORs its
    payload with a ChaCha20 stream so that the bits the latent carries are uniform whatever the payload.

    Example:
        >>> len(chacha20_bytes("k", "x", 5)), chacha20_bytes("k", "x", 5, b"a") != chacha20_bytes("k", "x", 5, b"b")
        (5, True)
    """
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}")
    material = derive_key(key, purpose)
    # The 16-byte nonce of cryptography's ChaCha20 is a 4-byte counter then a 12-byte nonce; both are hashed from
    # the key and the image's nonce, so any nonce length works and distinct nonces never share a stream.
    iv = hashlib.sha256(b"nonce/" + material + bytes(nonce)).digest()[:16]
    return Cipher(algorithms.ChaCha20(material, iv), mode=None).encryptor().update(bytes(count))


def chacha20_bits(key: str, purpose: str, count: int, nonce: bytes = b"") -> torch.Tensor:
    """``count`` keystream bits of :func:`chacha20_bytes`, as a uint8 tensor of 0/1.

    Example:
        >>> bits = chacha20_bits("secret", "test", 1000)
        >>> bits.shape, 400 < int(bits.sum()) < 600
        (torch.Size([1000]), True)
    """
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}")
    stream = chacha20_bytes(key, purpose, (count + 7) // 8, nonce)
    return torch.from_numpy(np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:count].copy())


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _mac(key: str, message: bytes, tag_bytes: int) -> bytes:
    return hmac.new(derive_key(key, "sealed-text-mac"), message, hashlib.sha256).digest()[:tag_bytes]


def seal_text(text: str, key: str, nonce: bytes, text_bytes: int, tag_bytes: int) -> bytes:
    """``nonce ‖ text ⊕ ChaCha20(key, nonce) ‖ HMAC-SHA256(key, nonce ‖ encrypted text)`` truncated to
    ``tag_bytes``: the data bytes the generative mark error-corrects (encrypt-then-MAC).

    The nonce is fresh per image, so two images with one key and text carry unrelated bytes, and only a key holder
    can make a tag that :func:`open_sealed` accepts.

    Raises:
        ValueError: the text is longer than ``text_bytes`` in UTF-8 or contains a NUL; an empty nonce.
    Example:
        >>> sealed = seal_text("hi", "k", b"\x01" * 6, 12, 4)
        >>> len(sealed), open_sealed(sealed, "k", 6, 4), open_sealed(sealed, "other", 6, 4)
        (22, 'hi', None)
    """
    if not nonce:
        raise ValueError("nonce must be non-empty")
    encrypted = _xor(_text_bytes(text, text_bytes), chacha20_bytes(key, "sealed-text", text_bytes, nonce))
    return bytes(nonce) + encrypted + _mac(key, bytes(nonce) + encrypted, tag_bytes)


def open_sealed(data: bytes, key: str, nonce_bytes: int, tag_bytes: int) -> str | None:
    """The text of :func:`seal_text`'s ``data`` when its tag verifies under ``key`` and it is UTF-8, else None."""
    nonce, encrypted, tag = data[:nonce_bytes], data[nonce_bytes:-tag_bytes], data[-tag_bytes:]
    if not hmac.compare_digest(tag, _mac(key, nonce + encrypted, tag_bytes)):
        return None
    try:
        return _xor(encrypted, chacha20_bytes(key, "sealed-text", len(encrypted), nonce)).rstrip(b"\x00").decode()
    except UnicodeDecodeError:
        return None


def bytes_to_bits(data: bytes) -> torch.Tensor:
    """Bits of ``data``, most significant first, uint8 0/1.

    Example:
        >>> bytes_to_bits(b"A").tolist()
        [0, 1, 0, 0, 0, 0, 0, 1]
    """
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8)).copy())


def bits_to_bytes(bits: torch.Tensor) -> bytes:
    """Inverse of :func:`bytes_to_bits`; the bit count must be a multiple of 8.

    Example:
        >>> bits_to_bytes(bytes_to_bits(b"hi"))
        b'hi'
    """
    if bits.ndim != 1 or bits.numel() % 8:
        raise ValueError(f"bits must be 1-D with a multiple of 8 entries; got shape {tuple(bits.shape)}")
    return np.packbits(bits.to(torch.uint8).numpy()).tobytes()


@functools.lru_cache(maxsize=None)
def _codec(parity_bytes: int) -> RSCodec:
    """One Reed-Solomon codec per parity size: building its tables costs more than a short encode."""
    return RSCodec(parity_bytes)


def encode_bytes(data: bytes, data_bytes: int, parity_bytes: int) -> torch.Tensor:
    """The Reed-Solomon codeword of ``data`` as bits: ``data``, zero-padded to ``data_bytes``, then
    ``parity_bytes`` parity bytes (corrects up to parity_bytes // 2 wrong bytes).

    Example:
        >>> encode_bytes(b"hi", 4, 4).shape
        torch.Size([64])
    """
    if len(data) > data_bytes:
        raise ValueError(f"payload must be at most {data_bytes} bytes; got {len(data)}")
    return bytes_to_bits(bytes(_codec(parity_bytes).encode(bytes(data).ljust(data_bytes, b"\x00"))))


def decode_bytes(bits: torch.Tensor, data_bytes: int, parity_bytes: int) -> tuple[bytes | None, int]:
    """Reed-Solomon decode ``bits``: (the ``data_bytes`` data bytes, bytes corrected), or (None, -1) when the
    errors are beyond the code.

    Example:
        >>> bits = encode_bytes(b"hi", 4, 4)
        >>> bits[:8] = 1 - bits[:8]  # one whole byte wrong
        >>> data, corrected = decode_bytes(bits, 4, 4)
        >>> data[:2], len(data), corrected
        (b'hi', 4, 1)
    """
    if bits.numel() != 8 * (data_bytes + parity_bytes):
        raise ValueError(f"bits must hold {data_bytes + parity_bytes} bytes; got {bits.numel()} bits")
    try:
        data, _, errata = _codec(parity_bytes).decode(bits_to_bytes(bits))
    except ReedSolomonError:
        return None, -1
    return bytes(data), len(errata)


def _text_bytes(text: str, capacity: int) -> bytes:
    """``text`` in UTF-8, NUL-padded to ``capacity`` bytes (NUL is the padding, so the text may not hold one)."""
    raw = text.encode("utf-8")
    if len(raw) > capacity or "\x00" in text:
        raise ValueError(f"payload must be at most {capacity} bytes of UTF-8 without NUL characters; got "
                         f"{len(raw)} bytes ({text!r})")
    return raw.ljust(capacity, b"\x00")


def encode_text(text: str, data_bytes: int, parity_bytes: int) -> torch.Tensor:
    """:func:`encode_bytes` of ``text`` in UTF-8; NUL is the padding byte, so the text may not contain it.

    Raises:
        ValueError: the text is longer than ``data_bytes`` in UTF-8, or contains a NUL.
    Example:
        >>> encode_text("hi", 4, 4).shape
        torch.Size([64])
    """
    return encode_bytes(_text_bytes(text, data_bytes), data_bytes, parity_bytes)


def decode_text(bits: torch.Tensor, data_bytes: int, parity_bytes: int) -> tuple[str | None, int]:
    """:func:`decode_bytes` back to the text: (text, bytes corrected), or (None, -1) when the errors are beyond
    the code or the corrected bytes are not UTF-8.

    Example:
        >>> decode_text(encode_text("hi", 4, 4), 4, 4)
        ('hi', 0)
    """
    data, corrected = decode_bytes(bits, data_bytes, parity_bytes)
    try:
        return (None, -1) if data is None else (data.rstrip(b"\x00").decode("utf-8"), corrected)
    except UnicodeDecodeError:
        return None, -1


def binomial_tail(n: int, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly: the chance that k of n random bits match by luck.

    Example:
        >>> binomial_tail(256, 167) < 1e-6 < binomial_tail(256, 166)
        True
    """
    if k <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def binomial_threshold(n: int, fpr: float) -> int:
    """The smallest match count k with P(X >= k) <= ``fpr`` under random bits: the exact tail, without Gaussian
    Shading's off-by-one (its code tests acc >= i/L where its tail was P(X >= i+1); ``watermark.md`` §2).

    Example:
        >>> binomial_threshold(256, 1e-6), binomial_threshold(256, 1e-3)
        (167, 154)
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1); got {fpr}")
    tail, k = 0.0, n + 1
    while k > 0 and tail + math.comb(n, k - 1) / 2 ** n <= fpr:
        k -= 1
        tail += math.comb(n, k) / 2 ** n
    return k


def rs_false_decode_probability(data_bytes: int, parity_bytes: int, corrected: int) -> float:
    """The chance that uniformly random bytes decode with at most ``corrected`` corrections: the p-value of a
    decode when no expected payload is known (codewords × Hamming-ball size / all words).

    Example:
        >>> rs_false_decode_probability(16, 16, 0) == 256.0 ** -16
        True
    """
    n = data_bytes + parity_bytes
    ball = sum(math.comb(n, i) * 255 ** i for i in range(corrected + 1))
    return min(1.0, ball / 256 ** parity_bytes)


def qr_image(text: str) -> torch.Tensor:
    """The QR code of ``text`` (segno, error level M) as an image (1, H, W, 3), dark modules black.

    Example:
        >>> qr_image("hi").shape  # version 1: 21 modules plus the border, 8 px each
        torch.Size([1, 200, 200, 3])
    """
    matrix = np.array(segno.make_qr(text, error="m").matrix, dtype=np.float32)
    matrix = np.pad(matrix, QR_BORDER)
    pixels = torch.from_numpy(1.0 - matrix).repeat_interleave(QR_MODULE_PX, 0).repeat_interleave(QR_MODULE_PX, 1)
    return pixels[None, :, :, None].expand(-1, -1, -1, 3).contiguous()
