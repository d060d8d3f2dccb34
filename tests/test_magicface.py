"""MagicFace (techniques.md §4.10, Target 13): the stage switch happens exactly after inject_step; the attention keeps
the CFG batch layout (only the guided target's row changes); one UNet call of (1 + K) × 2 latents per step; empty
reference masks or no changed layer give the plain DDIM run; RSA and RBA against their formulas; the segmentation
and the adaptive guidance on made-up maps; the nodes' checks and the example workflow. The colour-transfer figures
are bench/creative.py's."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nodes.common.denoiser import Conditioning, DiffusersCodec, DiffusersDenoiser, guided_eps
from nodes.common.unet_split import transformer_blocks
from nodes.embedded.dataset import Scene, coverage, render
from nodes.embedded.train import SHIPPED_NAME
from nodes.magicface.attention import MagicFaceAttention, concept_masks, guidance_rate, parse_layers, reference_bias
from nodes.magicface.nodes import AtelierMagicFaceReference, AtelierMagicFaceSampler
from nodes.magicface.sampler import magicface_sample
from nodes.models.clip import Clip
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.models.refs import ModelRef
from nodes.sampling.ddim import ddim_alpha_bars, ddim_step, leading_ddim_timesteps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def embedded():
    model = load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu")
    ref = ModelRef(model)
    return ref, Clip(ref), DiffusersCodec(model.vae), DiffusersDenoiser(model.unet, model.schedule)


@pytest.fixture(scope="module")
def star():
    """A blue star on the left, its reference mask (the left half) and latent."""
    scene = Scene("star", "blue", "large", "left", "plain", "white", None, (0.0, 0.0), "a large blue star on the left")
    image = render(scene)
    half = torch.zeros(1, 64, 64)
    half[..., :32] = 1
    return image, half, torch.as_tensor(coverage(scene)).float()


def _encode(clip, text: str) -> Conditioning:
    from web.nodes_conditioning import CLIPTextEncode
    from nodes.sampling.guidance import to_conditioning

    return to_conditioning(CLIPTextEncode().encode(clip, text)[0], "sd1", "prompt")


def _run(embedded, star, masks: torch.Tensor, layers, inject_step=2, adaptive=True, steps=STEPS, seed=0,
         references: int = 1):
    _, clip, codec, denoiser = embedded
    image = star[0][None]
    clean = (codec.encode(image) - codec.shift_factor) * codec.scaling_factor
    clean = clean.repeat(references, 1, 1, 1)
    attention = MagicFaceAttention(masks, [3.0] * references, [3] * references, layers, inject_step,
                                   0.9 if references == 1 else 0.6)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    positive, negative = _encode(clip, "a large star on the left"), _encode(clip, "")
    reference_prompts = [_encode(clip, "a blue star")] * references
    latent = magicface_sample(denoiser, denoiser.unet, noise, clean, positive, negative, reference_prompts, attention,
                              torch.Generator().manual_seed(seed), steps, 7.5, adaptive)
    return latent, attention, (noise, positive, negative)


def _plain_ddim(denoiser, noise, positive, negative, steps, cfg=7.5):
    timesteps = leading_ddim_timesteps(steps)
    alphas, previous = ddim_alpha_bars(denoiser, timesteps)
    x = noise
    for i in reversed(range(steps)):
        t = torch.full((1,), float(timesteps[i]))
        x = ddim_step(x, guided_eps(denoiser, x, t, positive, negative, cfg), alphas[i], previous[i])
    return x


def test_layers_parse_and_auto_picks_the_decoders_two_highest_resolutions(embedded):
    assert parse_layers("10-15") == frozenset(range(10, 16)) and parse_layers("3") == frozenset({3})
    for bad in ("", "ten", "-1", "3-x"):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad)
    blocks = transformer_blocks(embedded[3].unet)
    # the embedded UNet: 3 encoder blocks, 1 middle, 6 decoder ones (2 per level), in the order they run
    assert [part for part, _ in blocks] == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]


def test_the_stage_switches_exactly_after_inject_step(embedded, star):
    _, attention, _ = _run(embedded, star, star[1], None, inject_step=2)
    assert attention.modes == ["rsa"] * 3 + ["rba"] * (STEPS - 3)
    assert all(count > 0 for count in attention.borrowed)  # RBA ran on a region, not on nothing
    _, attention, _ = _run(embedded, star, star[1], None, inject_step=0)
    assert attention.modes == ["rsa"] + ["rba"] * (STEPS - 1)
    _, attention, _ = _run(embedded, star, star[1], None, inject_step=STEPS)
    assert attention.modes == ["rsa"] * STEPS


def test_one_unet_call_of_one_plus_k_latents_twice_per_step(embedded, star):
    denoiser = embedded[3]
    batches = []
    forward = denoiser.unet.forward

    def counting(x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(x, *args, **kwargs)

    denoiser.unet.forward = counting
    try:
        _run(embedded, star, star[1].repeat(2, 1, 1), None, references=2)
    finally:
        del denoiser.unet.forward
    assert batches == [2 * (1 + 2)] * STEPS


def test_empty_reference_masks_or_no_layers_give_the_plain_ddim_run(embedded, star):
    """With no reference pixel to attend to (or no block changed) and plain guidance, the target is sampled as
    if alone: DDIM on diffusers' grid with CFG."""
    plain = None
    for masks, layers in ((torch.zeros(1, 64, 64), None), (star[1], frozenset())):
        latent, _, (noise, positive, negative) = _run(embedded, star, masks, layers, adaptive=False)
        plain = _plain_ddim(embedded[3], noise, positive, negative, STEPS) if plain is None else plain
        torch.testing.assert_close(latent, plain, rtol=1e-4, atol=1e-4)
    latent, _, _ = _run(embedded, star, star[1], None, adaptive=False)
    assert (latent - plain).abs().max() > 1e-2  # the reference does change the picture


def test_only_the_guided_targets_attention_changes(embedded, star):
    """The CFG batch layout: [target, references] unguided, then guided. RSA gives the guided target (row 2) the
    softmax over its own keys and the guided reference's (row 3) with the mask's bias; the unguided target and the
    references keep plain self-attention."""
    unet = embedded[3].unet
    part, block = transformer_blocks(unet)[-1]
    module = block.attn1
    hidden = torch.randn(4, 64, module.to_q.in_features, generator=torch.Generator().manual_seed(1))
    plain = module(hidden)
    attention = MagicFaceAttention(star[1], [3.0], [3], None)
    with attention.installed(unet):
        attention.begin_call(0, (8, 8))
        attention._top_level = 0  # as if the encoder had run
        changed = module(hidden)
    torch.testing.assert_close(changed[[0, 1, 3]], plain[[0, 1, 3]], rtol=1e-5, atol=1e-5)
    heads = module.heads
    query, keys, values = (projection(hidden).reshape(4, 64, heads, -1).transpose(1, 2)
                           for projection in (module.to_q, module.to_k, module.to_v))
    bias = torch.cat([torch.zeros(64), reference_bias(star[1][0], 3.0, (8, 8))])
    logits = query[2] @ torch.cat([keys[2], keys[3]], dim=1).transpose(-1, -2) / math.sqrt(query.shape[-1]) + bias
    expected = (logits.softmax(-1) @ torch.cat([values[2], values[3]], dim=1)).transpose(0, 1).flatten(1)
    expected = module.to_out[0](expected)
    torch.testing.assert_close(changed[2], expected, rtol=1e-4, atol=1e-5)
    assert (changed[2] - plain[2]).abs().max() > 1e-3
    assert "forward" not in vars(module)  # the instance's forward restored


def test_rsa_and_rba_follow_their_formulas():
    """RSA: the guided target's queries over [own keys; reference keys + w inside the mask, −∞ outside]; RBA: the
    same with one reference, for the pixels of its concept region only."""
    torch.manual_seed(0)
    heads, tokens, dim = 2, 16, 4
    query, keys, values = (torch.randn(4, heads, tokens, dim) for _ in range(3))
    mask = torch.zeros(1, 4, 4)
    mask[0, :, :2] = 1
    attention = MagicFaceAttention(mask, [3.0], [1], None, inject_step=0)
    attention.begin_call(0, (4, 4))
    bias = reference_bias(mask[0], 3.0, (4, 4))
    assert bias.tolist().count(3.0) == 8 and bias.isinf().sum() == 8
    logits = torch.cat([query[2] @ keys[2].transpose(-1, -2), query[2] @ keys[3].transpose(-1, -2)], dim=-1)
    logits = logits / math.sqrt(dim) + torch.cat([torch.zeros(tokens), bias])
    expected = logits.softmax(-1) @ torch.cat([values[2], values[3]], dim=1)
    plain = torch.nn.functional.scaled_dot_product_attention(query[2], keys[2], values[2])
    rsa = attention._reference_attention(query[2], keys, values, plain, range(3, 4), 0)
    torch.testing.assert_close(rsa, expected, rtol=1e-5, atol=1e-5)
    attention._step, attention.regions = 5, torch.zeros(1, 2, 2)
    attention.regions[0, 0, 0] = 1  # the top-left quarter of the 4x4 map
    rba = attention._reference_attention(query[2], keys, values, plain, range(3, 4), 0)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True
    inside = inside.flatten()
    torch.testing.assert_close(rba[:, inside], expected[:, inside], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rba[:, ~inside], plain[:, ~inside])


def test_concept_masks_find_the_concept_token_and_the_foreground():
    """Made-up maps: token 2 attends to the left half, the start token to the right: the concept's region is the
    left half; the foreground is where the start token is weak; below ca_scale 0.9 regions stay inside it."""
    size, length = 4, 5
    tokens = size * size
    cross = torch.full((2, tokens, length), 0.05)
    left = torch.zeros(size, size, dtype=torch.bool)
    left[:, :2] = True
    cross[:, left.flatten(), 2] = 0.8
    cross[:, ~left.flatten(), 0] = 0.8
    cross = cross / cross.sum(-1, keepdim=True)
    identity = torch.eye(tokens).expand(2, tokens, tokens)
    regions, foreground = concept_masks({1: [identity]}, {1: [cross]}, (8, 8), [2], 0.9)
    assert regions.shape == (length, size, size) and foreground.shape == (1, size, size)
    assert torch.equal(regions[2].bool(), left) and torch.equal(foreground[0].bool(), left)
    # a token weighted down below the others' 0.9 loses pixels it narrowly held
    cross[:, left.flatten(), 1] = 0.75
    regions, _ = concept_masks({1: [identity]}, {1: [cross]}, (8, 8), [1], 0.9)
    assert regions[1].sum() == 8 and regions[2].sum() == 0
    regions, foreground = concept_masks({1: [identity]}, {1: [cross]}, (8, 8), [2], 0.6)
    assert not (regions.sum(0) > foreground[0]).any()  # inside the foreground only


def test_regions_come_from_the_guided_half_and_the_foreground_from_the_unguided():
    """The code reads the concept tokens' maps from the guided target and the start token's from the unguided one:
    here they disagree, the concept on the left, the unguided start token weak on the top rows."""
    size, length = 4, 4
    left, top = torch.zeros(size, size, dtype=torch.bool), torch.zeros(size, size, dtype=torch.bool)
    left[:, :2], top[:2] = True, True
    cross = torch.full((2, size * size, length), 0.1)
    cross[1, left.flatten(), 2] = 0.9  # guided: the concept (token 2) on the left, the start token on the right
    cross[1, ~left.flatten(), 0] = 0.9
    cross[0, ~top.flatten(), 0] = 0.9  # unguided: the start token everywhere but the top rows
    cross[0, top.flatten(), 3] = 0.9
    identity = torch.eye(size * size).expand(2, -1, -1)
    regions, foreground = concept_masks({1: [identity]}, {1: [cross / cross.sum(-1, keepdim=True)]}, (8, 8), [2],
                                        0.9)
    assert torch.equal(regions[2].bool(), left) and torch.equal(foreground[0].bool(), top)


def test_the_smoothing_is_the_codes_kernel():
    """GaussianSmoothing(3, σ 0.5) as the code builds it: exp(−((x−μ)/(2σ))²), so a neighbour weighs e^−1 of the
    centre along an axis (a plain σ 0.5 Gaussian: e^−2)."""
    from nodes.magicface.attention import _smoothed

    impulse = torch.zeros(1, 1, 5, 5)
    impulse[..., 2, 2] = 1
    response = _smoothed(impulse)[0, 0]
    assert float(response[2, 1] / response[2, 2]) == pytest.approx(math.exp(-1), rel=1e-4)
    assert float(response.sum()) == pytest.approx(1, rel=1e-5)


def test_guidance_rate_is_one_for_even_guidance_and_stays_in_its_bounds():
    torch.manual_seed(0)
    regions = torch.zeros(3, 4, 4)
    regions[1, :, :2], regions[2, :, 2:] = 1, 1
    foreground = torch.ones(1, 4, 4)
    unguided = torch.zeros(1, 4, 8, 8)
    even = torch.ones(1, 4, 8, 8)
    torch.testing.assert_close(guidance_rate(unguided, even, regions, foreground, 7.5), torch.ones(1, 1, 8, 8))
    uneven = even.clone()
    uneven[..., :4] *= 10  # the left region guided ten times harder: its rate falls, the right one's rises
    rate = guidance_rate(unguided, uneven, regions, foreground, 7.5)
    assert rate.min() >= 0.8 - 1e-6 and rate.max() <= 15 / 7.5 + 1e-6
    assert rate[..., 0].mean() < 1 < rate[..., -1].mean()
    assert guidance_rate(unguided, uneven, regions, foreground, 10.0).max() <= 1.5 + 1e-6


def test_reference_node_checks_and_chains(star):
    image, half, _ = star
    pixels = image.permute(1, 2, 0)[None]
    node = AtelierMagicFaceReference()
    with pytest.raises(ValueError, match="size"):
        node.add(pixels, half[..., :32], None, 3, 3.0)
    with pytest.raises(ValueError, match="empty"):
        node.add(pixels, torch.zeros(1, 64, 64), None, 3, 3.0)
    (first,) = node.add(pixels, half, "prompt", 3, 3.0)
    (both,) = node.add(pixels, half, "other", 5, 2.0, first)
    assert [reference.token_index for reference in both] == [3, 5] and len(first) == 1


def test_sampler_node_runs_and_refuses_what_it_cannot_do(embedded, star):
    ref, clip, codec, _ = embedded
    from web.nodes_conditioning import CLIPTextEncode
    from web.nodes_latent import EmptyLatentImage

    encode = CLIPTextEncode()
    positive, negative = encode.encode(clip, "a large star on the left")[0], encode.encode(clip, "")[0]
    (references,) = AtelierMagicFaceReference().add(star[0].permute(1, 2, 0)[None], star[1],
                                                    encode.encode(clip, "a blue star")[0], 3, 3.0)
    latent = EmptyLatentImage().generate(64, 64, 2)[0]
    sampler = AtelierMagicFaceSampler()
    (out,) = sampler.sample(ref, codec, positive, negative, references, latent, 0, 3, 7.5, 1, "auto", 0.0, True)
    assert out["samples"].shape == (2, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    assert not torch.equal(out["samples"][0], out["samples"][1])  # each its own noise
    with pytest.raises(ValueError, match="10 transformer blocks"):
        sampler.sample(ref, codec, positive, negative, references, latent, 0, 2, 7.5, 1, "10-15", 0.0, True)
    with pytest.raises(ValueError, match="at least one"):
        sampler.sample(ref, codec, positive, negative, (), latent, 0, 2, 7.5, 1, "auto", 0.0, True)
    (far,) = AtelierMagicFaceReference().add(star[0].permute(1, 2, 0)[None], star[1], negative, 77, 3.0)
    with pytest.raises(ValueError, match="beyond the prompt's 77 tokens"):
        sampler.sample(ref, codec, positive, negative, far, latent, 0, 2, 7.5, 1, "auto", 0.0, True)
    long = encode.encode(clip, "a star " * 60)[0]  # two chunks
    with pytest.raises(ValueError, match="one length"):
        sampler.sample(ref, codec, long, negative, references, latent, 0, 2, 7.5, 1, "auto", 0.0, True)


def test_comfyuis_attention_patches_are_refused():
    from nodes.models.comfy_adapters import refuse_attention_patches

    class Patched:
        model_options = {"transformer_options": {"patches_replace": {"attn1": {}}, "patches": {"attn2_patch": []}}}

    with pytest.raises(ValueError, match="attn2_patch, replace attn1"):
        refuse_attention_patches(Patched(), "MagicFace Sampler")


def test_example_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(ROOT, "workflows", "magicface.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "9.steps=4", "--set", "9.inject_step=1"]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1
