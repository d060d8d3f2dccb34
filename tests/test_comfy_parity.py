"""Real ComfyUI (v0.3.64, run as a server from its own venv) on the text-to-image prompt of its default workflow.

Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when ``../shared/comfyui`` exists).
The server stays up for the whole module and the random-weight SD1.5 checkpoint is written once per session.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from comfyui_host import ComfyUIError

SEED = 42
STEPS = 4  # few, because a full-size SD1.5 step costs seconds on two CPU cores; enough for multistep rules
CFG = 7.0
POSITIVE = "a watercolour lighthouse on a cliff at dusk"
NEGATIVE = "blurry, text"


def txt2img_prompt(checkpoint: str, sampler_name: str = "euler", scheduler: str = "normal", seed: int = SEED,
                   prefix: str = "parity") -> dict:
    """ComfyUI's default text-to-image graph in API format (its node ids), at 64×64."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images of one shape (inf when identical)."""
    assert first.shape == second.shape, (first.shape, second.shape)
    mse = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def only_image(images: dict[str, list[np.ndarray]]) -> np.ndarray:
    """The single image of the prompt's single SaveImage node."""
    assert list(images) == ["9"] and len(images["9"]) == 1, {node: len(found) for node, found in images.items()}
    return images["9"][0]


def test_comfyui_runs_the_prompt_deterministically(comfyui_server, random_sd15_models):
    """ComfyUI loads the random checkpoint and returns one 64×64 image; the same prompt gives the same image after
    the server drops its models and caches (so the weights are read the same way each time), another seed another."""
    prompt = txt2img_prompt(random_sd15_models.checkpoint)
    first = only_image(comfyui_server.run(prompt))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first.std() > 10.0, f"std {first.std():.1f}: a near-constant image cannot tell implementations apart"
    comfyui_server.free()
    again = only_image(comfyui_server.run(txt2img_prompt(random_sd15_models.checkpoint, prefix="again")))
    np.testing.assert_array_equal(again, first)
    other_seed = only_image(comfyui_server.run(txt2img_prompt(random_sd15_models.checkpoint, seed=SEED + 1)))
    assert psnr(other_seed, first) < 30.0


def test_comfyui_reports_errors_in_its_own_words(comfyui_server, random_sd15_models):
    """A prompt ComfyUI refuses raises with its node_errors; one that fails while running raises with the failing
    node and ComfyUI's exception message."""
    with pytest.raises(ComfyUIError, match="value_not_in_list"):
        comfyui_server.queue(txt2img_prompt("no_such_model.safetensors"))
    broken = os.path.join(random_sd15_models.path, "checkpoints", "broken.safetensors")
    save_file({"not_a_model": torch.zeros(4)}, broken)
    with pytest.raises(ComfyUIError, match=r"node 4 \(CheckpointLoaderSimple\): .*(model type|detect)"):
        comfyui_server.run(txt2img_prompt("broken.safetensors"))


def test_comfyui_hosts_every_atelier_node(comfyui_server):
    """The pack, symlinked into the server's custom_nodes/, loads inside ComfyUI with every one of its nodes."""
    missing = set(nodes.NODE_CLASS_MAPPINGS) - comfyui_server.node_types()
    assert not missing, f"ComfyUI lacks {sorted(missing)}; its log:\n{comfyui_server.log_tail()}"

