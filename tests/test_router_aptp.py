"""APTP's experts (issue 25): pruned SD2.1 UNets loaded from the published layout and rebuilt at their widths, and
APTP's trained router (hypernetwork + quantizer) against the authors' routing written out here."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from fixtures_models import tiny_sd2  # noqa: F401
from nodes.common.paths import PathOutsideFolderError
from nodes.models.families import UnknownModelLayoutError
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.router.aptp import AptpRouter, expert_unet_file, load_aptp_router, route_experts
from nodes.router.embeddings import sentence_embeddings
from nodes.router.nodes import AtelierAptpExpert, AtelierAptpRoutePrompt, AtelierLoadSentenceEncoder
from test_router import CALIBRATION
from tiny_models import (APTP_DEPTH_ORDER, APTP_DROPPED_BLOCKS, APTP_STRUCTURE, aptp_expert, build_tiny_pipeline,
                         save_aptp_stand_ins, save_tiny_sentence_encoder, write_aptp_router)

# Source: stabilityai/stable-diffusion-2-1's unet/config.json (shipped here) in diffusers' UNet2DConditionModel,
# which the authors' UNet2DConditionModelPruned builds in full before pruning: 865,910,724 parameters, the model
# card's "865M UNet". An expert holds what its file holds (checked below against the file).
SD21_UNET_PARAMETERS = 865_910_724
CHECKPOINT = "diffusers/tiny_sd2"
EXPERTS = 8


def test_the_full_sd21_unet_has_its_published_parameter_count():
    with open(os.path.join(SHIPPED_CONFIGS, "sd21", "unet", "config.json")) as file:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.load(file))
    assert sum(parameter.numel() for parameter in unet.parameters()) == SD21_UNET_PARAMETERS


@pytest.fixture(scope="module")
def aptp_models(tmp_path_factory, tiny_sd2):  # noqa: F811
    """A models folder: the tiny SD2 model and an APTP pruning folder with two experts of its UNet (arch3 under
    two checkpoints, as training leaves them; arch5) and a router."""
    import shutil

    root = tmp_path_factory.mktemp("aptp_models")
    shutil.copytree(tiny_sd2.folder, root / "diffusers" / "tiny_sd2")
    folder = root / "aptp" / "APTP-Tiny"
    unet = build_tiny_pipeline("sd2").unet
    references = {}
    for expert, step, seed in ((3, 30000, 1), (3, 1000, 2), (5, 30000, 3)):
        state, reference = aptp_expert(unet, seed)
        os.makedirs(folder / f"arch{expert}" / f"checkpoint-{step}" / "unet")
        save_file(state, os.fspath(folder / f"arch{expert}" / f"checkpoint-{step}" / "unet" /
                                   "diffusion_pytorch_model.safetensors"))
        references.setdefault(expert, (state, reference))  # the latest checkpoint is the one to load
    write_aptp_router(folder, width=32)
    return str(root), references


def _sample(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 600]),
            torch.randn(2, 7, 32, generator=generator))


@pytest.mark.parametrize("expert", [3, 5])
def test_an_expert_loads_at_its_pruned_widths_and_computes_the_pruned_unet(aptp_models, expert):
    root, references = aptp_models
    state, reference = references[expert]
    AtelierAptpExpert.models_dir = root
    try:
        model, clip, vae = AtelierAptpExpert().load_expert(CHECKPOINT, "APTP-Tiny", expert)
    finally:
        AtelierAptpExpert.models_dir = None
    unet = model.model.unet
    assert model.model.unet_source.endswith(os.path.join(f"arch{expert}", "checkpoint-30000", "unet",
                                                         "diffusion_pytorch_model.safetensors"))
    assert sum(parameter.numel() for parameter in unet.parameters()) == sum(value.numel() for value in
                                                                           state.values())
    assert all(torch.equal(value, state[key]) for key, value in unet.state_dict().items())
    assert all(type(unet.get_submodule(name)).__name__ == "SkippedBlock" for name in APTP_DROPPED_BLOCKS)
    sample, timesteps, context = _sample(expert)
    with torch.no_grad():
        ours, theirs = unet(sample, timesteps, context).sample, reference(sample, timesteps, context).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert clip.ref is model and vae.vae is model.model.vae


def test_a_file_that_is_no_pruning_is_refused_and_a_missing_expert_named(aptp_models, tmp_path):
    root, references = aptp_models
    state = dict(references[3][0])
    key = next(key for key in state if key.endswith("resnets.0.conv1.weight"))
    state[key] = state[key][:-1]  # a channel cut inside a group: no ResNet of APTP's is pruned so
    bad = tmp_path / "aptp" / "Bad" / "arch0" / "unet"
    os.makedirs(bad)
    save_file({name: value.contiguous() for name, value in state.items()},
              os.fspath(bad / "diffusion_pytorch_model.safetensors"))
    AtelierAptpExpert.models_dir = str(tmp_path)
    os.symlink(os.path.join(root, "diffusers"), tmp_path / "diffusers")
    try:
        with pytest.raises(UnknownModelLayoutError, match="nor a pruning of the checkpoint's UNet"):
            AtelierAptpExpert().load_expert(CHECKPOINT, "Bad", 0)
    finally:
        AtelierAptpExpert.models_dir = None
    with pytest.raises(FileNotFoundError, match=r"no expert 4 .*experts there: \[3, 5\]"):
        expert_unet_file(os.path.join(root, "aptp", "APTP-Tiny"), 4)
    os.makedirs(tmp_path / "aptp" / "Link" / "arch1")
    os.symlink(bad, tmp_path / "aptp" / "Link" / "arch1" / "unet")  # a link out of its pruning folder
    with pytest.raises(PathOutsideFolderError):
        expert_unet_file(tmp_path / "aptp" / "Link", 1)


def authors_routing(folder, embeddings: torch.Tensor) -> torch.Tensor:
    """APTP's routing as its code runs it (pdm/models/hypernet/hypernet.py HyperStructure._forward;
    pdm/models/vq/quantizer.py gumbel_sigmoid_trick, width_depth_normalize, get_cosine_sim_min_encoding_indices;
    pdm/utils/estimation_utils.py with fixed_seed=True), written out step by step."""
    from safetensors.torch import load_file

    hypernet = load_file(os.path.join(folder, "hypernet", "diffusion_pytorch_model.safetensors"))
    quantizer = load_file(os.path.join(folder, "quantizer", "diffusion_pytorch_model.safetensors"))
    width_list = [w for sub in APTP_STRUCTURE["width"] for w in sub]
    depth_list = [d for sub in APTP_STRUCTURE["depth"] for d in sub]
    heads = len(width_list) + 1

    weight_norm = "mh_fc.0.parametrizations.weight.original0" in hypernet
    mh_fc = torch.nn.ModuleList()
    for i in range(heads):
        linear = torch.nn.Linear(embeddings.shape[1], hypernet[f"mh_fc.{i}.bias"].shape[0])
        mh_fc.append(torch.nn.utils.parametrizations.weight_norm(linear) if weight_norm else linear)
    mh_fc.load_state_dict({key.removeprefix("mh_fc."): value for key, value in hypernet.items()})
    with torch.no_grad():
        arch_vector = torch.cat([mh_fc[i](embeddings) for i in range(heads)], dim=1)

    def sample_gumbel(shape, eps=1e-20):
        u = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        return -torch.log(-torch.log(u + eps) + eps)

    def hard_concrete(out):
        out_hard = torch.zeros(out.size())
        out_hard[out >= 0.5] = 1
        return out_hard

    def gumbel_sigmoid_trick(z_q):
        num_width = sum(width_list)
        z_q_width, z_q_depth = z_q[:, :num_width], z_q[:, num_width:]
        x = torch.flip(torch.cumsum(torch.softmax(z_q_depth, dim=1), dim=1), dims=[1])
        x = torch.log(x + 1e-6) - torch.log1p(-(x - 1e-6))
        z_q_depth_b_ = torch.sigmoid((x + sample_gumbel(x.size()) + 3) / 0.4)
        z_q_depth_b = torch.zeros_like(z_q_depth_b_)
        z_q_depth_b[:, [i % sum(depth_list) for i in APTP_DEPTH_ORDER]] = z_q_depth_b_
        outs, start = [], 0
        for w in width_list:
            zw = z_q_width[:, start:start + w]
            start += w
            y_out = torch.sigmoid((zw + sample_gumbel(zw.size()) + 3) / 0.4)
            y_out_h = hard_concrete(y_out).sum(dim=1)
            if not (y_out_h > 0).all():
                ind = y_out_h == 0
                y_out = y_out.clone()
                y_out[ind, 0] = y_out[ind, 0] + 0.5
            outs.append(y_out)
        return torch.cat(outs + [z_q_depth_b], dim=1)

    width_list_sum = [sum(sub) for sub in APTP_STRUCTURE["width"]]
    width_indices = [0] + torch.tensor(width_list_sum).cumsum(0).tolist()
    depth_indices = (sum(width_list) - 1 + torch.tensor(depth_list).cumsum(0)).tolist()
    template = torch.tensor(width_list + [d for d in depth_list if d != 0])
    template = 1.0 / torch.repeat_interleave(template, template).float()

    def width_depth_normalize(inputs):
        inputs_clone = hard_concrete(inputs.clone())
        for i, elem in enumerate(depth_list):
            if elem != 0:
                a, b = width_indices[i], width_indices[i + 1]
                inputs_clone[:, a:b] = inputs[:, a:b] * inputs[:, depth_indices[i]:depth_indices[i] + 1]
        return inputs_clone * torch.sqrt(template)

    u = width_depth_normalize(gumbel_sigmoid_trick(arch_vector))
    u = u / u.norm(dim=-1, keepdim=True)
    v = width_depth_normalize(quantizer["embedding_gs"])
    v = v / v.norm(dim=-1, keepdim=True)
    return torch.argmax(u @ v.t(), dim=-1)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_the_router_picks_the_authors_expert(tmp_path, weight_norm):
    write_aptp_router(tmp_path, width=32, weight_norm=weight_norm)
    router = load_aptp_router(tmp_path)
    assert isinstance(router, AptpRouter) and router.experts == EXPERTS and router.depth_order == (2, 0, 1)
    embeddings = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 2
    ours = route_experts(embeddings, router)
    assert torch.equal(ours, authors_routing(tmp_path, embeddings))
    assert len(set(ours.tolist())) > 2  # the random router is no constant: several experts are picked
    one = route_experts(embeddings[5:6], router)  # alone, a prompt sees the first row of the fixed noise
    assert torch.equal(one, authors_routing(tmp_path, embeddings[5:6]))


def test_the_router_refuses_what_the_authors_inference_cannot_run(tmp_path):
    write_aptp_router(tmp_path, width=32, resource_aware=True)
    with pytest.raises(ValueError, match="resource_aware_normalization"):
        load_aptp_router(tmp_path)
    os.remove(tmp_path / "hypernet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="no hypernet/diffusion_pytorch_model.safetensors"):
        load_aptp_router(tmp_path)
    write_aptp_router(tmp_path, width=32)
    with pytest.raises(ValueError, match=r"embeddings must be \(B, 32\)"):
        route_experts(torch.zeros(1, 16), load_aptp_router(tmp_path))


def test_the_router_node_routes_a_prompt_with_the_sentence_encoder(aptp_models):
    root, _ = aptp_models
    save_tiny_sentence_encoder(os.path.join(root, "sentence_encoders", "mini"), CALIBRATION)
    for node in (AtelierLoadSentenceEncoder, AtelierAptpRoutePrompt):
        node.models_dir = root
    try:
        assert AtelierAptpRoutePrompt.INPUT_TYPES()["required"]["aptp_name"][0] == ["APTP-Tiny"]
        encoder = AtelierLoadSentenceEncoder().load("mini")[0]
        expected = [int(route_experts(sentence_embeddings(encoder, [prompt]),
                                      load_aptp_router(os.path.join(root, "aptp", "APTP-Tiny")))[0])
                    for prompt in CALIBRATION]
        assert expected == [authors_routing(os.path.join(root, "aptp", "APTP-Tiny"),
                                            sentence_embeddings(encoder, [prompt]))[0].item()
                            for prompt in CALIBRATION]
        for prompt, expert in zip(CALIBRATION, expected):
            assert AtelierAptpRoutePrompt().route(encoder, "APTP-Tiny", prompt) == (expert, f"arch{expert}", prompt)
    finally:
        AtelierLoadSentenceEncoder.models_dir = AtelierAptpRoutePrompt.models_dir = None


def test_the_example_workflow_runs_headless_on_stand_ins(tmp_path, capsys):
    """workflows/aptp_experts.json with stand-ins for what it names (a small SD2 at SD2.1's proportions, a random
    router and experts of its UNet, a tiny sentence encoder): the routed expert is loaded and sampled. The copy
    run here samples 64² in 4 steps instead of 768² in 25, to keep the test short on a CPU."""
    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "aptp_experts.json")
    with open(workflow, encoding="utf-8") as file:
        graph = json.load(file)
    nodes = {node["type"]: node for node in graph["nodes"]}
    nodes["EmptyLatentImage"]["widgets_values"][:2] = [64, 64]
    nodes["KSampler"]["widgets_values"][2] = 4
    with open(tmp_path / "aptp_experts.json", "w", encoding="utf-8") as file:
        json.dump(graph, file)
    save_aptp_stand_ins(tmp_path / "models", [nodes["AtelierAptpRoutePrompt"]["widgets_values"][1]])
    assert main(["run", str(tmp_path / "aptp_experts.json"), "--models-dir", str(tmp_path / "models"),
                 "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "aptp_" in saved[0]
