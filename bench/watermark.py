"""Invisible watermark (issue #9): our post-hoc mark against invisible-watermark's dwtDct and dwtDctSvd.

Four natural images shipped with scikit-image (astronaut, coffee, chelsea, rocket), centre-cropped and
area-resized to 512×512, as ``watermark.md`` §3.3. For each image and each of ``--payloads`` random 32-bit
payloads, every method embeds, then decodes after each attack of the suite: JPEG 50 and 25, resize 0.5× and
back, centre crop 80 % + resize back, Gaussian noise σ 0.05 (clipped), brightness +20 %, Gaussian blur σ 1.
Methods run interleaved in one process, on the same images, payloads and attacked copies.

- Ours: the 32 payload bits are 4 bytes under a Reed-Solomon code with 4 parity bytes (64 coded bits); bit
  accuracy counts the 32 payload bits after error correction (the raw systematic bits where it fails).
- invisible-watermark: 32 raw bits, ``WatermarkEncoder.set_watermark("bits", ...)`` then ``encode(bgr, method)``.
- PSNR over RGB of the 8-bit watermarked image; embed and detect ms are medians over all calls (detect on the
  clean watermarked image), single-threaded.

Generative mode (Gaussian Shading) on the shipped embedded model: ``--gen-images`` held-out captions (quick: 3),
64×64 (its training size; the latent holds exactly one copy of each of the 256 coded bits), DDIM 20 steps, guidance
1 (the inversion's own setting), each from watermarked noise under one key and a random 16-byte payload; every
attack of the suite above, then VAE encode and 20-step DDIM inversion with the empty prompt. Bit accuracy counts
the 256 coded bits against the payload's codeword; ``gen_tpr_at_1e-6`` is the share of un-attacked images whose
matches reach the exact Binomial(256, ½) threshold for FPR 1e-6 (167).

    python bench/watermark.py [--quick]

Ends with ``BENCH watermark psnr_db=... jpeg50=... brightness=... crop_resize=... embed_ms=... detect_ms=...
gen_jpeg50=... gen_tpr_at_1e-6=...`` (ours; the peers' figures are printed above it). Targets: PSNR >= 42 dB; bit
accuracy >= 0.95 at JPEG-50 and brightness, >= 0.90 at crop + resize; <= 30 ms to embed and to detect.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from imwatermark import WatermarkDecoder, WatermarkEncoder  # noqa: E402
from skimage import data  # noqa: E402

from nodes.watermark import latent as generative  # noqa: E402
from nodes.watermark.detect import invert_image  # noqa: E402
from nodes.watermark.payload import (binomial_threshold, bytes_to_bits, decode_bytes, encode_bytes,  # noqa: E402
                                     encode_text)
from nodes.watermark.posthoc import detect_posthoc, embed_posthoc  # noqa: E402

SIZE, N_BITS = 512, 32
DATA_BYTES, PARITY_BYTES = 4, 4
IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
PEERS = ("dwtDct", "dwtDctSvd")
KEY = "bench-key"


def to_rgb512(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return cv2.resize(rgb[y0:y0 + s, x0:x0 + s], (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def attack(rgb: np.ndarray) -> np.ndarray:
        _, buffer = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        return np.ascontiguousarray(cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1])
    return attack


def resize_half(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def crop80_resize(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = int(round(h * 0.8)), int(round(w * 0.8))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(rgb[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def noise005(rgb: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)  # watermark.md §6.3: clipped, not wrapped
    f = rgb.astype(np.float32) / 255.0 + rng.normal(0.0, 0.05, rgb.shape).astype(np.float32)
    return (np.clip(f, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def brightness20(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * 1.2 + 0.5, 0, 255).astype(np.uint8)


def blur(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), 1.0)


ATTACKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x, "jpeg50": jpeg(50), "jpeg25": jpeg(25), "resize_0.5": resize_half,
    "crop80_resize": crop80_resize, "noise_0.05": noise005, "brightness_1.2": brightness20, "blur_1": blur}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255


class Ours:
    name = "ours"

    def embed(self, rgb: np.ndarray, payload: bytes) -> np.ndarray:
        marked = embed_posthoc(to_tensor(rgb), encode_bytes(payload, DATA_BYTES, PARITY_BYTES), KEY)
        return (marked[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        bits, _ = detect_posthoc(to_tensor(rgb), 8 * (DATA_BYTES + PARITY_BYTES), KEY,
                                 accept=lambda b: decode_bytes(b, DATA_BYTES, PARITY_BYTES)[0] is not None)
        data_bytes, _ = decode_bytes(bits[0], DATA_BYTES, PARITY_BYTES)
        return (bytes_to_bits(data_bytes) if data_bytes is not None else bits[0][:N_BITS]).numpy()


class Peer:
    def __init__(self, method: str):
        self.name = method

    def embed(self, rgb: np.ndarray, payload: bytes) -> np.ndarray:
        encoder = WatermarkEncoder()
        encoder.set_watermark("bits", bytes_to_bits(payload).tolist())
        bgr = encoder.encode(np.ascontiguousarray(rgb[..., ::-1]), self.name)
        return np.ascontiguousarray(np.clip(bgr, 0, 255).astype(np.uint8)[..., ::-1])

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        decoder = WatermarkDecoder("bits", N_BITS)
        return np.asarray(decoder.decode(np.ascontiguousarray(rgb[..., ::-1]), self.name)).astype(np.uint8)


def timed(fn: Callable, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1e3


def report(line: str) -> None:
    print(line, flush=True)


GEN_SIZE, GEN_STEPS, GEN_CFG = 64, 20, 1.0
GEN_FPR = 1e-6


def generative_mode(images: int) -> tuple[dict[str, float], float]:
    """Mean coded-bit accuracy per attack, and the TPR at FPR 1e-6 without attack, on the embedded model."""
    from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser
    from nodes.embedded.dataset import held_out_captions
    from nodes.embedded.train import SHIPPED_NAME
    from nodes.generation.latents import INITIAL_NOISE_KEY
    from nodes.generation.nodes import (AtelierEmptyLatent, AtelierSampler, AtelierTextEncode, AtelierVAEDecode,
                                        ModelRef)
    from nodes.models.loading import SHIPPED_MODELS, load_model

    model = load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME))
    ref, codec = ModelRef(model), DiffusersCodec(model.vae)
    denoiser = DiffusersDenoiser(model.unet, model.schedule)
    encode = AtelierTextEncode()
    empty = encode.encode(ref, "", "auto")[0]
    latent = AtelierEmptyLatent().make(GEN_SIZE, GEN_SIZE, 1)[0]
    rng = np.random.default_rng(99)
    accuracy = {a: [] for a in ATTACKS}
    threshold, hits = binomial_threshold(generative.CODE_BITS, GEN_FPR), 0
    for index, scene in enumerate(held_out_captions(images)):
        text = "".join(chr(c) for c in rng.integers(97, 123, generative.DATA_BYTES))
        code = encode_text(text, generative.DATA_BYTES, generative.PARITY_BYTES)
        noise = generative.gaussian_shading_noise(code, KEY, tuple(latent["samples"].shape),
                                                  torch.Generator().manual_seed(index))
        sampled = AtelierSampler().sample(ref, encode.encode(ref, scene.caption, "auto")[0], empty,
                                          {**latent, INITIAL_NOISE_KEY: noise}, index, GEN_STEPS, GEN_CFG, "ddim",
                                          "normal", 1.0, 0.0)[0]
        image = AtelierVAEDecode().decode(sampled, codec, False, 512, 64)[0][0]
        rgb = (image * 255).round().to(torch.uint8).numpy()
        for attack_name, attack in ATTACKS.items():
            initial = invert_image(to_tensor(attack(rgb)), denoiser, codec, empty, GEN_STEPS)
            bits, _ = generative.gaussian_shading_bits(initial, KEY)
            matches = int((bits[0] == code).sum())
            accuracy[attack_name].append(matches / generative.CODE_BITS)
            hits += attack_name == "none" and matches >= threshold
    return {a: float(np.mean(v)) for a, v in accuracy.items()}, hits / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 payload per image instead of 8, 3 generated images "
                                                              "instead of 40 (about a minute)")
    parser.add_argument("--payloads", type=int, default=None, help="payloads per image")
    parser.add_argument("--gen-images", type=int, default=None, help="generated images (generative mode)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    payloads = args.payloads or (1 if args.quick else 8)
    images = {name: to_rgb512(getattr(data, name)()) for name in IMAGE_NAMES}
    methods = [Ours()] + [Peer(m) for m in PEERS]
    rng = np.random.default_rng(1234)
    acc = {m.name: {a: [] for a in ATTACKS} for m in methods}
    psnrs = {m.name: [] for m in methods}
    embed_ms = {m.name: [] for m in methods}
    detect_ms = {m.name: [] for m in methods}
    for method in methods:  # warm-up
        method.detect(method.embed(images["astronaut"], b"warm"))
    for name, rgb in images.items():
        for _ in range(payloads):
            payload = bytes(rng.integers(0, 256, N_BITS // 8, dtype=np.uint8).tolist())
            truth = bytes_to_bits(payload).numpy()
            for method in methods:  # interleaved: every method sees the same payload and attacks
                marked, ms = timed(method.embed, rgb, payload)
                embed_ms[method.name].append(ms)
                psnrs[method.name].append(psnr(rgb, marked))
                for attack_name, attack in ATTACKS.items():
                    found, ms = timed(method.detect, attack(marked))
                    if attack_name == "none":
                        detect_ms[method.name].append(ms)
                    acc[method.name][attack_name].append(float(np.mean(found == truth)))
    for method in methods:
        n = method.name
        report(f"{n:10s} PSNR {np.mean(psnrs[n]):.2f} dB (min {np.min(psnrs[n]):.2f}), embed "
               f"{statistics.median(embed_ms[n]):.1f} ms, detect {statistics.median(detect_ms[n]):.1f} ms")
        report("  " + " ".join(f"{a}={np.mean(v):.3f}" for a, v in acc[n].items()))
    gen_accuracy, gen_tpr = generative_mode(args.gen_images or (3 if args.quick else 40))
    report("generative " + " ".join(f"{a}={v:.3f}" for a, v in gen_accuracy.items()) + f" tpr_at_1e-6={gen_tpr:.2f}")
    ours = "ours"
    report(f"BENCH watermark psnr_db={np.mean(psnrs[ours]):.2f} jpeg50={np.mean(acc[ours]['jpeg50']):.3f} "
           f"brightness={np.mean(acc[ours]['brightness_1.2']):.3f} "
           f"crop_resize={np.mean(acc[ours]['crop80_resize']):.3f} "
           f"embed_ms={statistics.median(embed_ms[ours]):.1f} detect_ms={statistics.median(detect_ms[ours]):.1f} "
           f"gen_jpeg50={gen_accuracy['jpeg50']:.3f} gen_tpr_at_1e-6={gen_tpr:.2f} "
           f"peer_dwtdct_embed_ms={statistics.median(embed_ms['dwtDct']):.1f} "
           f"peer_dwtdct_jpeg50={np.mean(acc['dwtDct']['jpeg50']):.3f} "
           f"peer_dwtdctsvd_jpeg50={np.mean(acc['dwtDctSvd']['jpeg50']):.3f} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
