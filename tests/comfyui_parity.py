"""The same API prompt through real ComfyUI and through Atelier: what ``test_comfy_parity.py`` and
``bench/comfy_parity.py`` share.

The prompt is ComfyUI's default text-to-image graph at 64×64 on a random-weight SD1.5 checkpoint
(``comfyui_fixtures.write_default_init_sd15``); the images are compared by PSNR. Issue 17's target is 40 dB for
every pair: what remains is float32 arithmetic.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SEED = 42
STEPS = 4  # few, because a full-size SD1.5 step costs seconds on two CPU cores; enough for multistep rules
CFG = 7.0
POSITIVE = "a watercolour lighthouse on a cliff at dusk"
NEGATIVE = "blurry, text"
TARGET_PSNR_DB = 40.0

SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
            "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2")
# Issue 17's sweep: every sampler above with the normal scheduler, then every scheduler with euler.
PAIRS = tuple([(sampler, "normal") for sampler in SAMPLERS] + [("euler", scheduler) for scheduler in SCHEDULERS[1:]])
# The test's share of the sweep: one sampler of each kind (first order, multistep, ancestral, SDE with ComfyUI's
# Brownian tree, predictor-corrector) and a second scheduler; bench/comfy_parity.py runs all of PAIRS.
TEST_PAIRS = (("euler", "normal"), ("dpmpp_2m", "normal"), ("euler_ancestral", "normal"), ("dpmpp_2m_sde", "karras"),
              ("uni_pc", "normal"), ("euler", "simple"))


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


class AtelierRunner:
    """Atelier's standalone executor with its built-in nodes, on a models folder; one loaded model for all prompts."""

    def __init__(self, models_dir: str, data_dir: str, extra_classes: dict[str, type] | None = None):
        from web.executor import Executor
        from web.folders import DataFolders
        from web.registry import node_classes

        self.folders = DataFolders.under(data_dir)
        self.executor = Executor({**node_classes(self.folders, models_dir), **(extra_classes or {})})

    def outputs(self, prompt: dict) -> dict[str, dict]:
        """Each output node's UI outputs; a refused or failed prompt raises with its message."""
        checked = self.executor.validate(prompt)
        assert checked.ok, (checked.error, checked.node_errors)
        result = self.executor.execute(checked.prompt, "parity", checked.outputs)
        if result.status != "success":
            raise AssertionError([data for event, data in result.messages if event == "execution_error"])
        return result.outputs

    def run(self, prompt: dict) -> dict[str, list[np.ndarray]]:
        """Each output node's images as (H, W, C) uint8 arrays; a refused or failed prompt raises with its message."""
        return {node_id: [self._read(item) for item in output["images"]]
                for node_id, output in self.outputs(prompt).items() if output.get("images")}

    def _read(self, item: dict) -> np.ndarray:
        path = os.path.join(self.folders.folder(item["type"]), item.get("subfolder", ""), item["filename"])
        with Image.open(path) as image:
            return np.asarray(image)
