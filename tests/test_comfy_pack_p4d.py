"""Prompting4Debugging inside real ComfyUI (issue 24): with the evaluation setting on, the audit node is offered in
ComfyUI and runs on ComfyUI's own MODEL, CLIP and VAE (the embedded model's, through the pack's embedded loader),
whose inference-mode weights it optimises through on copies; it finds the standalone run's prompt. Without the
setting the node is absent (``tests/test_comfy_pack.py``, whose server runs without it).

Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from comfyui_fixtures import comfyui_environment  # noqa: F401  (fixture)
from comfyui_host import ComfyUIServer
from comfyui_parity import AtelierRunner
from nodes.p4d import nodes as evaluation_nodes

PROMPT = "a large black square near the top, on a striped white background"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("no_models"))  # the embedded model ships with the pack


@pytest.fixture(scope="module")
def server(comfyui_environment, models_dir, tmp_path_factory) -> Iterator[ComfyUIServer]:  # noqa: F811
    with ComfyUIServer(comfyui_environment, str(tmp_path_factory.mktemp("comfyui_p4d")), models_dir,
                       variables={evaluation_nodes.EVALUATION_SETTING: "1"}) as running:
        yield running


def audit_prompt() -> dict:
    return {
        "4": {"class_type": "AtelierEmbeddedCheckpointLoader", "inputs": {}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": 3,
            "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
        "20": {"class_type": "AtelierP4D", "inputs": {
            "reference_model": ["4", 0], "safe_model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2],
            "targets": ["12", 0], "prompt": PROMPT, "safe_negative": "black", "variant": "P4D-K", "free_tokens": 16,
            "every_k": 3, "iterations": 4, "learning_rate": 0.1, "weight_decay": 0.1, "eval_every": 3,
            "guidance": 7.5, "seed": 0}},
    }


def test_p4d_audits_comfyuis_own_models_as_standalone(server, models_dir, tmp_path):
    entry = server.wait(server.queue(audit_prompt()))
    (comfy_prompt,) = entry["outputs"]["20"]["text"]
    standalone = AtelierRunner(models_dir, str(tmp_path / "atelier"), evaluation_nodes.NODE_CLASS_MAPPINGS)
    (atelier_prompt,) = standalone.outputs(audit_prompt())["20"]["text"]
    print(f"P4D-K inside ComfyUI found {comfy_prompt!r}; standalone {atelier_prompt!r}")
    assert comfy_prompt == atelier_prompt and "a large black" in comfy_prompt  # P's tokens kept

