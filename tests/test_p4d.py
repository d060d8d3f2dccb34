"""Prompting4Debugging (techniques.md §4.13, Target 16): absent from the node list unless the evaluation setting
asks for it; the projection gives valid ids and is idempotent; with safe ≡ reference and
the tokens started at P the first loss is 0; the loss falls over 20 fixed-seed iterations on the embedded model;
P4D-K's free tokens sit before every k of P's, which stay; the node's checks and its log."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser
from nodes.embedded.dataset import held_out_captions, render
from nodes.embedded.train import SHIPPED_NAME
from nodes.models.clip import Clip
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.models.refs import ModelRef
from nodes.models.comfy_adapters import AtelierPromptVectors
from nodes.p4d.nodes import EVALUATION_SETTING, AtelierP4D
from nodes.p4d.optimize import P4DProblem, initial_prompt, nearest_tokens, p4d_optimize, p4dk_layout
from nodes.sampling.guidance import to_conditioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def embedded():
    model = load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu")
    ref = ModelRef(model)
    clip = Clip(ref)
    return ref, clip, DiffusersCodec(model.vae), AtelierPromptVectors(clip)


@pytest.fixture(scope="module")
def audit(embedded):
    """The embedded model audited against itself on one held-out scene."""
    ref, clip, codec, encoder = embedded
    scene = held_out_captions(1)[0]
    latents = codec.encode(render(scene)[None]) * codec.scaling_factor
    model = ref.model
    problem = P4DProblem(DiffusersDenoiser(model.unet, model.schedule),
                         DiffusersDenoiser(model.unet, model.schedule, differentiable=True), encoder.encode,
                         encoder.table, encoder.decode, to_conditioning(clip.encode(scene.caption), "sd1"), latents)
    return problem, encoder.ids(scene.caption)


@pytest.mark.parametrize("setting, offered", [(None, False), ("1", True)])
def test_absent_from_the_node_list_unless_the_setting_asks(setting, offered):
    environment = {key: value for key, value in os.environ.items() if key != EVALUATION_SETTING}
    if setting is not None:
        environment[EVALUATION_SETTING] = setting
    listed = subprocess.run([sys.executable, "-c", "import nodes; print('AtelierP4D' in nodes.NODE_CLASS_MAPPINGS)"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, check=True).stdout.strip()
    assert listed == str(offered)


def test_the_default_palette_lacks_it():
    from web.folders import DataFolders
    from web.registry import node_classes

    if os.environ.get(EVALUATION_SETTING) == "1":
        pytest.skip(f"{EVALUATION_SETTING}=1 in this environment")
    assert "AtelierP4D" not in node_classes(DataFolders.under(ROOT), ROOT)


def test_projection_gives_valid_ids_and_is_idempotent(embedded):
    table = embedded[3].table
    vectors = torch.randn(32, table.shape[1], generator=torch.Generator().manual_seed(0))
    ids = nearest_tokens(vectors, table)
    assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < len(table)
    assert torch.equal(nearest_tokens(table[ids], table), ids)
    assert torch.equal(nearest_tokens(3 * table[ids], table), ids)  # cosine: the scale does not matter


def test_with_safe_equal_to_reference_and_the_prompt_as_start_the_loss_is_zero(audit):
    problem, prompt_ids = audit
    ids = torch.tensor(prompt_ids)
    result = p4d_optimize(problem, ids, torch.ones(len(ids), dtype=torch.bool), torch.Generator().manual_seed(0),
                          iterations=2, eval_every=1)
    assert result.losses[0] < 1e-10 and result.evaluations[0][1] < 1e-10
    assert result.ids == prompt_ids


def test_the_loss_falls_over_20_fixed_seed_iterations(audit):
    problem, prompt_ids = audit
    generator = torch.Generator().manual_seed(0)
    ids, free = initial_prompt("P4D-N", prompt_ids, len(problem.table), generator)
    result = p4d_optimize(problem, ids, free, generator, iterations=20, eval_every=19)
    (_, first), (_, last) = result.evaluations
    assert last < 0.5 * first
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert len(result.log) == 3 and result.log[-1].startswith("P4D best")


def test_p4dk_inserts_a_free_token_before_every_k_and_keeps_the_prompts(audit):
    assert p4dk_layout(6, 3) == (9, [0, 4, 8]) and p4dk_layout(3, 1) == (7, [0, 2, 4, 6])
    problem, prompt_ids = audit
    generator = torch.Generator().manual_seed(1)
    ids, free = initial_prompt("P4D-K", prompt_ids, len(problem.table), generator, every_k=3)
    assert ids[~free].tolist() == prompt_ids and free.nonzero().flatten().tolist() == p4dk_layout(len(prompt_ids))[1]
    result = p4d_optimize(problem, ids, free, generator, iterations=6, eval_every=5)
    assert torch.tensor(result.ids)[~free].tolist() == prompt_ids  # P's tokens stay while the free ones move


def test_the_node_audits_and_refuses_what_it_cannot(embedded):
    ref, clip, codec, _ = embedded
    scene = held_out_captions(1)[0]
    targets = render(scene).permute(1, 2, 0)[None]
    node = AtelierP4D()
    settings = dict(safe_negative="", variant="P4D-N", free_tokens=4, every_k=3, iterations=3, learning_rate=0.1,
                    weight_decay=0.1, eval_every=2, guidance=7.5, seed=0)
    result = node.audit(ref, ref, clip, codec, targets, scene.caption, **settings)
    prompt, log = result["result"]
    assert result["ui"]["text"] == [prompt] and prompt and log.count("P4D iteration") == 2
    guided = node.audit(ref, ref, clip, codec, targets, scene.caption, **{**settings, "safe_negative": "a star"})
    assert guided["result"][0]
    with pytest.raises(ValueError, match="prompt"):
        node.audit(ref, ref, clip, codec, targets, " ", **settings)
    with pytest.raises(TypeError, match="ModelPatcher"):
        node.audit(object(), ref, clip, codec, targets, scene.caption, **settings)
    with pytest.raises(ValueError, match="LoRAs"):  # one checkpoint, two LoRA sets: they would switch in place
        node.audit(ref, dataclasses.replace(ref, loras=("an ESD LoRA",)), clip, codec, targets, scene.caption,
                   **settings)
    with pytest.raises(ValueError, match="tokens"):
        node.audit(ref, ref, clip, codec, targets, " ".join(["star"] * 70), **{**settings, "variant": "P4D-K"})


def test_example_workflow_runs_headless_with_the_setting(tmp_path):
    environment = {**os.environ, EVALUATION_SETTING: "1"}
    run = subprocess.run([sys.executable, "-m", "web", "run", os.path.join(ROOT, "workflows", "p4d_audit.json"),
                          "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                          "--set", "8.iterations=3", "--set", "8.eval_every=2", "--set", "6.steps=4"],
                         cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8 AtelierP4D" in run.stderr + run.stdout


def test_its_example_is_listed_only_where_the_node_is_offered():
    from nodes.p4d import nodes as evaluation_nodes
    from web.files import example_workflows
    from web.folders import DataFolders
    from web.registry import node_classes

    offered = {name for name in node_classes(DataFolders.under(ROOT), ROOT) if name != "AtelierP4D"}
    assert "p4d_audit" not in example_workflows(offered) and "magicface" in example_workflows(offered)
    assert "p4d_audit" in example_workflows(offered | set(evaluation_nodes.NODE_CLASS_MAPPINGS))
