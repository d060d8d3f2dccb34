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

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser
from nodes.sampling.latents import INITIAL_NOISE_KEY, seeded_noise
from nodes.generation.nodes import AtelierSampler, AtelierTextEncode
from nodes.models.refs import ModelRef
from nodes.models.clip import Clip
from nodes.models.loading import load_model
from nodes.models.text import encode_prompt
from nodes.watermark import latent as generative
from nodes.watermark import detect as detection
from nodes.watermark.detect import detect_generative, detect_posthoc_payload
from nodes.watermark.nodes import (AtelierDetectWatermark, AtelierWatermarkImage, AtelierWatermarkLatent,
                                   WatermarkKey, load_or_create_key)
from nodes.watermark.payload import (binomial_tail, binomial_threshold, chacha20_bytes, decode_bytes, decode_text,
                                     encode_bytes, encode_text, rs_false_decode_probability, seal_text)
from nodes.watermark.posthoc import (MAX_READINGS, _luma, _template, embed_posthoc, estimate_zoom, haar_dwt,
                                     haar_idwt)
from nodes.watermark.trigger import strip_trigger
from photos import SIDE, natural

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert with_truth.bit_accuracy == 1.0 and with_truth.p_value == MAX_READINGS * binomial_tail(64, 64)


def test_posthoc_p_value_counts_every_reading_the_detector_may_try(monkeypatch):
    # Whichever reading the detector keeps, each of the MAX_READINGS it may try was a chance for an unmarked image
    # to decode: the p-value is the single reading's times MAX_READINGS (a union bound), at most 1.
    codeword = encode_text("ok", 4, 4)
    for bits, expected, single in ((codeword, None, rs_false_decode_probability(4, 4, 0)),
                                   (codeword, "ok", binomial_tail(64, 64)),
                                   (1 - codeword, "ok", binomial_tail(64, 0))):
        monkeypatch.setattr(detection, "detect_posthoc", lambda *_, bits=bits, **__: (bits[None], bits[None] - 0.5))
        found = detect_posthoc_payload(torch.rand(1, 3, 128, 128), "k", expected, 1e-6)[0]
        assert found.p_value == min(1.0, MAX_READINGS * single), (expected, found)


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


def test_posthoc_flat_image_reads_no_bits_not_the_empty_text():
    # A black background correlates with nothing: every correlation is exactly 0, and the all-zero word they would
    # give is a codeword (the empty text). Three of the 1,000 unmarked crops of the robustness test are such.
    black = torch.zeros(1, 3, 128, 128)
    found = detect_posthoc_payload(black, "k", None, 1e-3)[0]
    assert found.payload is None and not found.detected and found.p_value == 1.0
    assert detect_posthoc_payload(black, "k", "", 1e-3)[0].bit_accuracy == 0.0


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
    assert "at most 12 bytes" in AtelierWatermarkLatent.VALIDATE_INPUTS("thirteen byte")


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

def _nonces(count: int, seed: int = 0) -> list[bytes]:
    """Distinct nonces from a seeded generator: the node draws them with ``secrets``; tests need them fixed."""
    generator = np.random.default_rng(seed)
    return [generator.bytes(generative.NONCE_BYTES) for _ in range(count)]


def _marked(text: str, key: str, shape: tuple[int, ...], seed: int = 0, nonces: list[bytes] | None = None
            ) -> torch.Tensor:
    codes = torch.stack([generative.gaussian_shading_code(text, key, nonce)
                         for nonce in (nonces or _nonces(shape[0], seed))])
    return generative.gaussian_shading_noise(codes, key, shape, torch.Generator().manual_seed(seed))


def test_gaussian_shading_noise_is_still_standard_normal():
    nonce = _nonces(1)[0]
    code = generative.gaussian_shading_code("distrib", "k", nonce)
    noise = _marked("distrib", "k", (4, 4, 32, 32), nonces=[nonce] * 4)
    assert stats.kstest(noise.flatten().numpy(), "norm").pvalue > 0.01
    # Each element has the sign its encrypted bit names, so the mark is there and not only in distribution.
    assert torch.equal((noise[0] > 0).to(torch.uint8), generative.encrypted_bits(code, "k", (4, 32, 32)))
    # An all-zero codeword under ChaCha20: the signs are balanced whatever the codeword.
    zeros = generative.gaussian_shading_noise(torch.zeros(1, 256, dtype=torch.uint8), "k", (1, 4, 64, 64),
                                              torch.Generator().manual_seed(0))
    assert abs(float((zeros > 0).float().mean()) - 0.5) < 0.02


def test_gaussian_shading_wrong_key_reads_chance():
    noise = _marked("owner", "right", (1, 4, 16, 16))
    right = detect_generative(noise, "right", "gaussian_shading", "owner", 1e-6)[0]
    wrong = detect_generative(noise, "wrong", "gaussian_shading", "owner", 1e-6)[0]
    assert right.detected and right.payload == "owner" and right.bit_accuracy == 1.0
    assert not wrong.detected and wrong.payload is None and 0.35 < wrong.bit_accuracy < 0.65


def test_gaussian_shading_refuses_a_latent_smaller_than_one_block():
    with pytest.raises(ValueError, match="at least 8×8"):
        _marked("x", "k", (1, 4, 4, 16))


def test_two_images_under_one_key_and_text_have_uncorrelated_noises():
    # The issue's finding: with one keystream per key, two images' noises correlated at 2/π = 0.64. Now each
    # image's fresh nonce gives it an unrelated codeword. 256 pairs at 512², pooled.
    first, second = _marked("same text", "k", (256, 4, 64, 64), seed=1), _marked("same text", "k", (256, 4, 64, 64),
                                                                                seed=2)
    correlation = float((first * second).mean() / (first.std() * second.std()))
    assert abs(correlation) < 0.01, correlation
    assert len({nonce for nonce in _nonces(256, 1)} | {nonce for nonce in _nonces(256, 2)}) == 512


def _public_layout(height: int, width: int) -> torch.Tensor:
    """The tiling an attacker without the key would assume: the block's slots in natural order."""
    return torch.arange(256).reshape(4, 8, 8)[:, torch.arange(height) % 8][:, :, torch.arange(width) % 8]


def test_xor_of_two_sign_patterns_reveals_neither_codewords_nor_code():
    # Key reuse: the attacker has two marked noises (as exact as inversion can make them) and both texts.
    first, second = _marked("alice", "k", (1, 4, 64, 64), seed=1), _marked("bob", "k", (1, 4, 64, 64), seed=2)
    xor = ((first[0] > 0) ^ (second[0] > 0)).to(torch.uint8)
    # The old attack: the XOR of the sign patterns equalled the XOR of the two texts' codewords, laid out
    # round-robin. Now it matches it no better than chance.
    old_code = encode_text("alice", 16, 16) ^ encode_text("bob", 16, 16)
    assert 0.45 < float((xor.flatten() == old_code.repeat(64)).float().mean()) < 0.55
    # Nor, read with the public tiling (slots in natural order), is it a Reed-Solomon codeword: the keyed slot
    # order hides the code, so the XOR does not even say that both images share a key.
    votes = torch.zeros(256).index_add_(0, _public_layout(64, 64).flatten(), xor.flatten().float()) / 64
    assert decode_bytes((votes > 0.5).to(torch.uint8), generative.DATA_BYTES, generative.PARITY_BYTES)[0] is None
    # With the key, the same XOR is the XOR of the two sealed codewords: the layout is the keyed one.
    layout = generative.bit_layout("k", (4, 64, 64))
    keyed = torch.zeros(256).index_add_(0, layout.flatten(), xor.flatten().float()) / 64
    assert decode_bytes((keyed > 0.5).to(torch.uint8), generative.DATA_BYTES, generative.PARITY_BYTES)[0] is not None


def test_known_plaintext_forgery_is_rejected():
    # The forgery: from one marked image whose text is known (every PNG embeds its workflow), take the
    # keystream as its signs XOR the text's codeword, and write "(c) Mallory" with it. Against one keystream per
    # key this was accepted at p = 2.9e-39; now the attacker knows neither the nonce, the tag nor the layout.
    victim = _marked("(c) Alice", "victim key", (1, 4, 64, 64))
    layout = _public_layout(64, 64)
    known = encode_text("(c) Alice", generative.DATA_BYTES, generative.PARITY_BYTES)[layout]
    stream = (victim[0] > 0).to(torch.uint8) ^ known
    wanted = encode_text("(c) Mallory", generative.DATA_BYTES, generative.PARITY_BYTES)[layout]
    forged = victim.abs() * ((stream ^ wanted).float() * 2 - 1)
    for expected in (None, "(c) Mallory"):
        found = detect_generative(forged, "victim key", "gaussian_shading", expected, 1e-6)[0]
        assert found.payload != "(c) Mallory" and not found.detected, found
    # The victim's own mark is untouched by the attempt's failure: it still decodes.
    assert detect_generative(victim, "victim key", "gaussian_shading", None, 1e-6)[0].payload == "(c) Alice"


def test_a_text_nobody_with_the_key_wrote_fails_the_tag():
    # The strongest forger: knows the layout, the stream and the nonce (an insider without the MAC key), and
    # flips the encrypted text's bits (a stream cipher is malleable) and recomputes the Reed-Solomon parity.
    nonce = _nonces(1)[0]
    sealed = bytearray(seal_text("(c) Alice", "k", nonce, generative.TEXT_BYTES, generative.TAG_BYTES))
    text_at = slice(generative.NONCE_BYTES, generative.NONCE_BYTES + generative.TEXT_BYTES)
    flip = bytes(a ^ b for a, b in zip(b"(c) Alice".ljust(12, b"\0"), b"(c) Mallory".ljust(12, b"\0")))
    sealed[text_at] = bytes(a ^ b for a, b in zip(sealed[text_at], flip))
    forged_code = encode_bytes(bytes(sealed), generative.DATA_BYTES, generative.PARITY_BYTES)
    forged = generative.gaussian_shading_noise(forged_code[None], "k", (1, 4, 16, 16), torch.Generator())
    found = detect_generative(forged, "k", "gaussian_shading", None, 1e-6)[0]
    assert found.payload is None and not found.detected and found.p_value == 1.0
    # Without the tag check the flip would have worked: the decrypted text is the forger's.
    tag_free = bytes(a ^ b for a, b in zip(sealed[text_at], chacha20_bytes("k", "sealed-text", 12, nonce)))
    assert tag_free.rstrip(b"\0") == b"(c) Mallory"
    # And the honest seal still opens.
    honest = _marked("(c) Alice", "k", (1, 4, 16, 16), nonces=[nonce])
    assert detect_generative(honest, "k", "gaussian_shading", None, 1e-6)[0].payload == "(c) Alice"


def test_a_replayed_mark_reads_as_the_original_with_its_nonce():
    # Decision: the mark authenticates its text and nonce, not the picture (it is written before the picture
    # exists). Copying one image's signs onto another noise gives a valid mark carrying the original's nonce; the
    # detector reports the nonce, so two images with one nonce expose the copy.
    original = _marked("(c) Alice", "k", (1, 4, 16, 16), seed=1)
    replayed = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9)).abs() * original.sign()
    other = _marked("(c) Alice", "k", (1, 4, 16, 16), seed=2)
    found = [detect_generative(x, "k", "gaussian_shading", None, 1e-6)[0] for x in (original, replayed, other)]
    assert all(f.detected and f.payload == "(c) Alice" for f in found)
    assert found[0].nonce == found[1].nonce == _nonces(1, 1)[0].hex() != found[2].nonce


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_a_quarter_crop_costs_every_bit_a_quarter_of_its_copies(side):
    layout = generative.bit_layout("k", (4, 64, 64))
    keep = {"left": (slice(None), slice(16, None)), "right": (slice(None), slice(None, 48)),
            "top": (slice(16, None), slice(None)), "bottom": (slice(None, 48), slice(None))}[side]
    kept = torch.bincount(layout[(slice(None),) + keep].flatten(), minlength=256)
    assert int(kept.min()) == int(kept.max()) == 48  # 64 copies each, every bit loses exactly 16
    # The cropped quarter (Gaussian Shading's crop attack: in place, the rest replaced) costs no text.
    noise = _marked("crop-proof", "k", (1, 4, 64, 64))
    cropped = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    cropped[(slice(None), slice(None)) + keep] = noise[(slice(None), slice(None)) + keep]
    found = detect_generative(cropped, "k", "gaussian_shading", None, 1e-6)[0]
    assert found.detected and found.payload == "crop-proof"


def test_gaussian_shading_null_p_values_are_not_too_small():
    # Unmarked latents (or another key's marks): the reported p-value must be super-uniform, P(p <= a) <= a.
    latents = torch.randn(100, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    found = detect_generative(latents, "k", "gaussian_shading", "atelier", 0.05)
    p_values = np.array([f.p_value for f in found])
    for level in (0.05, 0.2, 0.5):
        assert (p_values <= level).mean() <= level + 3 * (level * (1 - level) / 100) ** 0.5
    assert all(f.payload is None for f in found)


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
    return ref, encode.encode(Clip(ref), "a red circle", "auto")[0], encode.encode(Clip(ref), "", "auto")[0]


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
    ref, _, _ = tiny
    empty = encode_prompt(ref.model.tokenizers, ref.model.text_encoders, ref.model.family, "")
    noise = _marked("inverted", "k", (1, 4, 16, 16))
    clean = _sample(tiny, {"samples": torch.zeros(1, 4, 16, 16), INITIAL_NOISE_KEY: noise}, cfg=1.0)["samples"]
    codec = DiffusersCodec(ref.model.vae)
    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    initial = generative.ddim_invert(denoiser, clean * codec.scaling_factor, empty, 3)
    assert float(((initial > 0) == (noise > 0)).float().mean()) > 0.9
    found = detect_generative(initial, "k", "gaussian_shading", "inverted", 1e-6)[0]
    assert found.detected and found.payload == "inverted"


def test_exact_inversion_undoes_ddim_where_plain_inversion_drifts(tiny):
    # Hong et al.'s correction: each inverted step is moved until sampling from it lands where it started, so with
    # the sampling's own conditioning the noise comes back far closer than plain DDIM inversion brings it.
    ref, _, _ = tiny
    prompt = encode_prompt(ref.model.tokenizers, ref.model.text_encoders, ref.model.family, "a red circle")
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    clean = _sample(tiny, {"samples": torch.zeros(1, 4, 16, 16), INITIAL_NOISE_KEY: noise}, cfg=1.0)["samples"]
    codec = DiffusersCodec(ref.model.vae)
    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    plain = generative.ddim_invert(denoiser, clean * codec.scaling_factor, prompt, 3)
    exact = generative.ddim_invert(denoiser, clean * codec.scaling_factor, prompt, 3, exact_iterations=60)
    plain_error, exact_error = float((plain - noise).abs().mean()), float((exact - noise).abs().mean())
    assert exact_error < plain_error / 3, (exact_error, plain_error)


def test_decoder_inversion_finds_a_latent_that_decodes_closer_than_the_encoders(tiny):
    ref, _, _ = tiny
    codec = DiffusersCodec(ref.model.vae)

    def decode(scaled: torch.Tensor) -> torch.Tensor:
        return ref.model.vae.decode(scaled / codec.scaling_factor).sample

    truth = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        image = ((decode(truth) + 1) / 2).clamp(0, 1)
    encoded = codec.encode(image) * codec.scaling_factor
    inverted = generative.decoder_inversion(decode, image, encoded)
    with torch.no_grad():
        before, after = ((decode(encoded) - (image * 2 - 1)).square().mean(),
                         (decode(inverted) - (image * 2 - 1)).square().mean())
    # Measured: 0.252 → 0.110 on the tiny random VAE; 0.054 → 0.0007 on the embedded model's.
    assert float(after) < float(before) / 2, (float(after), float(before))


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
    assert torch.equal(encode.encode(Clip(ref), prompt, "auto")[0][0][0],  # CONDITIONING: [[states, extras]]
                       encode.encode(Clip(ref), "a red circle, on grass", "auto")[0][0][0])
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

