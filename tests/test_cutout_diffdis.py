"""DiffDIS (issue 26): the UNet built as the official code builds it, loaded from random weights in the published
layout, against diffusers' own forward with the official SWCI written as hooks; the mask–edge attention written
out; the one-step scheduler against diffusers'; the nodes on a tiny SD2 model; the example workflow."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fixtures_models import tiny_sd2  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec
from nodes.cutout.diffdis import (TIMESTEP, build_diffdis_unet, diffdis_predict, diffdis_unet_forward,
                                  discriminative_code, load_diffdis_unet, mutual_attention)
from nodes.cutout.nodes import AtelierDiffDISCutout, AtelierLoadDiffDIS, empty_prompt_states
from nodes.models.clip import Clip
from nodes.models.formats import UnsafeModelFormatError
from nodes.models.loading import load_model
from nodes.models.model_configs import shipped_unet_config
from nodes.models.refs import ModelRef
from nodes.sampling.model_sampling import one_step_x0
from tiny_models import build_tiny_pipeline, write_diffdis_unet

# Source: run_inference.py's UNet2DConditionModel_diffdis (SD2.1's UNet, in_channels 8, a projection class embedding
# of 4, DBIA's norm2_ and attn3 in the mid block, SWCI's nine convolutions and three batch norms) built from
# SD2.1's config: 912,924,804 parameters, 3.65 GB in float32, the size of the published unet/ weights
# (huggingface.co/qianyu1217/diffdis). The paper states no parameter count.
DIFFDIS_PARAMETERS = 912_924_804
SD21_UNET_PARAMETERS = 865_910_724


def test_the_full_size_unet_has_the_official_constructions_parameter_count():
    with torch.device("meta"):
        unet = build_diffdis_unet(shipped_unet_config("sd2"))
    assert sum(parameter.numel() for parameter in unet.parameters()) == DIFFDIS_PARAMETERS
    added = sum(parameter.numel() for name, parameter in unet.named_parameters()
                if name.startswith(("rgb_", "class_embedding")) or ".attn3." in name or ".norm2_." in name)
    # the 4 → 8 input channels add 320·4·9 weights to conv_in
    assert DIFFDIS_PARAMETERS - added - 320 * 4 * 9 == SD21_UNET_PARAMETERS
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    assert block.attn3.heads == 20 and block.attn3.to_q.in_features == 1280


@pytest.fixture(scope="module")
def tiny_diffdis(tmp_path_factory):
    """Random DiffDIS weights on the tiny SD2 UNet's config, in the published layout: (models dir, file, config)."""
    root = tmp_path_factory.mktemp("diffdis_models")
    config = dict(build_tiny_pipeline("sd2").unet.config)
    path = write_diffdis_unet(root / "diffdis", config)
    return str(root), path, config


def _swci_reference(unet, sample, timestep, states, code, pyramid) -> torch.Tensor:
    """diffusers' own UNet forward with the official SWCI (unet_2d_condition_diffdis.py: each of the first three down
    blocks' last skip s → s·P(g) + P'(g) + s) as forward hooks; the mid block's DBIA is in the built modules."""
    def swci(index):
        def hook(_module, _args, output):
            hidden, skips = output
            guide = unet.rgb_conv[index](pyramid[index])
            last = skips[-1]
            return hidden, (*skips[:-1], last * unet.rgb_proj[index](guide) + unet.rgb_proj1[index](guide) + last)
        return hook

    handles = [unet.down_blocks[index].register_forward_hook(swci(index)) for index in range(3)]
    try:
        return unet(sample, timestep, encoder_hidden_states=states, class_labels=code).sample
    finally:
        for handle in handles:
            handle.remove()


def test_published_weights_load_and_run_the_official_forward(tiny_diffdis):
    _, path, config = tiny_diffdis
    unet = load_diffdis_unet(path, config)
    assert not unet.training  # batch norms on their running statistics
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 8, 16, 24, generator=generator)
    pyramid = [torch.randn(2, 4, 16 // 2 ** level, 24 // 2 ** level, generator=generator) for level in (1, 2, 3)]
    states, timestep, code = torch.randn(1, 2, 32, generator=generator).expand(2, -1, -1), torch.full((2,), 999), \
        discriminative_code(1)
    with torch.no_grad():
        ours = diffdis_unet_forward(unet, sample, timestep, states, code, pyramid)
        reference = _swci_reference(unet, sample, timestep, states, code, pyramid)
        without_guide = diffdis_unet_forward(unet, sample, timestep, states, code, [p * 0 + 5 for p in pyramid])
    assert ours.shape == (2, 4, 16, 24)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - without_guide).abs().max() > 1e-3  # the image pyramid reaches the output
    mask_code, edge_code = code
    torch.testing.assert_close(mask_code, torch.tensor([0.0, 0.8415, 1.0, 0.5403]), atol=1e-4, rtol=0)
    torch.testing.assert_close(edge_code, torch.tensor([0.8415, 0.0, 0.5403, 1.0]), atol=1e-4, rtol=0)


def test_the_mask_half_attends_to_the_edge_half_and_back(tiny_diffdis):
    """AttnProcessor_mecross's DBIA written out head by head: softmax(q_mask k_edgeᵀ/√d) v_edge, and the reverse."""
    _, path, config = tiny_diffdis
    block = load_diffdis_unet(path, config).mid_block.attentions[0].transformer_blocks[0]
    attention = block.attn3
    hidden = torch.randn(2, 6, attention.to_q.in_features, generator=torch.Generator().manual_seed(1))
    heads = attention.heads

    def split(states):
        return states.view(6, heads, -1).transpose(0, 1)

    expected = []
    for query_row, key_row in ((0, 1), (1, 0)):
        query = split(attention.to_q(hidden[query_row]))
        key, value = split(attention.to_k(hidden[key_row])), split(attention.to_v(hidden[key_row]))
        weights = torch.softmax(query @ key.transpose(1, 2) / query.shape[-1] ** 0.5, dim=-1)
        expected.append(attention.to_out[0]((weights @ value).transpose(0, 1).reshape(6, -1)))
    with torch.no_grad():
        torch.testing.assert_close(mutual_attention(attention, hidden), torch.stack(expected).detach(),
                                   rtol=0, atol=1e-5)
        # with attn3 silenced, the block is diffusers' BasicTransformerBlock it was built from
        from diffusers.models.attention import BasicTransformerBlock

        plain = BasicTransformerBlock(block.norm1.normalized_shape[0], block.attn1.heads,
                                      block.attn1.to_q.out_features // block.attn1.heads, cross_attention_dim=32)
        plain.load_state_dict({key: value for key, value in block.state_dict().items()
                               if ".attn3." not in "." + key and "norm2_" not in key})
        block.attn3.to_out[0].weight.zero_()
        block.attn3.to_out[0].bias.zero_()
        text = torch.randn(2, 2, 32)
        torch.testing.assert_close(block(hidden, encoder_hidden_states=text),
                                   plain(hidden, encoder_hidden_states=text), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even batch"):
        mutual_attention(attention, hidden[:1])


def test_one_step_is_sd_turbos_ddpm_step_from_999():
    from diffusers import DDPMScheduler

    # sd-turbo's scheduler config as DDPMScheduler.from_pretrained reads it (run_inference.py)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [TIMESTEP]
    noisy, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    stepped = scheduler.step(eps, TIMESTEP, noisy, generator=torch.Generator().manual_seed(0)).prev_sample
    # diffusers rounds its coefficients to float32 (1 − 6e-8 for the 1 it means) on x0 of magnitude ~20; the
    # neighbouring t = 998 would be ~0.5 % off
    torch.testing.assert_close(one_step_x0(noisy, eps, TIMESTEP), stepped, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_sd2_parts(tiny_sd2):  # noqa: F811
    model = load_model(tiny_sd2.folder, device="cpu")
    return Clip(ModelRef(model)), DiffusersCodec(model.vae)


def test_the_nodes_cut_out_a_mask_and_edges_of_the_inputs_size(tiny_diffdis, tiny_sd2_parts):
    root, path, _ = tiny_diffdis
    clip, vae = tiny_sd2_parts
    AtelierLoadDiffDIS.models_dir = root
    try:
        names = AtelierLoadDiffDIS.INPUT_TYPES()["required"]["unet_name"][0]
        assert "unet/diffusion_pytorch_model.safetensors" in names
        (unet,) = AtelierLoadDiffDIS().load("unet/diffusion_pytorch_model.safetensors")
    finally:
        AtelierLoadDiffDIS.models_dir = None
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(2))
    node = AtelierDiffDISCutout()
    mask, edges = node.cut_out(unet, clip, vae, image, seed=3, resolution=256, test_time_augmentation=True,
                               threshold=0.0)
    assert mask.shape == edges.shape == (1, 40, 56)
    for soft in (mask, edges):
        assert 0 <= soft.min() and soft.max() <= 1 and soft.max() - soft.min() > 0.05
        assert len(soft.unique()) > 100  # soft, as the authors give it
    again, _ = node.cut_out(unet, clip, vae, image, 3, 256, True, 0.0)
    torch.testing.assert_close(again, mask, rtol=0, atol=0)
    other_seed, _ = node.cut_out(unet, clip, vae, image, 4, 256, True, 0.0)
    assert (other_seed - mask).abs().max() > 1e-3
    single, _ = node.cut_out(unet, clip, vae, image, 3, 256, False, 0.0)
    assert (single - mask).abs().max() > 1e-3  # one view is not the six views' mean
    binary, _ = node.cut_out(unet, clip, vae, image, 3, 256, True, 0.5)
    assert set(binary.unique().tolist()) <= {0.0, 1.0} and torch.equal(binary, (mask > 0.5).float())


def test_each_view_is_min_max_normalised_and_mask_and_edges_share_the_noise(tiny_diffdis, tiny_sd2_parts):
    _, path, config = tiny_diffdis
    clip, vae = tiny_sd2_parts
    unet = load_diffdis_unet(path, config)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    seen = []
    decode = vae.decode

    def recording_decode(latent):
        seen.append(latent)
        return decode(latent)

    with torch.no_grad():
        mask, edges = diffdis_predict(unet, empty_prompt_states(clip, 32), vae.encode, recording_decode, image, noise)
    assert mask.shape == edges.shape == (2, 128, 128)
    for maps in (mask, edges):
        torch.testing.assert_close(maps.amin(dim=(1, 2)), torch.zeros(2), rtol=0, atol=0)
        torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-6)
    assert seen[0].shape == (4, 4, 16, 16)  # masks then edges, decoded together
    with pytest.raises(ValueError, match="square"):
        diffdis_predict(unet, empty_prompt_states(clip, 32), vae.encode, vae.decode, image[..., :96], noise)


def test_the_empty_prompt_is_its_two_tokens_whatever_the_padding(tiny_sd2_parts):
    """The authors encode "" unpadded ([1, 2, D]); a causal text encoder gives its start and end tokens the same
    states padded."""
    clip, _ = tiny_sd2_parts
    with clip.ref.in_use() as loaded:
        tokenizer, encoder = loaded.tokenizers[0], loaded.text_encoders[0]
        ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
        assert ids.shape == (1, 2)
        unpadded = encoder(ids)[0]
    torch.testing.assert_close(empty_prompt_states(clip, 32), unpadded, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sd-turbo's text encoder"):
        empty_prompt_states(clip, 1024)


def test_other_files_are_refused_before_loading(tmp_path, tiny_diffdis):
    from safetensors.torch import save_file

    _, _, config = tiny_diffdis
    plain = build_tiny_pipeline("sd2").unet
    save_file(plain.state_dict(), tmp_path / "sd2_unet.safetensors")
    with pytest.raises(ValueError, match=r"not DiffDIS's UNet .*missing .*'conv_in.weight': \(32, 4, 3, 3\)"):
        load_diffdis_unet(tmp_path / "sd2_unet.safetensors", config)
    (tmp_path / "unet.bin").write_bytes(b"not a pickle")
    with pytest.raises(UnsafeModelFormatError):
        load_diffdis_unet(tmp_path / "unet.bin", config)


def test_the_example_workflow_runs_headless_on_stand_ins(tmp_path):
    """workflows/diffdis.json with stand-ins for what it names (a small SD2 at SD2.1's proportions as sd-turbo, a
    random DiffDIS UNet on its config), at 256² for speed."""
    from PIL import Image

    from tiny_models import DIFFDIS_WORKFLOW_MODELS, save_diffdis_stand_ins
    from web.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "workflows", "diffdis.json"), encoding="utf-8") as file:
        workflow = json.load(file)
    cutout = next(node for node in workflow["nodes"] if node["type"] == "AtelierDiffDISCutout")
    assert cutout["widgets_values"][2:4] == [1024, True]  # the authors' settings, as shipped (after seed's control)
    cutout["widgets_values"][2] = 256
    with open(tmp_path / "diffdis.json", "w", encoding="utf-8") as file:
        json.dump(workflow, file)
    save_diffdis_stand_ins(tmp_path / "models")
    assert all(os.path.exists(tmp_path / "models" / name) for name in DIFFDIS_WORKFLOW_MODELS)
    assert main(["run", str(tmp_path / "diffdis.json"), "--models-dir", str(tmp_path / "models"),
                 "--data-dir", str(tmp_path / "data")]) == 0
    saved = sorted((tmp_path / "data" / "output").glob("diffdis_*.png"))
    assert [path.name.split("_0")[0] for path in saved] == ["diffdis_edges", "diffdis_mask"]
    for path in saved:
        assert Image.open(path).size == (64, 64)
