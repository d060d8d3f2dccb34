"""AdcSR (issue 26): the compressed network built from SD2.1-base's config as the official code builds it, loaded
from random weights in the published layout, against the official forward written out here; the colour fix, any
input size, tiles; the nodes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.superres.adcsr import build_adcsr, load_adcsr, match_colour, padded_forward
from nodes.superres.nodes import AtelierAdcSRUpscale, AtelierLoadAdcSR, adcsr_upscale
from tiny_models import build_tiny_pipeline, write_adcsr_files

# Source: the official construction (model.py Net: SD2.1-base's UNet without time embedding, time projections and
# cross-attention, every layer at 3/4 width, conv_in 12 → 240, conv_out 240 → 256; test.py's halfDecoder, of which
# the middle block (trained with the UNet), the up blocks, norm and output convolution run): 456,073,683
# parameters, 443,695,696 of them the UNet's. The paper (arXiv 2411.13383) states 74 % fewer parameters than
# OSEDiff; its table's figure for AdcSR could not be opened here to compare digit by digit.
ADCSR_PARAMETERS = 456_073_683
ADCSR_UNET_PARAMETERS = 443_695_696
TINY_DECODER = (32, 32, 32, 32)


def _sd21_config() -> dict:
    with open(os.path.join(SHIPPED_CONFIGS, "sd21", "unet", "config.json")) as file:
        return json.load(file)


def test_the_full_size_network_has_the_official_constructions_parameter_count():
    with torch.device("meta"):
        net = build_adcsr(_sd21_config())
    assert sum(parameter.numel() for parameter in net.parameters()) == ADCSR_PARAMETERS
    assert sum(parameter.numel() for parameter in net.unet.parameters()) == ADCSR_UNET_PARAMETERS
    norms = {type(module).__name__ + str((module.num_groups, module.num_channels))
             for module in net.unet.modules() if isinstance(module, torch.nn.GroupNorm)}
    # 3/4 of 320, 640, 1280 and the skip concatenations, each with the first of 32, 24, ... groups dividing it
    assert {"GroupNorm(24, 240)", "GroupNorm(32, 480)", "GroupNorm(32, 960)", "GroupNorm(24, 720)",
            "GroupNorm(32, 1440)"} <= norms
    attention = net.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attention.heads == 5 and attention.to_q.out_features == 240  # heads keep their count, 48 wide


def _official_forward(net, image: torch.Tensor) -> torch.Tensor:
    """The official forward (forward.py's replaced methods and model.py's Net.body, then test.py's decoder tail)
    written out over the loaded modules."""
    def resnet(block, x_in):
        x = block.conv1(F.silu(block.norm1(x_in)))
        x = block.conv2(F.silu(block.norm2(x)))
        return x + (x_in if block.in_channels == block.out_channels else block.conv_shortcut(x_in))

    def transformer(model, x_in):
        b, c, h, w = x_in.shape
        x = model.proj_in(model.norm(x_in).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in model.transformer_blocks:
            x = x + block.attn1(block.norm1(x))
            x = x + block.ff(block.norm3(x))
        return model.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2) + x_in

    unet = net.unet
    x = unet.conv_in(F.pixel_unshuffle(image, 2))
    skip = [x]
    for block in unet.down_blocks:
        for index in range(2):
            x = resnet(block.resnets[index], x)
            if hasattr(block, "attentions"):
                x = transformer(block.attentions[index], x)
            skip.append(x)
        if block.downsamplers is not None:
            x = block.downsamplers[0](x)
            skip.append(x)
    x = resnet(unet.mid_block.resnets[0], x)
    x = transformer(unet.mid_block.attentions[0], x)
    x = resnet(unet.mid_block.resnets[1], x)
    for block in unet.up_blocks:
        for index in range(3):
            x = resnet(block.resnets[index], torch.cat([x, skip.pop()], dim=1))
            if hasattr(block, "attentions"):
                x = transformer(block.attentions[index], x)
        if block.upsamplers is not None:
            x = block.upsamplers[0](x)
    x = unet.conv_out(F.silu(unet.conv_norm_out(x)))
    x = net.mid_block(x)
    for block in net.up_blocks:
        x = block(x)
    return net.conv_out(F.silu(net.conv_norm_out(x)))


@pytest.fixture(scope="module")
def tiny_adcsr(tmp_path_factory):
    """Random AdcSR files in the published layout for the tiny SD2 UNet's config, and the config."""
    config = dict(build_tiny_pipeline("sd2").unet.config)
    root = tmp_path_factory.mktemp("adcsr_models")
    network, decoder = write_adcsr_files(root / "adcsr", config, TINY_DECODER)
    return str(root), network, decoder, config


def test_published_files_load_and_run_the_official_forward(tiny_adcsr):
    _, network, decoder, config = tiny_adcsr
    net = load_adcsr(network, decoder, config, TINY_DECODER).double()  # float64: equal up to rounding, not 1e-5
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ours, theirs = net(image), _official_forward(net, image)
    assert ours.shape == (2, 3, 128, 192)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    assert ours.std() > 0.01  # random weights still make a picture that varies


def test_the_colour_fix_gives_the_outputs_the_inputs_statistics():
    generator = torch.Generator().manual_seed(1)
    low, high = torch.rand(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 32, 32, generator=generator) * 3
    fixed = match_colour(high, low)
    torch.testing.assert_close(fixed.mean((2, 3)), low.mean((2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(fixed.std((2, 3)), low.std((2, 3)), rtol=0, atol=1e-5)


def test_any_size_runs_and_one_tile_is_the_whole_image(tiny_adcsr):
    _, network, decoder, config = tiny_adcsr
    net = load_adcsr(network, decoder, config, TINY_DECODER)
    image = torch.rand(1, 3, 37, 50, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = padded_forward(net, image * 2 - 1)
    assert whole.shape == (1, 3, 148, 200)
    expected = (match_colour(whole, image * 2 - 1) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(adcsr_upscale(net, image, tile=64, overlap=16), expected, rtol=0, atol=1e-5)
    seen = []
    hook = net.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape[-2:])))
    tiled = adcsr_upscale(net, image, tile=32, overlap=8)  # 2 × 2 tiles of 32, each with up to 8 of context
    hook.remove()
    assert tiled.shape == expected.shape and 0 <= tiled.min() and tiled.max() <= 1
    # each window (tile + context, cut at the image's edges) padded to a multiple of 16
    assert sorted(seen) == [(48, 48), (48, 48), (48, 48), (48, 48)]


def test_the_nodes_load_from_the_models_folder_and_refuse_other_files(tiny_adcsr, monkeypatch):
    import nodes.superres.nodes as superres_nodes

    root, network, decoder, config = tiny_adcsr
    monkeypatch.setattr(superres_nodes, "sd21_unet_config", lambda: config)
    monkeypatch.setattr(superres_nodes, "load_adcsr",
                        lambda net_file, dec_file, unet_config: load_adcsr(net_file, dec_file, unet_config,
                                                                           TINY_DECODER))
    AtelierLoadAdcSR.models_dir = root
    try:
        names = AtelierLoadAdcSR.INPUT_TYPES()["required"]["network_name"][0]
        assert names == sorted([os.path.basename(network), os.path.basename(decoder)])
        net = AtelierLoadAdcSR().load(os.path.basename(network), os.path.basename(decoder))[0]
        assert AtelierLoadAdcSR().load(os.path.basename(network), os.path.basename(decoder))[0] is net  # kept
        image = torch.rand(1, 24, 40, 3, generator=torch.Generator().manual_seed(3))
        upscaled = AtelierAdcSRUpscale().upscale(net, image, 512, 32)[0]
        assert upscaled.shape == (1, 96, 160, 3)
        assert AtelierAdcSRUpscale.VALIDATE_INPUTS(tile=64, overlap=64) == "overlap (64) must be smaller than tile (64)"
        with pytest.raises(ValueError, match="are not AdcSR's network and half decoder"):
            AtelierLoadAdcSR().load(os.path.basename(decoder), os.path.basename(network))
    finally:
        AtelierLoadAdcSR.models_dir = None
    save_file({"x": torch.zeros(1)}, os.path.join(root, "adcsr", "other.safetensors"))
    with pytest.raises(ValueError, match="not AdcSR's"):
        load_adcsr(os.path.join(root, "adcsr", "other.safetensors"), decoder, config, TINY_DECODER)


def test_the_example_workflow_runs_headless_on_stand_ins(tmp_path, monkeypatch, capsys):
    """workflows/adcsr.json (the embedded model's picture, AdcSR ×4 beside bicubic ×4) on random AdcSR files in the
    published layout, at the tiny SD2 UNet's widths to keep the test short (the full-size stand-ins are
    bench/gpu_suite.py's)."""
    import nodes.superres.nodes as superres_nodes
    from web.cli import main

    config = dict(build_tiny_pipeline("sd2").unet.config)
    write_adcsr_files(tmp_path / "models" / "adcsr", config, TINY_DECODER)
    monkeypatch.setattr(superres_nodes, "sd21_unet_config", lambda: config)
    monkeypatch.setattr(superres_nodes, "load_adcsr",
                        lambda net_file, dec_file, unet_config: load_adcsr(net_file, dec_file, unet_config,
                                                                           TINY_DECODER))
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "adcsr.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 2 and any("adcsr_bicubic_" in line for line in saved)
    from PIL import Image

    pictures = sorted((tmp_path / "data" / "output").rglob("adcsr_*.png"))
    assert [Image.open(path).size for path in pictures] == [(256, 256), (256, 256)]
