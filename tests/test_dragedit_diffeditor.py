"""DiffEditor's drag editing (issue 26; ``nodes/dragedit``): the energy against its written-out formula, the memory
bank against plain attention, the decoder features' levels, a guidance step lowering the edit energy, the official
schedule's UNet calls, and the node on the embedded model (working size, range, reconstruction at energy 0, clear
errors). Whether a drag moves the shape is bench/drag_edit.py's to measure; ComfyUI's run is in
test_comfy_pack_models.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nodes.common.denoiser import Conditioning, DiffusersCodec, DiffusersDenoiser
from nodes.dragedit.diffeditor import (MemoryBankAttention, decoder_features, diffeditor_drag, drag_energy,
                                       drag_guidance, parse_drag_points, point_patches, seed_latent_patches)
from nodes.dragedit.image_prompt import (ENCODER_CONFIG, PUBLISHED_PARAMETERS, SD15_CROSS_ATTENTION_WIDTHS,
                                         ImagePromptAdapter, ImagePromptAttention, cross_attentions,
                                         load_image_prompt_adapter)
from nodes.dragedit.nodes import AtelierDiffEditorDrag, AtelierLoadDiffEditorImagePrompt
from nodes.embedded.dataset import Scene, render, score_image
from nodes.embedded.train import SHIPPED_NAME
from nodes.models.clip import Clip
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.models.refs import ModelRef

from tiny_models import write_diffeditor_image_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a large blue diamond on the left on black"
SCENE = Scene("diamond", "blue", "large", "left", "plain", "black", None, (0.0, 0.0), CAPTION)
DRAG = "16,32 -> 32,32"


@pytest.fixture(scope="module")
def embedded():
    model = load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu")
    ref = ModelRef(model)
    return ref, Clip(ref), DiffusersCodec(model.vae), DiffusersDenoiser(model.unet, model.schedule,
                                                                        differentiable=True)


@pytest.fixture(scope="module")
def prompts(embedded):
    from web.nodes_conditioning import CLIPTextEncode

    _, clip, _, _ = embedded
    encode = CLIPTextEncode()
    return encode.encode(clip, CAPTION)[0], encode.encode(clip, "")[0]


def _conditioning(prompt: list) -> Conditioning:
    return Conditioning(prompt[0][0])


def _latent(embedded) -> torch.Tensor:
    _, _, codec, _ = embedded
    return codec.encode(render(SCENE)[None]) * codec.scaling_factor


def test_drags_parse_and_bad_text_is_refused():
    assert parse_drag_points(" 1,2->3,4 \n\n 5 , 6 -> 7 , 8 ") == [((1.0, 2.0), (3.0, 4.0)), ((5.0, 6.0), (7.0, 8.0))]
    for text in ("", "1,2", "1,2 -> 3", "a,b -> c,d"):
        with pytest.raises(ValueError, match="x,y -> x,y"):
            parse_drag_points(text)


def test_energy_is_the_written_out_formula():
    """Two levels, two drags, one target half over its handle: each term by hand."""
    generator = torch.Generator().manual_seed(0)
    now = [torch.randn(6, 8, 8, generator=generator), torch.randn(3, 8, 8, generator=generator)]
    before = [torch.randn(6, 8, 8, generator=generator), torch.randn(3, 8, 8, generator=generator)]
    drags = [((2, 2), (4, 2)), ((10, 10), (10, 14))]  # stride 2: cells (1, 1)->(1, 2), (5, 5)->(7, 5) clipped to (6, 5)
    handles, targets = point_patches(drags, (8, 8), 2)
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[:, 6:] = True

    def s(a, b):  # (C, n) columns
        return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)) + 1) / 2

    expected_edit, expected_content = 0.0, 0.0
    for cur, ref in zip(now, before):
        for (h_row, h_col), (t_row, t_col) in (((1, 1), (1, 2)), ((5, 5), (6, 5))):
            at_target = cur[:, t_row - 1:t_row + 2, t_col - 1:t_col + 2].reshape(cur.shape[0], -1)
            at_handle = ref[:, h_row - 1:h_row + 2, h_col - 1:h_col + 2].reshape(ref.shape[0], -1)
            expected_edit += 4.0 / (1 + 4 * s(at_target, at_handle).mean())
            vacated = torch.zeros(8, 8, dtype=torch.bool)
            vacated[h_row - 1:h_row + 2, h_col - 1:h_col + 2] = True
            vacated[t_row - 1:t_row + 2, t_col - 1:t_col + 2] = False
            expected_edit += 0.2 * s(cur[:, vacated], ref[:, vacated]).mean()
        expected_content += 6.0 / (1 + 4 * s(cur[:, keep], ref[:, keep]).mean())
    edit, content = drag_energy(now, before, handles, targets, keep)
    assert torch.allclose(edit, expected_edit / 4) and torch.allclose(content, expected_content / 2)


def test_handle_patches_are_copied_onto_the_targets_in_the_latent_drag_after_drag():
    latent = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    seeded = seed_latent_patches(latent, [((8, 8), (40, 24))], 8)  # cell (1, 1) -> (3, 5)
    assert torch.equal(seeded[..., 2:5, 4:7], latent[..., 0:3, 0:3])
    seeded[..., 2:5, 4:7] = latent[..., 2:5, 4:7]
    assert torch.equal(seeded, latent)
    # a second drag from where the first wrote reads what it wrote; an overlapping pair copies the patch as it was
    chained = seed_latent_patches(latent, [((8, 8), (40, 24)), ((40, 24), (40, 40))], 8)  # then (3, 5) -> (5, 5)
    assert torch.equal(chained[..., 4:7, 4:7], latent[..., 0:3, 0:3])
    overlapping = seed_latent_patches(latent, [((8, 8), (16, 8))], 8)  # (1, 1) -> (1, 2)
    assert torch.equal(overlapping[..., 0:3, 1:4], latent[..., 0:3, 0:3])


def test_memory_bank_of_the_same_latent_and_step_keeps_the_unets_output(embedded, prompts):
    """Keys and values appended twice give the same softmax weights: injecting what the same call recorded changes
    nothing; another latent's bank changes the output; the bank only acts on its own step."""
    _, _, _, denoiser = embedded
    positive = _conditioning(prompts[0])
    x = _latent(embedded) + 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([501.0])
    bank = MemoryBankAttention()
    with torch.no_grad(), bank.installed(denoiser.unet):
        plain = denoiser(x, t, positive)
        with bank.recording(7, 1):
            recorded = denoiser(x, t, positive)
        with bank.injecting(7):
            injected = denoiser(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([positive, positive]))
        with bank.injecting(8):
            other_step = denoiser(x, t, positive)
        with bank.recording(9, 1):
            denoiser(x.flip(-1), t, positive)
        with bank.injecting(9):
            other_latent = denoiser(x, t, positive)
    assert torch.equal(plain, recorded) and torch.equal(plain, other_step)
    assert torch.allclose(injected[:1], plain, atol=1e-5) and torch.allclose(injected[1:], plain, atol=1e-5)
    assert (other_latent - plain).abs().max() > 1e-3
    assert bank.steps_kept == 0  # dropped with the installation


def test_memory_bank_refuses_a_bank_over_its_budget(embedded, prompts):
    _, _, _, denoiser = embedded
    bank = MemoryBankAttention(max_bytes=1000)
    with torch.no_grad(), bank.installed(denoiser.unet), pytest.raises(ValueError, match="lower the resolution"):
        with bank.recording(0, 45):
            denoiser(_latent(embedded), torch.tensor([1.0]), _conditioning(prompts[0]))


def test_features_are_the_second_and_third_decoder_levels_at_twice_the_latent_size(embedded, prompts):
    _, _, _, denoiser = embedded
    x = _latent(embedded).requires_grad_(True)
    with torch.enable_grad():
        features = decoder_features(denoiser, denoiser.unet, x, torch.tensor([101.0]), _conditioning(prompts[0]))
    unet = denoiser.unet
    widths = [unet.up_blocks[level].resnets[-1].conv2.out_channels for level in (1, 2)]
    assert [tuple(feature.shape) for feature in features] == [(widths[0], 16, 16), (widths[1], 16, 16)]
    assert features[0].requires_grad and features[1].requires_grad
    # level 1 is computed at half the latent's size: nearest-resized, each value covers 2×2 cells
    assert torch.equal(features[0][:, ::2, ::2], features[0][:, 1::2, 1::2])


def test_a_step_against_the_guidance_lowers_the_edit_energy(embedded, prompts):
    _, _, _, denoiser = embedded
    positive = _conditioning(prompts[0])
    reference = _latent(embedded)
    x = reference + 0.5 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(2))
    drags = parse_drag_points(DRAG)
    handles, targets = point_patches(drags, (16, 16), 4)
    everywhere = torch.ones(1, 1, 8, 8)
    nowhere = torch.zeros(16, 16, dtype=torch.bool)
    guidance = drag_guidance(denoiser, denoiser.unet, x, reference, 301.0, positive, handles, targets, nowhere,
                             everywhere, 1000.0, 4.0, 6.0, 0.2)
    assert guidance.abs().max() > 0

    def edit_energy(latent):
        with torch.no_grad():
            now, before = (decoder_features(denoiser, denoiser.unet, value, torch.tensor([301.0]), positive)
                           for value in (latent, reference))
        return drag_energy(now, before, handles, targets, nowhere)[0]

    step = 1e-2 / guidance.abs().max()
    assert edit_energy(x - step * guidance) < edit_energy(x) < edit_energy(x + step * guidance)


class _Counting:
    """A denoiser that counts its calls by batch size and whether gradients flow."""

    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.calls = denoiser, denoiser.schedule, []

    def __call__(self, x, t, conditioning):
        self.calls.append((x.shape[0], x.requires_grad))
        return self.denoiser(x, t, conditioning)


@pytest.mark.parametrize("method, expected", [
    # 50 inversion calls; 50 CFG calls and 2 more on each of 4 time-travel steps; 28 guided passes of 2 feature calls
    # (one with gradients); 2 re-inversions on each time-travel step
    ("DiffEditor", {(1, False): 50 + 28 + 8, (2, False): 58, (1, True): 28}),
    # guidance on each of the first 30 steps, no time travel
    ("DragonDiffusion", {(1, False): 50 + 30, (2, False): 50, (1, True): 30}),
])
def test_the_official_schedule_of_unet_calls(embedded, prompts, method, expected):
    _, _, _, denoiser = embedded
    counting = _Counting(denoiser)
    diffeditor_drag(counting, denoiser.unet, _latent(embedded), _conditioning(prompts[0]), _conditioning(prompts[1]),
                    parse_drag_points(DRAG), torch.ones(1, 1, 64, 64), torch.Generator().manual_seed(0), 8,
                    method=method)
    counted = {key: counting.calls.count(key) for key in set(counting.calls)}
    assert counted == expected


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_node_edits_at_the_working_size_and_reconstructs_at_energy_zero(embedded, prompts):
    ref, _, codec, _ = embedded
    positive, negative = prompts
    image = render(SCENE).permute(1, 2, 0)[None]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 4:48] = 1
    node = AtelierDiffEditorDrag()
    arguments = dict(model=ref, vae=codec, image=image, mask=mask, positive=positive, negative=negative, drags=DRAG,
                     seed=0, steps=20, cfg=4.0, energy_scale=4000.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2,
                     sde_strength=0.4, resolution=64, method="DiffEditor")
    (edited,) = node.drag(**arguments)
    (again,) = node.drag(**arguments)
    (kept,) = node.drag(**{**arguments, "energy_scale": 0.0})
    assert edited.shape == (1, 64, 64, 3) and 0 <= float(edited.min()) and float(edited.max()) <= 1
    assert torch.equal(edited, again)
    assert _psnr(kept, image) > 20 and score_image(kept[0].permute(2, 0, 1)).colour == "blue"
    assert (edited - kept).abs().max() > 0.05
    (bigger,) = node.drag(**{**arguments, "image": image.repeat(1, 2, 1, 1), "mask": mask.repeat(1, 2, 1),
                             "steps": 4, "resolution": 96})
    assert bigger.shape == (1, 128, 64, 3)  # 128x64 at 96² area: 136x68, rounded to sides of 64


@pytest.mark.parametrize("change, message", [
    ({"mask": torch.zeros(1, 64, 64)}, "mask is empty"),
    ({"mask": torch.ones(1, 32, 32)}, "mask must be the image's size"),
    ({"drags": "10,10 -> 70,10"}, "outside the 64x64 picture"),
    ({"drags": "10 10 20 20"}, "x,y -> x,y"),
    ({"image": torch.rand(2, 64, 64, 3)}, "one RGB image"),
])
def test_node_refuses_bad_input_clearly(embedded, prompts, change, message):
    ref, _, codec, _ = embedded
    arguments = dict(model=ref, vae=codec, image=torch.rand(1, 64, 64, 3), mask=torch.ones(1, 64, 64),
                     positive=prompts[0], negative=prompts[1], drags=DRAG, seed=0, steps=2, cfg=4.0,
                     energy_scale=2000.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2, sde_strength=0.4, resolution=64,
                     method="DiffEditor")
    with pytest.raises(ValueError, match=message):
        AtelierDiffEditorDrag().drag(**{**arguments, **change})


def test_image_prompt_encoder_full_size_counts_the_published_parameters():
    """ip_sd15_64.bin holds 196.5 MB of float32 (the published 197 MB file): the Resampler and SD1.5's sixteen
    cross-attention keys and values; h94/IP-Adapter's image encoder (2.53 GB in float32) is OpenCLIP ViT-H/14's
    vision tower with its projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        adapter = ImagePromptAdapter(SD15_CROSS_ATTENTION_WIDTHS, 768, 1280)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_json_file(ENCODER_CONFIG))
    assert sum(parameter.numel() for parameter in adapter.image_proj.parameters()) == 29_955_072
    assert sum(parameter.numel() for parameter in adapter.parameters()) == PUBLISHED_PARAMETERS == 49_124_352
    assert sum(parameter.numel() for parameter in encoder.parameters()) == 632_076_800


@pytest.fixture(scope="module")
def image_prompt_files(embedded, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    layers = cross_attentions(embedded[0].model.unet)
    return models, write_diffeditor_image_prompt(models, tuple(layer.to_k.out_features for layer in layers),
                                                 layers[0].to_k.in_features)


def test_image_prompt_loads_through_its_node_and_gives_64_tokens(image_prompt_files):
    models, (adapter_name, encoder_name) = image_prompt_files

    class Loader(AtelierLoadDiffEditorImagePrompt):
        models_dir = str(models)

    assert adapter_name in Loader.INPUT_TYPES()["required"]["adapter_name"][0]
    (prompt,) = Loader().load(adapter_name, encoder_name)
    conditional, unconditional = prompt.tokens(render(SCENE)[None])
    assert conditional.shape == unconditional.shape == (1, 64, 64)
    assert not torch.allclose(conditional, unconditional)


def test_image_prompt_refuses_other_files(image_prompt_files, tmp_path, embedded):
    from safetensors.torch import load_file, save_file

    from nodes.models.formats import UnsafeModelFormatError

    models, (adapter_name, _) = image_prompt_files
    tensors = load_file(os.path.join(models, "diffeditor", adapter_name))
    with pytest.raises(UnsafeModelFormatError):
        load_image_prompt_adapter(str(tmp_path / "ip_sd15_64.bin"))
    without_values = {key: value for key, value in tensors.items() if "to_v_ip" not in key}
    save_file(without_values, tmp_path / "no_values.safetensors")
    with pytest.raises(ValueError, match="not in the layout of DiffEditor's image-prompt adapter"):
        load_image_prompt_adapter(str(tmp_path / "no_values.safetensors"))
    save_file({"unet.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not DiffEditor's image-prompt adapter"):
        load_image_prompt_adapter(str(tmp_path / "other.safetensors"))
    with torch.device("meta"):
        sd15 = ImagePromptAdapter(SD15_CROSS_ATTENTION_WIDTHS, 768, 1280, depth=1)
    branch = ImagePromptAttention(sd15, torch.zeros(1, 64, 768), torch.zeros(1, 64, 768))
    with pytest.raises(ValueError, match="adapter is for a UNet with cross-attentions"):
        with branch.installed(embedded[0].model.unet):
            pass


def test_image_prompt_attention_is_ip_adapters_processor_written_out(image_prompt_files, embedded):
    """One cross-attention: to_out(softmax(q·kᵀ)·v over the text + scale · the same over the image tokens' own keys
    and values), the image tokens [conditional; unconditional] for the [positive; negative] rows."""
    models, (adapter_name, _) = image_prompt_files
    adapter = load_image_prompt_adapter(os.path.join(models, "diffeditor", adapter_name))
    unet = embedded[0].model.unet
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 64, 64, generator=generator)
    branch = ImagePromptAttention(adapter, tokens[:1], tokens[1:], scale=0.3)
    module = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden, text = torch.randn(2, 10, module.to_q.in_features, generator=generator), torch.randn(2, 77, 64,
                                                                                                generator=generator)
    heads = module.heads

    def attend(query, keys, values):
        split = [tensor.unflatten(-1, (heads, -1)).transpose(1, 2) for tensor in (query, keys, values)]
        weights = (split[0] @ split[1].transpose(-1, -2) / split[0].shape[-1] ** 0.5).softmax(-1)
        return (weights @ split[2]).transpose(1, 2).flatten(2)

    pair = adapter.keys_values[0]
    query = module.to_q(hidden)
    inner = attend(query, module.to_k(text), module.to_v(text)) + 0.3 * attend(query, pair.to_k_ip(tokens),
                                                                                pair.to_v_ip(tokens))
    expected = module.to_out[0](inner)
    with torch.no_grad(), branch.installed(unet):
        plain = module(hidden, encoder_hidden_states=text)
        with branch.attending():
            branched = module(hidden, encoder_hidden_states=text)
    assert torch.allclose(branched, expected, atol=1e-5) and (branched - plain).abs().max() > 1e-3


def test_drag_with_the_image_prompt_changes_the_picture_and_at_scale_0_does_not(image_prompt_files, embedded, prompts):
    models, (adapter_name, encoder_name) = image_prompt_files

    class Loader(AtelierLoadDiffEditorImagePrompt):
        models_dir = str(models)

    (image_prompt,) = Loader().load(adapter_name, encoder_name)
    ref, _, codec, _ = embedded
    arguments = dict(model=ref, vae=codec, image=render(SCENE).permute(1, 2, 0)[None], mask=torch.ones(1, 64, 64),
                     positive=prompts[0], negative=prompts[1], drags=DRAG, seed=0, steps=10, cfg=4.0,
                     energy_scale=0.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2, sde_strength=0.4, resolution=64,
                     method="DiffEditor")
    node = AtelierDiffEditorDrag()
    (plain,) = node.drag(**arguments)
    (prompted,) = node.drag(**arguments, image_prompt=image_prompt, ip_scale=0.5)
    (silent,) = node.drag(**arguments, image_prompt=image_prompt, ip_scale=0.0)
    assert (prompted - plain).abs().max() > 1e-3 and torch.allclose(silent, plain, atol=1e-5)


def test_example_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(ROOT, "workflows", "diffeditor.json")
    assert main(["run", workflow, "--data-dir", str(tmp_path / "data"), "--models-dir", str(tmp_path / "models")]) == 0
    saved = [name for name in os.listdir(tmp_path / "data" / "output") if name.endswith(".png")]
    assert len(saved) == 1
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "data" / "output" / saved[0]))
    assert picture.shape == (64, 64, 3) and picture.std() > 5
