"""SpeedUpNet (issue 25): the published adapter's layout on SD1.5's UNet, SUN's cross-attention against the official
processor's rule written out, the preset's DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler as the
authors configure it, the node on a tiny model, its refusals and the example workflow."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from fixtures_models import tiny_sd1, tiny_sdxl  # noqa: F401
from nodes.common.denoiser import NoiseSchedule
from nodes.fewstep.nodes import AtelierSpeedUpNet
from nodes.fewstep.speedupnet import (SUN_TOKENS, SunBranch, attention_modules,
                                      speedupnet_layout, sun_cross_attention)
from nodes.models.loading import load_model
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.models.refs import ModelRef
from nodes.sampling.ddim import trailing_timesteps
from nodes.sampling.k_samplers import Sampler, run_sampler
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.schedules import timestep_sigmas
from tiny_models import mixing_eps_network, write_speedupnet_adapter

# The official code builds one SUNAttnProcessor per cross-attention of SD1.5's UNet (hidden sizes 320 … 1280, text
# 768) with add_pos=True, as the published sun_adapter_sdv15_4step_addpos.safetensors is loaded (strict): 4 linear
# maps of 768 inputs and 4 vectors per processor, Σ hidden sizes = 12,480, so 4·768·12,480 + 4·12,480 = 38,388,480
# numbers (williechai/speedup-plugin-for-stable-diffusions, speed_up_net/attention_processor.py and sun_pipe.py;
# the model page's file listing could not be read here, so this count is the code's, not the file's size).
PUBLISHED_PARAMETERS = 38_388_480
SD15_SCHEDULER = os.path.join(SHIPPED_CONFIGS, "sd15", "scheduler")


def _full_size_sd15() -> UNet2DConditionModel:
    with open(os.path.join(SHIPPED_CONFIGS, "sd15", "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def test_the_published_layout_on_sd15s_unet():
    unet = _full_size_sd15()
    layout = speedupnet_layout(unet)
    assert sum(math.prod(shape) for shape in layout.values()) == PUBLISHED_PARAMETERS
    assert sorted({int(key.split(".")[0]) for key in layout}) == list(range(1, 32, 2))  # the cross-attentions
    assert layout["1.to_k_neg.weight"] == (320, 768) and layout["31.to_v_extra_pos.weight"] == (1280, 768)
    # the processor indices are diffusers' attn_processors order (down, up, then mid), as the file's keys
    assert [name + ".processor" for name, _ in attention_modules(unet)] == list(unet.attn_processors)


def _official_processor(branches: dict[str, SunBranch]):
    """SUNAttnProcessor.__call__ (add_pos=True) written out as the official code computes it, for diffusers'
    Attention: one norm over the whole tensor, α ⊙ (‖A‖·A_b/‖A_b‖) + β per branch, A − neg + pos."""
    def attention(attn, query, key, value):
        batch, width = query.shape[0], query.shape[-1]
        heads = [t.view(batch, -1, attn.heads, width // attn.heads).transpose(1, 2) for t in (query, key, value)]
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(batch, -1, width)

    def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            return AttnProcessor2_0()(attn, hidden_states)
        end = encoder_hidden_states.shape[1] - SUN_TOKENS
        positive, negative = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        query = attn.to_q(hidden_states)
        plain = attention(attn, query, attn.to_k(positive), attn.to_v(positive))
        neg = attention(attn, query, negative @ branches["neg"].key.T, negative @ branches["neg"].value.T)
        pos = attention(attn, query, positive @ branches["extra_pos"].key.T, positive @ branches["extra_pos"].value.T)
        origin = torch.norm(plain, p=2)
        neg = branches["neg"].alpha * (origin * (neg / torch.norm(neg, p=2))) + branches["neg"].beta
        pos = branches["extra_pos"].alpha * (origin * (pos / torch.norm(pos, p=2))) + branches["extra_pos"].beta
        return attn.to_out[1](attn.to_out[0](plain - neg + pos))

    return processor


def _branches(width: int, text: int, seed: int) -> dict[str, SunBranch]:
    generator = torch.Generator().manual_seed(seed)

    def branch():
        return SunBranch(torch.randn(width, text, generator=generator) * 0.1,
                         torch.randn(width, text, generator=generator) * 0.1,
                         1 + 0.1 * torch.randn(width, generator=generator),
                         0.01 * torch.randn(width, generator=generator))

    return {"neg": branch(), "extra_pos": branch()}


@pytest.mark.parametrize("positive_chunks", [1, 2])
def test_sun_cross_attention_is_the_official_processors_rule(positive_chunks):
    torch.manual_seed(0)
    layer = Attention(40, cross_attention_dim=24, heads=5, dim_head=8)
    branches = _branches(40, 24, seed=1)
    hidden = torch.randn(1, 16, 40)
    context = torch.randn(1, SUN_TOKENS * (positive_chunks + 1), 24)
    official = _official_processor(branches)(layer, hidden, encoder_hidden_states=context)
    ours = sun_cross_attention(layer, hidden, context, branches)
    assert torch.allclose(ours, official, atol=1e-6), (ours - official).abs().max()
    plain = layer(hidden, encoder_hidden_states=context[:, :-SUN_TOKENS])
    assert not torch.allclose(ours, plain, atol=1e-3)  # the branches act


def test_the_presets_dpm_solver_is_diffusers_multistep_solver_on_the_trailing_grid():
    """The authors' DPMSolverMultistepScheduler (SD1.5's scheduler config, trailing spacing, 4 steps) against
    ComfyUI's dpmpp_2m on the node's sigmas, on an ε-network (float64): the same latents within 1e-5."""
    scheduler = DPMSolverMultistepScheduler.from_pretrained(SD15_SCHEDULER, timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    alphas = scheduler.alphas_cumprod.double()
    network = mixing_eps_network(alphas, seed=2)
    noise = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = noise.clone()
    for t in scheduler.timesteps:
        reference = scheduler.step(network(reference, t), t, reference).prev_sample
    sampling = DiscreteModelSampling(alphas)
    sigmas = timestep_sigmas(NoiseSchedule(alphas, "epsilon"), trailing_timesteps(4)).double()
    assert scheduler.timesteps.tolist() == trailing_timesteps(4).tolist()
    ours = run_sampler(Sampler.from_name("dpmpp_2m"), lambda x, s: sampling.apply_model(network, x, s), sampling,
                       sigmas, noise, torch.zeros_like(noise), seed=0)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def _officially_loaded(unet: UNet2DConditionModel, path: str) -> dict:
    """The UNet's processors as SUNPipe loads the file: one module per entry of ``unet.attn_processors`` (a plain
    one for self-attention, SUN's parameters for cross-attention), ``ModuleList(...).load_state_dict(file)``,
    strict, so the file's indices are matched as the official code matches them; each SUN module then runs the
    official rule."""
    modules = []
    for name in unet.attn_processors:
        holder = torch.nn.Module()
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            width, text = attention.to_q.out_features, attention.to_k.in_features
            for branch in ("neg", "extra_pos"):
                setattr(holder, f"to_k_{branch}", torch.nn.Linear(text, width, bias=False))
                setattr(holder, f"to_v_{branch}", torch.nn.Linear(text, width, bias=False))
                setattr(holder, f"to_k_{branch}_alpha", torch.nn.Parameter(torch.ones(width)))
                setattr(holder, f"to_k_{branch}_beta", torch.nn.Parameter(torch.zeros(width)))
        modules.append(holder)
    torch.nn.ModuleList(modules).load_state_dict(load_file(path))
    processors = {}
    for (name, processor), holder in zip(unet.attn_processors.items(), modules):
        if not name.endswith("attn2.processor"):
            processors[name] = processor
            continue
        branches = {branch: SunBranch(getattr(holder, f"to_k_{branch}").weight.data,
                                      getattr(holder, f"to_v_{branch}").weight.data,
                                      getattr(holder, f"to_k_{branch}_alpha").data,
                                      getattr(holder, f"to_k_{branch}_beta").data)
                    for branch in ("neg", "extra_pos")}
        processors[name] = _official_processor(branches)
    return processors


@pytest.fixture(scope="module")
def sun(tmp_path_factory, tiny_sd1):  # noqa: F811
    """The tiny SD1 model, its prompts, and a models folder with a random adapter in the published layout."""
    from nodes.models.clip import Clip

    root = tmp_path_factory.mktemp("speedupnet_models")
    os.makedirs(root / "speedupnet")
    model = ModelRef(load_model(tiny_sd1.folder))
    write_speedupnet_adapter(model.model.unet, root / "speedupnet" / "sun_adapter_sdv15_4step_addpos.safetensors",
                             scale=0.3)
    clip = Clip(model)
    return str(root), model, clip.encode("a red circle"), clip.encode("blurry, low quality")


def _apply(root: str, *args):
    AtelierSpeedUpNet.models_dir = root
    try:
        return AtelierSpeedUpNet().apply(*args)
    finally:
        AtelierSpeedUpNet.models_dir = None


def test_samplercustom_with_the_nodes_outputs_runs_the_official_processors(sun):
    """SamplerCustom with the node's MODEL, positive, SAMPLER, SIGMAS and cfg equals the same run of the plain
    model whose cross-attention processors are the official rule (set with diffusers' set_attn_processor) on the
    same [positive, negative] context; without the adapter the picture differs."""
    from web.nodes_sampling import SamplerCustom

    root, model, positive, negative = sun
    patched, joined, sampler, sigmas, cfg = _apply(root, model, positive, negative,
                                                   "sun_adapter_sdv15_4step_addpos.safetensors", 0)
    assert cfg == 1.0 and sampler.name == "dpmpp_2m" and sigmas.shape == (5,)
    assert joined[0][0].shape[1] == 2 * SUN_TOKENS and torch.equal(joined[0][0][:, SUN_TOKENS:], negative[0][0])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = SamplerCustom().sample(patched, True, 5, cfg, joined, negative, sampler, sigmas, latent)[0]["samples"]
    unet = model.model.unet
    before = dict(unet.attn_processors)
    official = _officially_loaded(unet, os.path.join(root, "speedupnet", "sun_adapter_sdv15_4step_addpos.safetensors"))
    with model.in_use("unet"):
        unet.set_attn_processor(official)
    try:
        reference = SamplerCustom().sample(model, True, 5, cfg, joined, negative, sampler, sigmas,
                                           latent)[0]["samples"]
    finally:
        with model.in_use("unet"):
            unet.set_attn_processor(before)
    plain = SamplerCustom().sample(model, True, 5, cfg, joined, negative, sampler, sigmas, latent)[0]["samples"]
    # float32 on both sides, the same operations in another order: within 1e-6 of the latents' scale (~150 here,
    # the tiny random UNet's x̂₀)
    assert (ours - reference).abs().max() <= 1e-6 * reference.abs().max(), (ours - reference).abs().max()
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_the_node_refuses_another_family_another_layout_and_a_long_negative(sun, tiny_sdxl, tmp_path):  # noqa: F811
    from nodes.models.clip import Clip

    root, model, positive, negative = sun
    name = "sun_adapter_sdv15_4step_addpos.safetensors"
    with pytest.raises(ValueError, match="SpeedUpNet's adapter is for SD1.5-family models; this MODEL is SDXL"):
        _apply(root, ModelRef(load_model(tiny_sdxl.folder)), positive, negative, name, 0)
    os.makedirs(tmp_path / "speedupnet")
    save_file({"1.to_k_neg.weight": torch.zeros(2, 2)}, tmp_path / "speedupnet" / "other.safetensors")
    with pytest.raises(ValueError, match="'other.safetensors' is not a SpeedUpNet adapter for this UNet"):
        _apply(str(tmp_path), model, positive, negative, "other.safetensors", 0)
    with pytest.raises(ValueError, match="one negative prompt; this negative conditioning has 2 entries"):
        _apply(root, model, positive, negative + negative, name, 0)
    long_negative = Clip(model).encode(" ".join(["blurry"] * 100))
    with pytest.raises(ValueError, match="a negative prompt of one 77-token chunk; this one is 154 tokens"):
        _apply(root, model, positive, long_negative, name, 0)
    with pytest.raises(ValueError, match="already"):  # one Atelier sampling patch per MODEL
        patched = _apply(root, model, positive, negative, name, 0)[0]
        _apply(root, patched, positive, negative, name, 0)


def test_the_example_workflow_runs_headless_on_a_stand_in_adapter(tmp_path, capsys):
    """workflows/speedupnet.json on the shipped embedded model, with an adapter of its layout."""
    from nodes.loaders.nodes import EMBEDDED_CONFIG_DIR
    from web.cli import main

    os.makedirs(tmp_path / "models" / "speedupnet")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(EMBEDDED_CONFIG_DIR, "unet"))
    write_speedupnet_adapter(unet, tmp_path / "models" / "speedupnet" / "sun_adapter_sdv15_4step_addpos.safetensors")
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "speedupnet.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "speedupnet_" in saved[0]
