"""Atelier's Tiled Diffusion Patch inside real ComfyUI (issue 21 (a)): CheckpointLoaderSimple's MODEL → the patch
→ ComfyUI's own KSampler → VAEDecode, on the random-weight SD1.5 file of ``random_sd15_models``.

Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when ``../shared/comfyui`` exists).
One prompt holds every branch, so the checkpoint loads once: 256×256 images (32×32 latents), 2 steps; the tiled
branches use 16-latent (128 px) tiles, the equivalence branches one tile as large as the latent.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from nodes.highres.tiling import MODES

SEED = 11
SIZE_PX = 256  # a 32×32 latent
TILE_PX = 128  # 16 latent pixels
OVERLAP_PX = 32  # 4 latent pixels
OFFSET_STRIDE_PX = 64  # 8 latent pixels: (16 / 8)² offsets per shifted cycle
STEPS = 2
# Tiles of a 32-latent side with 4 of overlap: 3 per axis, 9 in all.
TILE_BATCH_SIZE = 4
# Bit-exact is what the one-tile blend gives (its weight is exactly 1); the issue allows up to this much.
EQUIVALENCE_TOLERANCE = 1e-5


def tiled_patch(mode: str, tile_px: int) -> dict:
    return {"class_type": "AtelierTiledDiffusion", "inputs": {
        "model": ["4", 0], "mode": mode, "tile_size": tile_px, "overlap": OVERLAP_PX,
        "offset_stride": OFFSET_STRIDE_PX, "tile_batch_size": TILE_BATCH_SIZE, "offset_seed": 0}}


def ksampler(model: list) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": SEED, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}


def tiled_prompt(checkpoint: str) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The prompt, and the node ids of its SaveImage per branch ("plain", and each mode with 16-latent tiles) and
    of its SaveLatent per branch ("plain", and each mode with one tile)."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour town at noon", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE_PX, "height": SIZE_PX, "batch_size": 1}},
        "plain_sample": ksampler(["4", 0]),
        "plain_save": {"class_type": "SaveLatent", "inputs": {"samples": ["plain_sample", 0],
                                                              "filename_prefix": "plain"}},
        "plain_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["plain_sample", 0], "vae": ["4", 2]}},
        "plain_image": {"class_type": "SaveImage", "inputs": {"filename_prefix": "plain",
                                                              "images": ["plain_decode", 0]}},
    }
    images, latents = {"plain": "plain_image"}, {"plain": "plain_save"}
    for mode in MODES:
        prompt[f"{mode}_patch"] = tiled_patch(mode, TILE_PX)
        prompt[f"{mode}_sample"] = ksampler([f"{mode}_patch", 0])
        prompt[f"{mode}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{mode}_sample", 0],
                                                                          "vae": ["4", 2]}}
        prompt[f"{mode}_image"] = {"class_type": "SaveImage", "inputs": {
            "filename_prefix": f"tiled_{mode}", "images": [f"{mode}_decode", 0]}}
        images[mode] = f"{mode}_image"
        prompt[f"{mode}_one_patch"] = tiled_patch(mode, SIZE_PX)
        prompt[f"{mode}_one_sample"] = ksampler([f"{mode}_one_patch", 0])
        prompt[f"{mode}_one_save"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"{mode}_one_sample", 0], "filename_prefix": f"one_tile_{mode}"}}
        latents[mode] = f"{mode}_one_save"
    return prompt, images, latents


@pytest.fixture(scope="module")
def tiled_run(comfyui_server, random_sd15_models) -> tuple[dict, dict, dict]:
    """The prompt's /history entry, its SaveImage ids by mode and its SaveLatent ids by branch."""
    prompt, images, latents = tiled_prompt(random_sd15_models.checkpoint)
    entry = comfyui_server.wait(comfyui_server.queue(prompt))
    return entry, images, latents


def saved_latent(server, entry: dict, node_id: str) -> np.ndarray:
    """The latent a SaveLatent node wrote into ComfyUI's output folder."""
    (item,) = entry["outputs"][node_id]["latents"]
    path = os.path.join(server.folder("output"), item["subfolder"], item["filename"])
    return load_file(path)["latent_tensor"]


@pytest.mark.parametrize("mode", MODES)
def test_tiled_patch_runs_in_comfyuis_ksampler_to_a_256px_image(comfyui_server, tiled_run, mode):
    """(a): CheckpointLoaderSimple → the patch (16-latent tiles) → KSampler → VAEDecode → SaveImage, to success."""
    entry, images, _ = tiled_run
    (item,) = entry["outputs"][images[mode]]["images"]
    image = comfyui_server.image(item)
    assert image.shape == (SIZE_PX, SIZE_PX, 3) and image.std() > 10.0


@pytest.mark.parametrize("mode", MODES)
def test_one_tile_covering_the_latent_gives_comfyuis_own_latent(comfyui_server, tiled_run, mode):
    """The patch with one tile as large as the latent: the same latent as KSampler on the unpatched MODEL."""
    entry, _, latents = tiled_run
    plain = saved_latent(comfyui_server, entry, latents["plain"])
    one_tile = saved_latent(comfyui_server, entry, latents[mode])
    assert plain.shape == one_tile.shape == (1, 4, SIZE_PX // 8, SIZE_PX // 8)
    difference = float(np.abs(one_tile.astype(np.float64) - plain).max())
    print(f"{mode}, one tile vs no patch: max |Δlatent| = {difference:.3g}")
    assert difference <= EQUIVALENCE_TOLERANCE


def test_tiles_change_the_image(comfyui_server, tiled_run):
    """16-latent tiles do change the picture (the patch is not a no-op), and each mode blends differently."""
    entry, images, _ = tiled_run
    pictures = {branch: comfyui_server.image(entry["outputs"][node]["images"][0]) for branch, node in images.items()}
    for mode in MODES:
        assert not np.array_equal(pictures[mode], pictures["plain"]), mode
    assert len({pictures[mode].tobytes() for mode in MODES}) == len(MODES)
