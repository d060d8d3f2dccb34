"""Atelier's model-driven techniques on the user's own ComfyUI MODEL, CLIP and VAE (issue 21, part 2): OmniSSR
inside real ComfyUI on what CheckpointLoaderSimple loaded (the random-weight SD1.5 file of ``random_sd15_models``),
through the adapters of ``nodes/models/comfy_adapters.py``, and the same prompt standalone on Atelier's loader of
the same file.

The server tests skip where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when
``../shared/comfyui`` exists). Both hosts run float32 (ComfyUI with ``FLOAT32_FLAGS``), so their images differ by
float32 arithmetic only.
"""

from __future__ import annotations

import pytest

from comfyui_parity import AtelierRunner, psnr
from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.models.comfy_adapters import model_family
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef

SEED = 7
SAVE_NODE = "9"
# Both hosts run the same float32 graph; the OmniSSR run below measured 92 dB between them (2 DDIM steps on six
# planes, each step's planes merged, projected and re-encoded). 40 dB is issue 17's parity target.
TARGET_PSNR_DB = 40.0


def test_model_family_reads_ateliers_model_and_refuses_anything_else(tiny_sd1):  # noqa: F811
    assert model_family(ModelRef(load_model(tiny_sd1.folder))) == "sd1"
    with pytest.raises(TypeError, match="got str"):
        model_family("sd1")


def omnissr_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple's MODEL and VAE, empty prompts through CLIPTextEncode, and OmniSSR ×2 on a 32×64
    synthetic panorama over a cube of six 64² planes (8×8 latents, the least an SD1.5 UNet's three downsamplings
    take), 2 steps: a 64×128 panorama, saved."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "20": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "21": {"class_type": "AtelierPlaneLayout", "inputs": {"preset": "cube_6", "plane_size": 64, "fov_deg": 90.0,
                                                              "erp_height": 64}},
        "22": {"class_type": "AtelierOmniSSR", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "positive": ["6", 0], "negative": ["6", 0], "panorama": ["20", 0],
            "layout": ["21", 0], "scale": 2, "steps": 2, "cfg": 1.0, "strength": 1.0, "every_k": 1, "gamma_l": 0.5,
            "gamma_e": 1.0, "seed": SEED}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "omnissr", "images": ["22", 0]}},
    }


def test_omnissr_runs_on_comfyuis_own_model_and_matches_the_standalone_run(comfyui_server, random_sd15_models,
                                                                          tmp_path):
    """OmniSSR runs to success inside ComfyUI on its MODEL and VAE (through ``denoiser_and_codec``), and Atelier's
    own loader of the same file gives the same panorama: the adapters are the same model, step for step."""
    prompt = omnissr_prompt(random_sd15_models.checkpoint)
    (comfy_image,) = comfyui_server.run(prompt)[SAVE_NODE]
    (atelier_image,) = AtelierRunner(random_sd15_models.path, str(tmp_path / "atelier")).run(prompt)[SAVE_NODE]
    assert comfy_image.shape == atelier_image.shape == (64, 128, 3)
    measured = psnr(comfy_image, atelier_image)
    print(f"OmniSSR, ComfyUI against Atelier: {measured:.1f} dB")
    assert measured >= TARGET_PSNR_DB

