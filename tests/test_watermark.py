"""Invisible watermarks (issue #9): the post-hoc mark on natural images, Gaussian Shading and Tree-Ring in the
initial latent, the sampler starting from a LATENT's noise, the prompt trigger, the key store and the example
workflow on the shipped model."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage import data

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser
from nodes.generation.latents import INITIAL_NOISE_KEY, seeded_noise
from nodes.generation.nodes import AtelierSampler, AtelierTextEncode, ModelRef
from nodes.models.loading import load_model
from nodes.watermark import latent as generative
from nodes.watermark.detect import detect_generative, detect_posthoc_payload
from nodes.watermark.nodes import (AtelierDetectWatermark, AtelierWatermarkImage, AtelierWatermarkLatent,
                                   WatermarkKey, load_or_create_key)
from nodes.watermark.payload import (binomial_tail, binomial_threshold, decode_text, encode_text,
                                     rs_false_decode_probability)
from nodes.watermark.posthoc import (_luma, _template, embed_posthoc, estimate_zoom, haar_dwt,
                                     haar_idwt)
from nodes.watermark.trigger import strip_trigger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 512  # natural test images, area-resized to the size the issue sets its PSNR target at


def natural(name: str) -> torch.Tensor:
    """A scikit-image photo, centre-cropped and area-resized to SIDE², as (1, 3, H, W) in [0, 1]."""
    rgb = getattr(data, name)()
    s = min(rgb.shape[:2])
    y0, x0 = (rgb.shape[0] - s) // 2, (rgb.shape[1] - s) // 2
    square = Image.fromarray(rgb[y0:y0 + s, x0:x0 + s]).resize((SIDE, SIDE), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)[None].float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).copy()
    return torch.from_numpy(decoded).permute(2, 0, 1)[None].float() / 255


def centre_crop_resize(image: torch.Tensor, fraction: float) -> torch.Tensor:
    side = image.shape[-1]
    keep = round(side * fraction)
    start = (side - keep) // 2
    crop = image[..., start:start + keep, start:start + keep]
    return torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)


# --- post-hoc -------------------------------------------------------------------------------------------------------

def test_haar_bands_come_back_in_the_order_they_left():
    x = torch.rand(2, 16, 12, dtype=torch.float64)
    ll, (horizontal, vertical, diagonal) = haar_dwt(x)
    assert torch.allclose(haar_idwt(ll, (horizontal, vertical, diagonal)), x)
    # The library's defect: swapping the horizontal and vertical bands does not reconstruct the image.
    assert not torch.allclose(haar_idwt(ll, (vertical, horizontal, diagonal)), x)
    rows = torch.zeros(1, 4, 4)
    rows[:, 0::2] = 1  # every other row: a horizontal pattern shows in the horizontal band only (pywt's cH)
    _, (h, v, d) = haar_dwt(rows)
    assert h.abs().sum() > 0 and v.abs().sum() == 0 and d.abs().sum() == 0


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_posthoc_round_trip_on_natural_images(name):
    image = natural(name)
    marked = embed_posthoc(image, encode_text("Ab3!", 4, 4), "secret key")
    assert psnr(image, marked) >= 41.0  # the benchmark's mean over payloads and images is 43 dB
    assert torch.equal(marked, (marked * 255).round() / 255) and 0 <= marked.min() and marked.max() <= 1
    found = detect_posthoc_payload(marked, "secret key", None, 1e-3)[0]
    assert found.payload == "Ab3!" and found.detected
    with_truth = detect_posthoc_payload(marked, "secret key", "Ab3!", 1e-6)[0]
    assert with_truth.bit_accuracy == 1.0 and with_truth.p_value == binomial_tail(64, 64)


def test_posthoc_survives_jpeg_50_and_brightness():
    marked = embed_posthoc(natural("astronaut"), encode_text("jpg", 4, 4), "k")
    assert detect_posthoc_payload(jpeg(marked, 50), "k", None, 1e-3)[0].payload == "jpg"
    # Gain-invariant: every correlation scales alike. (On astronaut ×1.2 saturates the white suit, and what
    # clipping erases can cost a few coded bits: see the benchmark for all four images.)
    marked = embed_posthoc(natural("chelsea"), encode_text("gain", 4, 4), "k")
    brighter = ((marked * 1.2).clamp(0, 1) * 255).round() / 255
    assert detect_posthoc_payload(brighter, "k", None, 1e-3)[0].payload == "gain"


def test_posthoc_wrong_key_or_unmarked_image_detects_nothing():
    image = natural("chelsea")
    marked = embed_posthoc(image, encode_text("mine", 4, 4), "right key")
    for candidate, key in ((marked, "wrong key"), (image, "right key")):
        found = detect_posthoc_payload(candidate, key, "mine", 1e-3)[0]
        assert not found.detected and found.bit_accuracy < 0.75, found


def test_template_measures_the_zoom_of_a_centre_crop():
    flat = torch.full((3, SIDE, SIDE), 0.5) + _template(SIDE, SIDE, torch.float32) / 255
    for fraction in (1.0, 0.9, 0.8):
        zoomed = centre_crop_resize(flat[None], fraction)[0]
        assert estimate_zoom(_luma(zoomed)) == pytest.approx(SIDE / round(SIDE * fraction), rel=0.003)


def test_posthoc_node_equals_the_maths_and_refuses_a_long_payload():
    image = natural("coffee")
    key = WatermarkKey("k", "00" * 32)
    node = AtelierWatermarkImage().watermark(image.permute(0, 2, 3, 1), key, "hey", 3.0)[0]
    assert torch.equal(node.permute(0, 3, 1, 2), embed_posthoc(image, encode_text("hey", 4, 4), key.secret, 3.0))
    with pytest.raises(ValueError, match="at most 4 bytes"):
        AtelierWatermarkImage().watermark(image.permute(0, 2, 3, 1), key, "too long", 3.0)
    assert "at most 4 bytes" in AtelierWatermarkImage.VALIDATE_INPUTS("too long")
    assert AtelierWatermarkImage.VALIDATE_INPUTS("four") is True
    assert "at most 16 bytes" in AtelierWatermarkLatent.VALIDATE_INPUTS("seventeen bytes!!")


# --- payload, thresholds -----------------------------------------------------------------------------------------

def test_reed_solomon_corrects_up_to_half_its_parity_bytes():
    bits = encode_text("sixteen bytes ok", 16, 16)
    damaged = bits.clone()
    damaged[: 8 * 8] ^= 1  # 8 whole bytes wrong: the limit of 16 parity bytes
    assert decode_text(damaged, 16, 16) == ("sixteen bytes ok", 8)
    damaged[8 * 8: 8 * 10] ^= 1
    assert decode_text(damaged, 16, 16)[0] != "sixteen bytes ok"


def test_binomial_threshold_is_the_exact_tail_without_off_by_one():
    k = binomial_threshold(256, 1e-6)
    assert binomial_tail(256, k) <= 1e-6 < binomial_tail(256, k - 1)
    assert k == 167  # Gaussian Shading's code uses 166, whose tail is 1.18e-6
    assert rs_false_decode_probability(16, 16, 8) < 1e-12


# --- generative ----------------------------------------------------------------------------------------------------

def test_gaussian_shading_noise_is_still_standard_normal():
    code = encode_text("distribution", 16, 16)
    noise = generative.gaussian_shading_noise(code, "k", (4, 4, 32, 32), torch.Generator().manual_seed(0))
    assert stats.kstest(noise.flatten().numpy(), "norm").pvalue > 0.01
    # Each element has the sign its encrypted bit names, so the mark is there and not only in distribution.
    assert torch.equal((noise[0] > 0).to(torch.uint8), generative.encrypted_bits(code, "k", (4, 32, 32)))
    # Halves of the same payload under ChaCha20: the signs are balanced whatever the payload.
    zeros = generative.gaussian_shading_noise(torch.zeros(256, dtype=torch.uint8), "k", (1, 4, 64, 64),
                                              torch.Generator().manual_seed(0))
    assert abs(float((zeros > 0).float().mean()) - 0.5) < 0.02


def test_gaussian_shading_wrong_key_reads_chance():
    code = encode_text("owner", 16, 16)
    noise = generative.gaussian_shading_noise(code, "right", (1, 4, 16, 16), torch.Generator().manual_seed(0))
    right = detect_generative(noise, "right", "gaussian_shading", "owner", 1e-6)[0]
    wrong = detect_generative(noise, "wrong", "gaussian_shading", "owner", 1e-6)[0]
    assert right.detected and right.payload == "owner" and right.bit_accuracy == 1.0
    assert not wrong.detected and wrong.payload is None and 0.35 < wrong.bit_accuracy < 0.65


def test_gaussian_shading_refuses_a_latent_too_small_for_256_bits():
    with pytest.raises(ValueError, match="multiple of 256"):
        generative.gaussian_shading_noise(encode_text("x", 16, 16), "k", (1, 4, 4, 4), torch.Generator())


def test_tree_ring_key_is_found_with_its_key_only():
    # 64 × 64, the latent of a 512² image, where the paper's radius 10 gives 10 rings of evidence.
    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    marked = generative.tree_ring_noise(noise, "ring key")
    assert (generative.tree_ring_p_value(marked, "ring key") < 1e-6).all()
    assert (generative.tree_ring_p_value(marked, "other key") > 1e-3).all()
    assert (generative.tree_ring_p_value(noise, "ring key") > 1e-3).all()


# --- the sampler starts from the LATENT's noise --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_sd1):  # noqa: F811
    model = load_model(tiny_sd1.folder)
    ref = ModelRef(model)
    encode = AtelierTextEncode()
    return ref, encode.encode(ref, "a red circle", "auto")[0], encode.encode(ref, "", "auto")[0]


def _sample(tiny, latent: dict, seed: int = 5, cfg: float = 5.0) -> torch.Tensor:
    ref, positive, negative = tiny
    return AtelierSampler().sample(ref, positive, negative, latent, seed, 3, cfg, "ddim", "normal", 1.0, 0.0)[0]


def test_sampler_starts_from_the_latents_initial_noise(tiny):
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    seeded = _sample(tiny, empty)
    # The seeded noise passed explicitly gives the same image: the key replaces exactly that noise.
    explicit = _sample(tiny, {**empty, INITIAL_NOISE_KEY: seeded_noise(5, (1, 4, 8, 8))[0]})
    other = _sample(tiny, {**empty, INITIAL_NOISE_KEY: seeded_noise(6, (1, 4, 8, 8))[0]})
    assert torch.equal(explicit["samples"], seeded["samples"])
    assert not torch.allclose(other["samples"], seeded["samples"])
    assert INITIAL_NOISE_KEY not in explicit  # a later pass (hires fix) draws its own noise
    with pytest.raises(ValueError, match="initial_noise must have the latent's shape"):
        _sample(tiny, {**empty, INITIAL_NOISE_KEY: torch.zeros(1, 4, 4, 4)})


def test_ddim_inversion_recovers_the_initial_noise_on_a_tiny_model(tiny):
    ref, _, negative = tiny
    code = encode_text("inverted", 16, 16)
    noise = generative.gaussian_shading_noise(code, "k", (1, 4, 16, 16), torch.Generator().manual_seed(0))
    clean = _sample(tiny, {"samples": torch.zeros(1, 4, 16, 16), INITIAL_NOISE_KEY: noise}, cfg=1.0)["samples"]
    codec = DiffusersCodec(ref.model.vae)
    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    initial = generative.ddim_invert(denoiser, clean * codec.scaling_factor, negative, 3)
    assert float(((initial > 0) == (noise > 0)).float().mean()) > 0.9
    found = detect_generative(initial, "k", "gaussian_shading", "inverted", 1e-6)[0]
    assert found.detected and found.payload == "inverted"


# --- trigger and key store ------------------------------------------------------------------------------------------

def test_trigger_is_removed_from_the_text_the_encoder_sees(tiny):
    ref, _, _ = tiny
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    key = WatermarkKey("k", "ab" * 32)
    node = AtelierWatermarkLatent()
    marked, prompt = node.inject(latent, key, "gaussian_shading", "hi", "a red circle, [watermark] on grass",
                                 "[watermark]", 0)
    assert prompt == "a red circle, on grass" and INITIAL_NOISE_KEY in marked
    encode = AtelierTextEncode()
    assert torch.equal(encode.encode(ref, prompt, "auto")[0].embeds,
                       encode.encode(ref, "a red circle, on grass", "auto")[0].embeds)
    untouched, same = node.inject(latent, key, "gaussian_shading", "hi", "a red circle", "[watermark]", 0)
    assert untouched is latent and same == "a red circle"
    always, _ = node.inject(latent, key, "tree_ring", "", "a red circle", "", 0)
    assert INITIAL_NOISE_KEY in always
    assert strip_trigger("swatermarks [watermark]", "[watermark]") == ("swatermarks", True)


def test_key_store_makes_a_key_once_and_refuses_paths(tmp_path):
    first = load_or_create_key(str(tmp_path / "keys"), "alice")
    again = load_or_create_key(str(tmp_path / "keys"), "alice")
    assert first == again and len(first.secret) == 64 and first.secret not in repr(first)
    assert load_or_create_key(str(tmp_path / "keys"), "bob").secret != first.secret
    with pytest.raises(ValueError, match="key_name"):
        load_or_create_key(str(tmp_path / "keys"), "../evil")


# --- the example workflow ------------------------------------------------------------------------------------------

def test_watermark_workflow_runs_headless_and_keeps_the_key_out_of_the_image(tmp_path, capsys):
    from web.builtin_nodes import read_png_metadata
    from web.cli import main

    workflow = os.path.join(REPO, "workflows", "watermark.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "Sampler.steps=4", "--set", "Detect.inversion_steps=4"])
    assert code == 0
    saved = [line.removeprefix("output: ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("output: ")]
    assert saved
    secret = (tmp_path / "models" / "watermark_keys" / "default.key").read_text().strip()
    for path in saved:
        with open(path, "rb") as file:
            assert secret.encode() not in file.read()
        assert secret not in str(read_png_metadata(path))


def test_detect_node_shows_its_result_and_renders_the_qr():
    image = natural("astronaut")
    key = WatermarkKey("k", "cd" * 32)
    marked = embed_posthoc(image, encode_text("QR", 4, 4), key.secret)
    out = AtelierDetectWatermark().detect(marked.permute(0, 2, 3, 1), key, "post_hoc", "", 1e-3, 50)
    report, qr, p_value, detected = out["result"]
    assert out["ui"]["text"] == [report] and "'QR'" in report and detected and p_value < 1e-3
    assert qr.shape[-1] == 3 and qr.shape[1] > 64 and 0 < float(qr.mean()) < 1  # a real code, not the blank
    with pytest.raises(ValueError, match="link model, clip and vae"):
        AtelierDetectWatermark().detect(marked.permute(0, 2, 3, 1), key, "gaussian_shading", "", 1e-3, 50)

