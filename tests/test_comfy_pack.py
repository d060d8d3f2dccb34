"""The pack inside real ComfyUI (v0.3.64, a server from its own venv, the pack symlinked into its custom_nodes/):
Atelier's techniques in ComfyUI's idioms, on ComfyUI's own MODEL (issue 21, "Must show").

(c) Atelier's momentum samplers are SAMPLERs and its F-scheduler is SIGMAS for ComfyUI's SamplerCustom, on the
checkpoint ComfyUI's CheckpointLoaderSimple loaded (the random-weight SD1.5 file of ``random_sd15_models``).

Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when ``../shared/comfyui`` exists). A
full-size SD1.5 step costs seconds on two CPU cores, so the images are 64×64 and the runs 3 to 5 steps (the
F-scheduler's fewest).
"""

from __future__ import annotations

import numpy as np
import pytest

from comfyui_parity import psnr

SEED = 7
CFG = 7.0
F_SCHEDULER_STEPS = 5
CUSTOM_STEPS = 3  # for the samplers on ComfyUI's own scheduler: enough for the multistep rules' second step
SAVE_NODE = "9"


def custom_sampling_prompt(checkpoint: str, sampler: dict, sigmas: dict, prefix: str) -> dict:
    """CheckpointLoaderSimple → EmptyLatentImage 64×64 → SamplerCustom with ``sampler`` (node 11) and ``sigmas``
    (node 10), both given as API-format nodes → VAEDecode → SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff at dusk", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": sigmas,
        "11": sampler,
        "3": {"class_type": "SamplerCustom", "inputs": {
            "model": ["4", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["11", 0], "sigmas": ["10", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def momentum_sampler(method: str, momentum: float) -> dict:
    return {"class_type": "AtelierMomentumSampler", "inputs": {"method": method, "momentum": momentum}}


def f_scheduler() -> dict:
    return {"class_type": "AtelierFScheduler", "inputs": {"model": ["4", 0], "steps": F_SCHEDULER_STEPS}}


def comfyui_scheduler() -> dict:
    return {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal",
                                                       "steps": CUSTOM_STEPS, "denoise": 1.0}}


def saved_image(server, prompt: dict) -> np.ndarray:
    """Run ``prompt`` to success and return the one image its SaveImage wrote."""
    (image,) = server.run(prompt)[SAVE_NODE]
    return image


@pytest.fixture(scope="module")
def ddim_image(comfyui_server, random_sd15_models) -> np.ndarray:
    """ComfyUI's own ddim (KSamplerSelect) on Atelier's F-scheduler SIGMAS."""
    prompt = custom_sampling_prompt(random_sd15_models.checkpoint, {"class_type": "KSamplerSelect",
                                                                    "inputs": {"sampler_name": "ddim"}},
                                    f_scheduler(), "ddim")
    return saved_image(comfyui_server, prompt)


def test_ghvb_sampler_and_f_scheduler_sigmas_run_in_comfyuis_sampler_custom(comfyui_server, random_sd15_models,
                                                                            ddim_image):
    """(c): Atelier's GHVB (the paper's m = 2.5) and F-scheduler drive ComfyUI's SamplerCustom to a picture, and
    the momentum changes it: it is not ddim's."""
    prompt = custom_sampling_prompt(random_sd15_models.checkpoint, momentum_sampler("ghvb", 2.5), f_scheduler(),
                                    "ghvb")
    image = saved_image(comfyui_server, prompt)
    assert image.shape == (64, 64, 3) and image.std() > 10.0
    # m = 1 gives ddim's image bit for bit (the next test), so any difference is the momentum's
    print(f"GHVB m=2.5 vs ddim: {psnr(image, ddim_image):.2f} dB")
    assert not np.array_equal(image, ddim_image)


def test_ghvb_with_momentum_one_inside_comfyui_is_comfyuis_ddim(comfyui_server, random_sd15_models, ddim_image):
    """GHVB with m = 1 is DDIM: inside ComfyUI, on the same seed and sigmas, its image is ComfyUI's ddim's, bit for
    bit (one update rule, x + (σ_next − σ)·(x − x̂₀)/σ, in the same float32 operations)."""
    prompt = custom_sampling_prompt(random_sd15_models.checkpoint, momentum_sampler("ghvb", 1.0), f_scheduler(),
                                    "ghvb_m1")
    np.testing.assert_array_equal(saved_image(comfyui_server, prompt), ddim_image)


@pytest.mark.parametrize("method,momentum", [("hb_plms", 3.8), ("hb_dpmpp_2m", 0.8)])
def test_hb_samplers_run_in_comfyuis_sampler_custom(comfyui_server, random_sd15_models, method, momentum):
    """HB (on PLMS) and HB-DPM++2M are SAMPLERs too, on ComfyUI's own scheduler."""
    prompt = custom_sampling_prompt(random_sd15_models.checkpoint, momentum_sampler(method, momentum),
                                    comfyui_scheduler(), method)
    image = saved_image(comfyui_server, prompt)
    assert image.shape == (64, 64, 3) and image.std() > 10.0


def test_the_opt_in_evaluation_node_is_absent_without_its_setting(comfyui_server):
    """P4D (dual use) joins ComfyUI's node list only with ATELIER_EVALUATION_NODES=1 (tests/test_comfy_pack_p4d.py);
    the pack's other nodes are there."""
    offered = comfyui_server.get_json("/object_info")
    assert "AtelierP4D" not in offered and "AtelierMagicFaceSampler" in offered
