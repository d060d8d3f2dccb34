"""The Gaussian-Shading watermark inside real ComfyUI (issue 21, "Must show" (b)): Atelier's Watermark Noise is the
NOISE of ComfyUI's SamplerCustomAdvanced on the MODEL that ComfyUI's CheckpointLoaderSimple loaded (the
random-weight SD1.5 file of ``random_sd15_models``), and Detect Watermark inverts the decoded image on that same
MODEL and VAE through Atelier's adapters (``nodes/models/comfy_adapters.py``).

The server tests skip where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when
``../shared/comfyui`` exists). Random weights generate no image a mark survives, so they assert that both halves run
to success and that the detector reports in its format; the in-process tests pin the NOISE itself.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from PIL import Image

from comfyui_parity import AtelierRunner
from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec
from nodes.models.clip import Clip
from nodes.models.comfy_adapters import denoiser_and_codec, text_conditioning
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef
from nodes.sampling.latents import INITIAL_NOISE_KEY
from nodes.sampling.noise import prepare_noise
from nodes.watermark import latent as generative
from nodes.watermark import nodes as watermark_nodes
from nodes.watermark.detect import detect_generative
from nodes.watermark.nodes import AtelierWatermarkLatent, AtelierWatermarkNoise, WatermarkKey
from web.nodes_sampling import BasicScheduler, CFGGuider, KSamplerSelect, SamplerCustomAdvanced

SEED = 7
STEPS = 3
INVERSION_STEPS = 3
PAYLOAD = "atelier"
KEY = WatermarkKey("k", "ab" * 32)
FIXED_NONCE = bytes(range(6))
SAVE_NODE, DETECT_NODE, TREE_RING_NODE = "9", "13", "14"
# Detection.summary()'s line: verdict, p-value at the FPR, bit accuracy against the expected text.
REPORT = re.compile(r"^gaussian shading: (watermarked|no watermark found) \(p = \S+ at FPR 1e-06, "
                    r"bit accuracy ([01]\.\d{3})")
TREE_RING_REPORT = re.compile(r"^tree-ring: (watermarked|no watermark found) \(p = (\S+) at FPR")
# The hosts' float32 runs differ by rounding, which flips only the inverted values nearest 0: two of the 208
# compared bits is far more than that (an 8 × 8 latent holds one copy of each bit, so no vote hides a flip).
BIT_ACCURACY_TOLERANCE = 2 / 208
# Tree-Ring's p-value is a smooth function of the whole inverted spectrum: rounding moves it far less than 1 %.
TREE_RING_P_RELATIVE_TOLERANCE = 0.01


@pytest.fixture
def fixed_nonce(monkeypatch):
    """Every image's nonce is FIXED_NONCE (it is fresh random bytes otherwise), so two nodes' noises compare."""
    monkeypatch.setattr(watermark_nodes.secrets, "token_bytes", lambda size: FIXED_NONCE[:size])


@pytest.mark.parametrize("mode", ["gaussian_shading", "tree_ring"])
def test_watermark_noise_is_the_watermark_latents_noise(fixed_nonce, mode):
    """For one key, payload, seed and nonce the NOISE generates what Watermark Latent carries to Atelier's
    samplers, shaped like the latent, on the CPU, in float32 (ComfyUI's NOISE contract)."""
    latent = {"samples": torch.zeros(2, 4, 8, 16)}
    noise, prompt = AtelierWatermarkNoise().get_noise(KEY, mode, PAYLOAD, "a fox [watermark]", "[watermark]", SEED)
    carried, latent_prompt = AtelierWatermarkLatent().inject(latent, KEY, mode, PAYLOAD, "a fox [watermark]",
                                                             "[watermark]", SEED)
    generated = noise.generate_noise(latent)
    assert prompt == latent_prompt == "a fox" and noise.seed == SEED
    assert generated.shape == (2, 4, 8, 16) and generated.device.type == "cpu" and generated.dtype == torch.float32
    assert torch.equal(generated, carried[INITIAL_NOISE_KEY])


def test_watermark_noise_without_its_trigger_is_random_noise_for_the_seed():
    latent = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [3]}
    noise, prompt = AtelierWatermarkNoise().get_noise(KEY, "gaussian_shading", PAYLOAD, "a fox", "[watermark]", SEED)
    assert prompt == "a fox"
    assert torch.equal(noise.generate_noise(latent), prepare_noise(latent["samples"], SEED, [3]))
    always, _ = AtelierWatermarkNoise().get_noise(KEY, "gaussian_shading", PAYLOAD, "a fox", "", SEED)
    assert not torch.equal(always.generate_noise(latent), noise.generate_noise(latent))


def test_watermark_noise_gives_each_image_its_own_nonce():
    """Two calls (two runs of SamplerCustomAdvanced) draw two nonces: the same key, text and seed, other signs."""
    noise, _ = AtelierWatermarkNoise().get_noise(KEY, "gaussian_shading", PAYLOAD, "", "", SEED)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    first, second = noise.generate_noise(latent), noise.generate_noise(latent)
    assert torch.equal(first.abs(), second.abs()) and not torch.equal(first, second)


def test_watermark_noise_drives_ateliers_sampler_custom_advanced_and_the_adapters_read_it_back(tiny_sd1):  # noqa: F811
    """Standalone, the same NOISE goes into Atelier's SamplerCustomAdvanced (ddim, 3 steps, guidance 1 on the tiny
    model), and the Denoiser that :func:`denoiser_and_codec` makes of Atelier's MODEL inverts the result back to a
    mark that decodes (the VAE is left out: the tiny model's random one keeps no mark)."""
    model = ModelRef(load_model(tiny_sd1.folder))
    clip, codec = Clip(model), DiffusersCodec(model.model.vae)
    empty = clip.encode("")
    noise, _ = AtelierWatermarkNoise().get_noise(KEY, "gaussian_shading", PAYLOAD, "", "", SEED)
    (guider,) = CFGGuider().get_guider(model, empty, empty, 1.0)
    (sampler,) = KSamplerSelect().get_sampler("ddim")
    (sigmas,) = BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)
    sampled, _ = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas,
                                                {"samples": torch.zeros(1, 4, 16, 16)})
    with denoiser_and_codec(model, codec) as (denoiser, same_codec):
        assert same_codec is codec
        initial = generative.ddim_invert(denoiser, sampled["samples"] * codec.scaling_factor,
                                         text_conditioning(clip, ""), STEPS)
    (found,) = detect_generative(initial, KEY.secret, "gaussian_shading", PAYLOAD, 1e-6)
    assert found.detected and found.payload == PAYLOAD


def watermark_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple → Watermark Noise (its prompt output to CLIPTextEncode) → SamplerCustomAdvanced at
    64×64 → VAEDecode → SaveImage, and Detect Watermark on the decoded image with the same MODEL, CLIP and VAE."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "1": {"class_type": "AtelierWatermarkKey", "inputs": {"key_name": "comfy_test"}},
        "2": {"class_type": "AtelierWatermarkNoise", "inputs": {
            "key": ["1", 0], "mode": "gaussian_shading", "payload": PAYLOAD,
            "prompt": "a lighthouse on a cliff, [watermark]", "trigger": "[watermark]", "noise_seed": SEED}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 1], "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "10": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 7.0}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["2", 0], "guider": ["10", 0], "sampler": ["11", 0], "sigmas": ["12", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "watermark", "images": ["8", 0]}},
        DETECT_NODE: {"class_type": "AtelierDetectWatermark", "inputs": {
            "image": ["8", 0], "key": ["1", 0], "mode": "gaussian_shading", "expected_payload": PAYLOAD,
            "fpr": 1e-6, "inversion_steps": INVERSION_STEPS, "model": ["4", 0], "clip": ["4", 1],
            "vae": ["4", 2]}},
    }


def test_watermark_noise_in_sampler_custom_advanced_then_detection_on_the_same_model(comfyui_server,
                                                                                    random_sd15_models):
    """(b): both halves run to success inside ComfyUI, on ComfyUI's own MODEL, CLIP and VAE, and the detector
    reports one line in its format for the one image."""
    entry = comfyui_server.wait(comfyui_server.queue(watermark_prompt(random_sd15_models.checkpoint)))
    outputs = entry["outputs"]
    (saved,) = outputs[SAVE_NODE]["images"]
    assert comfyui_server.image(saved).shape == (64, 64, 3)
    (report,) = outputs[DETECT_NODE]["text"]
    print(f"detector on random weights: {report}")
    assert len(report.splitlines()) == 1 and REPORT.match(report), report


def detection_prompt(checkpoint: str, image_name: str) -> dict:
    """LoadImage → Detect Watermark (Gaussian Shading, and Tree-Ring) on CheckpointLoaderSimple's MODEL, CLIP and
    VAE: a prompt both hosts run."""
    prompt = watermark_prompt(checkpoint)
    detect = {**prompt[DETECT_NODE], "inputs": {**prompt[DETECT_NODE]["inputs"], "image": ["20", 0]}}
    tree_ring = {**detect, "inputs": {**detect["inputs"], "mode": "tree_ring"}}
    return {"4": prompt["4"], "1": prompt["1"], "20": {"class_type": "LoadImage", "inputs": {"image": image_name}},
            DETECT_NODE: detect, TREE_RING_NODE: tree_ring}


def test_detection_inside_comfyui_reads_the_bits_ateliers_own_model_reads(comfyui_server, random_sd15_models,
                                                                          tmp_path):
    """The adapters are the same model: one saved image, detected inside ComfyUI (its MODEL, CLIP and VAE through
    the adapters) and standalone (Atelier's loader of the same file), gives the same Gaussian-Shading bit accuracy
    and Tree-Ring p-value up to rounding. Tree-Ring's p, a smooth function of the whole inverted latent, is the
    sharp check: feeding ComfyUI's model x_VP instead of x_VE moved it from 0.815 to 0.968, while on random weights
    the bit accuracy stayed (0.606 in both hosts)."""
    entry = comfyui_server.wait(comfyui_server.queue(watermark_prompt(random_sd15_models.checkpoint)))
    (saved,) = entry["outputs"][SAVE_NODE]["images"]
    pixels = comfyui_server.image(saved)
    atelier = AtelierRunner(random_sd15_models.path, str(tmp_path / "atelier"))
    for folder in (comfyui_server.folder("input"), atelier.folders.folder("input")):
        Image.fromarray(pixels).save(os.path.join(folder, "marked.png"))
    prompt = detection_prompt(random_sd15_models.checkpoint, "marked.png")

    comfy_outputs = comfyui_server.wait(comfyui_server.queue(prompt))["outputs"]
    checked = atelier.executor.validate(prompt)
    assert checked.ok, (checked.error, checked.node_errors)
    result = atelier.executor.execute(checked.prompt, "watermark", checked.outputs)
    assert result.status == "success", result.messages
    reports = {node: [outputs[node]["text"][0] for outputs in (comfy_outputs, result.outputs)]
               for node in (DETECT_NODE, TREE_RING_NODE)}
    print(f"ComfyUI, Atelier: {reports}")
    accuracies = [float(REPORT.match(report).group(2)) for report in reports[DETECT_NODE]]
    assert abs(accuracies[0] - accuracies[1]) <= BIT_ACCURACY_TOLERANCE + 1e-9, accuracies
    comfy_p, atelier_p = [float(TREE_RING_REPORT.match(report).group(2)) for report in reports[TREE_RING_NODE]]
    assert abs(comfy_p - atelier_p) <= TREE_RING_P_RELATIVE_TOLERANCE * atelier_p, (comfy_p, atelier_p)
