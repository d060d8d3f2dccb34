"""The watermark nodes: a key store, the latent injector and the NOISE for SamplerCustomAdvanced (Gaussian Shading
or Tree-Ring, switched by a prompt trigger), the post-hoc image mark, and one detector for all three.

Keys never enter a workflow or an output file: the widgets hold only a key's *name*; the secret is a file in the
models folder's ``watermark_keys/`` (made on first use), and SaveImage's embedded prompt carries the name only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from typing import Any

import torch

from ..common.images import to_channels_first, to_channels_last
from ..common.paths import atomic_write, confine
from ..common.limits import MAX_SEED
from ..models.comfy_adapters import denoiser_and_codec, text_conditioning
from ..models.refs import ModelsFolder, models_subfolder
from ..sampling.latents import INITIAL_NOISE_KEY, seeded_noise
from ..sampling.noise import prepare_noise
from . import latent as generative
from .attacks import jpeg_compress
from .detect import (POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES, Detection, detect_generative,
                     detect_posthoc_payload, invert_image)
from .payload import encode_text, qr_image
from .posthoc import DEFAULT_STRENGTH, embed_posthoc
from .trigger import DEFAULT_TRIGGER, strip_trigger

logger = logging.getLogger(__name__)

CATEGORY = "atelier/watermark"
KEYS_FOLDER = "watermark_keys"
KEY_EXTENSION = ".key"
KEY_BYTES = 32  # a 256-bit secret, ChaCha20's key size
LATENT_MODES = ("gaussian_shading", "tree_ring")
DETECT_MODES = ("post_hoc", "gaussian_shading", "tree_ring")
MAX_STRENGTH = 20.0
MAX_INVERSION_STEPS = 1000
MIN_FPR, MAX_FPR = 1e-12, 0.1
DEFAULT_FPR = 1e-6  # Source: Gaussian Shading's detection setting, --fpr 0.000001
BLANK_QR_PX = 64  # the detector's QR output when nothing decodes: a white square


@dataclasses.dataclass(frozen=True)
class WatermarkKey:
    """A named secret from the key store; ``repr`` never shows the secret."""

    name: str
    secret: str = dataclasses.field(repr=False)


def _keys_folder(models_dir: str | None) -> str:
    return models_subfolder(models_dir, KEYS_FOLDER, "watermark keys")


def load_or_create_key(folder: str, name: str) -> WatermarkKey:
    """The key ``name`` from ``folder``, made (256 random bits, written atomically) when it does not exist yet."""
    if not name.strip() or os.path.basename(name) != name:
        raise ValueError(f"key_name must be a plain file name (no folders); got {name!r}")
    os.makedirs(folder, exist_ok=True)
    path = confine(folder, name + KEY_EXTENSION)
    if not os.path.exists(path):
        atomic_write(path, secrets.token_hex(KEY_BYTES).encode())
        logger.info("created watermark key %r in %s", name, folder)
    with open(path, encoding="utf-8") as file:
        secret = file.read().strip()
    if not secret:
        raise ValueError(f"watermark key file {path} is empty; delete it to make a new key")
    return WatermarkKey(name, secret)


def _payload_error(payload: str | None, capacity: int) -> bool | str:
    """``VALIDATE_INPUTS``' check of a payload widget: True, or the message (None: a linked text, checked later)."""
    if payload is None:
        return True
    size = len(payload.encode("utf-8"))
    if size > capacity or "\x00" in payload:
        return f"payload must be at most {capacity} bytes of UTF-8 without NUL characters; got {size} bytes"
    return True


def _triggered(prompt: str, trigger: str) -> tuple[str, bool]:
    """The prompt without the trigger and whether to mark: always when the trigger is empty."""
    if not trigger.strip():
        return prompt, True
    return strip_trigger(prompt, trigger)


def watermarked_noise(key: WatermarkKey, mode: str, payload: str, seed: int, shape: tuple[int, ...]
                      ) -> torch.Tensor:
    """Starting noise of ``shape`` (B, C, h, w) on the CPU carrying the watermark ``mode`` under ``key``: Gaussian
    Shading's sealed ``payload`` (a fresh random nonce per image, so equal texts under one key give unrelated
    noises) with magnitudes from ``seed``, or Tree-Ring's ring key written into ``seed``'s Gaussian noise.

    Raises:
        ValueError: an unknown ``mode``; a latent too small for the mark (see :mod:`.latent`).
    """
    if mode not in LATENT_MODES:
        raise ValueError(f"mode must be one of {LATENT_MODES}; got {mode!r}")
    if mode == "gaussian_shading":
        codes = torch.stack([generative.gaussian_shading_code(payload, key.secret,
                                                              secrets.token_bytes(generative.NONCE_BYTES))
                             for _ in range(shape[0])])
        return generative.gaussian_shading_noise(codes, key.secret, shape, torch.Generator().manual_seed(seed))
    return generative.tree_ring_noise(seeded_noise(seed, shape)[0], key.secret)


@dataclasses.dataclass(frozen=True)
class WatermarkNoise:
    """What travels on the NOISE socket from :class:`AtelierWatermarkNoise`, in both hosts: ComfyUI's protocol, a
    ``seed`` (which ancestral and SDE samplers also draw their step noise from) and ``generate_noise(latent)``, the
    starting noise on the CPU shaped like ``latent["samples"]``.

    Unmarked (the prompt lacked the trigger), it is ComfyUI's RandomNoise for the seed; marked, each call draws a
    fresh nonce, so every image is its own mark.
    """

    seed: int
    key: WatermarkKey
    mode: str
    payload: str
    marked: bool

    def generate_noise(self, latent: dict) -> torch.Tensor:
        samples = latent["samples"]
        if not self.marked:
            return prepare_noise(samples, self.seed, latent.get("batch_index"))
        return watermarked_noise(self.key, self.mode, self.payload, self.seed, tuple(samples.shape))


class AtelierWatermarkKey(ModelsFolder):
    DESCRIPTION = ("A watermark key from the key store (models/watermark_keys), made on first use. Only the name "
                   "is stored in workflows and saved images; the detector needs the same key.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_WATERMARK_KEY",)
    RETURN_NAMES = ("key",)
    OUTPUT_TOOLTIPS = ("The key, for the watermark and detect nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "key_name": ("STRING", {"default": "default",
                                    "tooltip": "The key's name; a new name makes a new random key."}),
        }}

    def load(self, key_name: str) -> tuple[WatermarkKey]:
        return (load_or_create_key(_keys_folder(self.models_dir), key_name),)


def _generative_mark_inputs() -> dict[str, tuple]:
    """The inputs Watermark Latent and Watermark Noise share, in their widget order."""
    return {
        "key": ("ATELIER_WATERMARK_KEY", {"tooltip": "The key; the detector needs the same one."}),
        "mode": (list(LATENT_MODES), {"tooltip": "gaussian_shading: carries the payload; tree_ring: only says "
                                                 "'marked with this key'."}),
        "payload": ("STRING", {"default": "atelier",
                               "tooltip": f"Up to {generative.TEXT_BYTES} bytes of text (Gaussian Shading)."}),
        "prompt": ("STRING", {"multiline": True, "default": "",
                              "tooltip": "The prompt; the trigger word in it switches the watermark on."}),
        "trigger": ("STRING", {"default": DEFAULT_TRIGGER,
                               "tooltip": "The trigger word (Safe-SD); empty marks every image."}),
    }


class AtelierWatermarkLatent:
    DESCRIPTION = ("Writes a watermark into the starting noise of generation (Gaussian Shading: a 12-byte text, "
                   "authenticated under the key with a fresh nonce per image and error-corrected, the noise still "
                   "exactly Gaussian; or a Tree-Ring zero-bit key). With a "
                   "trigger word, it acts only when the prompt contains it, and removes it from the prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "prompt")
    OUTPUT_TOOLTIPS = ("The latent, carrying the watermarked starting noise for the sampler.",
                       "The prompt without the trigger word: link it to the text encoder's text.")
    FUNCTION = "inject"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "latent": ("LATENT", {"tooltip": "An empty latent (text-to-image)."}),
            **_generative_mark_inputs(),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "control_after_generate": True,
                             "tooltip": "Seeds the noise magnitudes, as the sampler's seed would."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, payload: str | None) -> bool | str:
        return _payload_error(payload, generative.TEXT_BYTES)

    def inject(self, latent: dict, key: WatermarkKey, mode: str, payload: str, prompt: str, trigger: str,
               seed: int) -> tuple[dict, str]:
        if mode not in LATENT_MODES:
            raise ValueError(f"mode must be one of {LATENT_MODES}; got {mode!r}")
        prompt, triggered = _triggered(prompt, trigger)
        if not triggered:
            return latent, prompt
        noise = watermarked_noise(key, mode, payload, seed, tuple(latent["samples"].shape))
        return {**latent, INITIAL_NOISE_KEY: noise}, prompt


class AtelierWatermarkNoise:
    DESCRIPTION = ("The watermark as a NOISE for SamplerCustomAdvanced: its starting noise carries a Gaussian "
                   "Shading text (authenticated under the key with a fresh nonce per image, error-corrected, the "
                   "noise still exactly Gaussian) or a Tree-Ring zero-bit key. With a trigger word it marks only "
                   "when the prompt contains it (otherwise it is RandomNoise for the seed), and removes it from "
                   "the prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NOISE", "STRING")
    RETURN_NAMES = ("noise", "prompt")
    OUTPUT_TOOLTIPS = ("The starting noise, for SamplerCustomAdvanced's noise input.",
                       "The prompt without the trigger word: link it to the text encoder's text.")
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            **_generative_mark_inputs(),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                                   "control_after_generate": True,
                                   "tooltip": "Seeds the noise magnitudes, as RandomNoise's seed would."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, payload: str | None) -> bool | str:
        return _payload_error(payload, generative.TEXT_BYTES)

    def get_noise(self, key: WatermarkKey, mode: str, payload: str, prompt: str, trigger: str, noise_seed: int
                  ) -> tuple[WatermarkNoise, str]:
        if mode not in LATENT_MODES:
            raise ValueError(f"mode must be one of {LATENT_MODES}; got {mode!r}")
        prompt, triggered = _triggered(prompt, trigger)
        return WatermarkNoise(noise_seed, key, mode, payload, triggered), prompt


class AtelierWatermarkImage:
    DESCRIPTION = ("Invisibly watermarks any image with a short text (post-hoc: DWT-DCT with error correction, "
                   "brightness-proof, tiled over the picture with a sync and a Fourier template, so that crops "
                   "from anywhere, resizing, small rotations, blur and WebP leave it readable).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The watermarked images, 8-bit levels.",)
    FUNCTION = "watermark"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to mark; sides of 128 pixels or more."}),
            "key": ("ATELIER_WATERMARK_KEY", {"tooltip": "The key; the detector needs the same one."}),
            "payload": ("STRING", {"default": "ok", "tooltip": f"Up to {POSTHOC_DATA_BYTES} bytes of text."}),
            "strength": ("FLOAT", {"default": DEFAULT_STRENGTH, "min": 0.5, "max": MAX_STRENGTH, "step": 0.1,
                                   "round": 0.01,
                                   "tooltip": "The mark's margin in 8-bit levels: higher survives more and "
                                              "shows more (the default keeps PSNR near 42.7 dB at 512²)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, payload: str | None) -> bool | str:
        return _payload_error(payload, POSTHOC_DATA_BYTES)

    def watermark(self, image: torch.Tensor, key: WatermarkKey, payload: str, strength: float
                  ) -> tuple[torch.Tensor]:
        bits = encode_text(payload, POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES)
        return (to_channels_last(embed_posthoc(to_channels_first(image), bits, key.secret, strength)),)


class AtelierJPEGAttack:
    DESCRIPTION = "JPEG-compresses images and decodes them again: the attack every shared image meets."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The images after JPEG compression.",)
    FUNCTION = "attack"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to compress."}),
            "quality": ("INT", {"default": 50, "min": 1, "max": 95, "step": 1,
                                "tooltip": "JPEG quality; the attack suite uses 50 and 25."}),
        }}

    def attack(self, image: torch.Tensor, quality: int) -> tuple[torch.Tensor]:
        return (jpeg_compress(image, quality),)


class AtelierDetectWatermark:
    DESCRIPTION = ("Looks for a watermark under a key and shows the verdict: the recovered text (and its QR code), "
                   "the bit accuracy against the expected text, and an exact p-value at the chosen false-positive "
                   "rate. The generative modes invert the image to its starting noise with the model (DDIM, empty "
                   "prompt).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE", "FLOAT", "BOOLEAN")
    RETURN_NAMES = ("report", "qr_code", "p_value", "detected")
    OUTPUT_TOOLTIPS = ("One line per image: verdict, p-value, bit accuracy, payload.",
                       "The QR code of the first image's recovered text (white when none).",
                       "The first image's p-value.", "Whether the first image is watermarked at the FPR.")
    OUTPUT_NODE = True
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to check."}),
            "key": ("ATELIER_WATERMARK_KEY", {"tooltip": "The key the mark was made with."}),
            "mode": (list(DETECT_MODES), {"tooltip": "Which watermark to look for."}),
            "expected_payload": ("STRING", {"default": "", "tooltip": "The text you expect, for the bit accuracy "
                                                                      "and the binomial test; empty: unknown."}),
            "fpr": ("FLOAT", {"default": DEFAULT_FPR, "min": MIN_FPR, "max": MAX_FPR, "step": 1e-12,
                              "round": False, "tooltip": "The false-positive rate the decision allows."}),
            "inversion_steps": ("INT", {"default": generative.DEFAULT_INVERSION_STEPS, "min": 1,
                                        "max": MAX_INVERSION_STEPS, "step": 1,
                                        "tooltip": "DDIM inversion steps (generative modes)."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The generating model (generative modes): Atelier's or ComfyUI's."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder, for the empty prompt (generative modes)."}),
            "vae": ("VAE", {"tooltip": "Its VAE (generative modes)."}),
        }}

    def detect(self, image: torch.Tensor, key: WatermarkKey, mode: str, expected_payload: str, fpr: float,
               inversion_steps: int, model: Any = None, clip: Any = None, vae: Any = None) -> dict:
        if mode not in DETECT_MODES:
            raise ValueError(f"mode must be one of {DETECT_MODES}; got {mode!r}")
        expected = expected_payload or None
        pixels = to_channels_first(image)
        if mode == "post_hoc":
            found = detect_posthoc_payload(pixels, key.secret, expected, fpr)
        else:
            if model is None or clip is None or vae is None:
                raise ValueError(f"mode {mode!r} inverts the image with the model: link model, clip and vae")
            found = detect_generative(self._invert(pixels, model, clip, vae, inversion_steps), key.secret, mode,
                                      expected, fpr)
        report = "\n".join(detection.summary() for detection in found)
        return {"ui": {"text": [report]}, "result": (report, self._qr(found[0]), found[0].p_value, found[0].detected)}

    @staticmethod
    def _invert(pixels: torch.Tensor, model: Any, clip: Any, vae: Any, steps: int) -> torch.Tensor:
        """Atelier's model, clip and vae standalone, ComfyUI's inside ComfyUI (``comfy_adapters``)."""
        empty = text_conditioning(clip, "")
        with denoiser_and_codec(model, vae) as (denoiser, codec):
            return invert_image(pixels, denoiser, codec, empty, steps)

    @staticmethod
    def _qr(detection: Detection) -> torch.Tensor:
        if not detection.payload or not detection.detected:
            return torch.ones(1, BLANK_QR_PX, BLANK_QR_PX, 3)
        return qr_image(detection.payload)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    AtelierWatermarkKey, AtelierWatermarkLatent, AtelierWatermarkNoise, AtelierWatermarkImage, AtelierJPEGAttack,
    AtelierDetectWatermark)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierWatermarkKey": "Watermark Key (Atelier)", "AtelierWatermarkLatent": "Watermark Latent (Atelier)",
    "AtelierWatermarkNoise": "Watermark Noise (Atelier)",
    "AtelierWatermarkImage": "Watermark Image (Atelier)", "AtelierJPEGAttack": "JPEG Attack (Atelier)",
    "AtelierDetectWatermark": "Detect Watermark (Atelier)",
}
