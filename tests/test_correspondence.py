"""Semantic correspondence: chunked matching against brute force, dense flow accuracy on known warps, fusion's
normalisation, determinism, the SD and DINOv2 extractors on tiny random models, the feature cache, the nodes, and the
example workflow on the shipped model."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import Conditioning, DiffusersCodec
from nodes.correspondence import cache as cache_module
from nodes.correspondence.cache import FeatureCache
from nodes.correspondence.features import (FeatureMaps, dense_sift_features, dinov2_features, sd_layer_modules,
                                           sd_unet_features)
from nodes.correspondence.fusion import fit_pca_basis, fuse_pair, project
from nodes.correspondence.matching import (cell_centres, flow_field, flow_to_image, instance_swap, match_dense,
                                           nearest_neighbours, sparse_matches, window_soft_argmax)
from nodes.correspondence.nodes import (AtelierDenseSIFTFeatures, AtelierDINOv2Features, AtelierFitFeatureBasis,
                                        AtelierFuseFeatures, AtelierInstanceSwap, AtelierLoadDINOv2,
                                        AtelierMatchFeatures, AtelierSDFeatures)
from nodes.correspondence.synthetic import pck, texture, warp_with_truth
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef
from nodes.models.text import encode_prompt
from nodes.sampling.guidance import from_conditioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128  # test images; PCK@0.05 is then 6.4 px


def pck05(image_a: torch.Tensor, image_b: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> float:
    """PCK@0.05 of the weight-free dense flow from B to A (B's pixels are where the truth is known)."""
    maps_b, maps_a = dense_sift_features(image_b, SIZE), dense_sift_features(image_a, SIZE)
    descriptor_b, descriptor_a = fuse_pair([(maps_b, maps_a)], [1.0], pca_dims=0)
    flow, _ = flow_field(match_dense(descriptor_b, descriptor_a, (SIZE, SIZE), (SIZE, SIZE)))
    return pck(flow, truth, valid)


# --- matching ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_elements", [1, 37, 1000, 1 << 24])
def test_chunked_nearest_neighbours_equal_brute_force_cdist(max_elements):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(150, 16, generator=generator, dtype=torch.float64)
    target = torch.randn(110, 16, generator=generator, dtype=torch.float64)
    forward, backward = nearest_neighbours(source, target, max_elements)
    distances = torch.cdist(source, target)
    assert torch.equal(forward, distances.argmin(1))
    assert torch.equal(backward, distances.argmin(0))


@pytest.mark.parametrize("max_elements", [5, 1 << 24])
def test_backward_neighbours_when_every_chunk_improves_every_column(max_elements):
    """Sources come nearer to all targets one after the other, so each chunk beats the running minimum of every
    column (the backward search then reads every column's index from each block); with the default bound on the
    CPU, 4000 targets still take several chunks (the cache-sized block)."""
    generator = torch.Generator().manual_seed(1)
    for target in (torch.arange(5, dtype=torch.float64)[:, None],
                   torch.randn(4000, 3, generator=generator, dtype=torch.float64)):
        source = torch.linspace(100, 10, 1500, dtype=torch.float64)[:, None].expand(-1, target.shape[1])
        forward, backward = nearest_neighbours(source, target, max_elements)
        distances = torch.cdist(source, target)
        assert torch.equal(forward, distances.argmin(1)) and torch.equal(backward, distances.argmin(0))


def test_nearest_neighbours_break_ties_by_the_lowest_index_across_chunks():
    source = torch.tensor([[1.0], [1.0], [1.0]])
    target = torch.tensor([[1.0], [1.0]])
    for max_elements in (1, 2, 100):
        forward, backward = nearest_neighbours(source, target, max_elements)
        assert forward.tolist() == [0, 0, 0] and backward.tolist() == [0, 0]


def test_nearest_neighbours_refuse_mismatched_widths():
    with pytest.raises(ValueError, match=r"same C; got \(3, 4\) and \(2, 5\)"):
        nearest_neighbours(torch.zeros(3, 4), torch.zeros(2, 5))


@pytest.mark.parametrize("kind, strength, seed", [("homography", 1.0, 0), ("homography", 1.5, 1), ("tps", 1.0, 1),
                                                  ("tps", 1.5, 0)])
def test_dense_sift_flow_reaches_pck05_of_0_9_on_mild_warps(kind, strength, seed):
    image = texture(SIZE, seed)
    warped, truth, valid = warp_with_truth(image, kind, strength)
    assert valid.float().mean() > 0.7  # the warp is mild: most of B still shows A
    assert pck05(image, warped, truth, valid) >= 0.9


def test_flow_of_an_image_with_itself_is_the_identity_with_full_confidence():
    image = texture(64, 3)
    maps = dense_sift_features(image, 64)
    descriptor, _ = fuse_pair([(maps, maps)], [1.0], pca_dims=0)
    matches = match_dense(descriptor, descriptor, (64, 64), (64, 64), radius=0)
    assert torch.allclose(matches.target_xy, cell_centres((16, 16), (64, 64)))
    assert matches.confidence.min() == 1.0


def test_soft_argmax_moves_between_cells_and_radius_zero_keeps_the_hard_match():
    # Target cells 0..4 in a row whose descriptors vary smoothly; the source lies between cells 2 and 3.
    positions = torch.arange(5.0)
    target = torch.stack([torch.cos(positions / 4), torch.sin(positions / 4)], dim=-1)  # (5, 2)
    source = torch.stack([torch.cos(torch.tensor(2.4) / 4), torch.sin(torch.tensor(2.4) / 4)])
    distances = ((target - source) ** 2).sum(-1)[None]
    hard = torch.tensor([2])
    assert window_soft_argmax(distances, hard, (1, 5), radius=0).tolist() == [[2.0, 0.0]]
    soft = window_soft_argmax(distances, hard, (1, 5), radius=2, temperature=2e-3)
    assert 2.0 < soft[0, 0] < 3.0 and soft[0, 1] == 0
    # A constant added to the row (the ‖a‖² the search leaves out) changes nothing.
    assert torch.allclose(window_soft_argmax(distances + 7.0, hard, (1, 5), radius=2, temperature=2e-3), soft)


def test_cycle_confidence_is_one_for_mutual_matches_and_lower_otherwise():
    # A's cells 0 and 1 both match B's cell 0, whose nearest neighbour in A is cell 0: cell 1 is not mutual.
    a = torch.tensor([[0.0, 0.1]])[:, None, :]
    b = torch.tensor([[0.0, 5.0]])[:, None, :]
    matches = match_dense(a, b, (1, 2), (1, 2), radius=0)
    assert matches.confidence.flatten().tolist() == pytest.approx([1.0, math.exp(-0.5)])


def test_matching_is_deterministic():
    image = texture(SIZE, 4)
    warped, _, _ = warp_with_truth(image, "tps", 1.0)
    runs = []
    for _ in range(2):
        maps_a, maps_b = dense_sift_features(image, SIZE), dense_sift_features(warped, SIZE)
        descriptors = fuse_pair([(maps_a, maps_b)], [0.5], pca_dims=64)
        runs.append(match_dense(*descriptors, (SIZE, SIZE), (SIZE, SIZE)))
    assert torch.equal(runs[0].target_xy, runs[1].target_xy)
    assert torch.equal(runs[0].confidence, runs[1].confidence)


def test_flow_image_reads_back_into_positions_and_sparse_matches_are_mutual():
    image = texture(64, 5)
    warped, _, _ = warp_with_truth(image, "homography", 1.0)
    descriptors = fuse_pair([(dense_sift_features(image, 64), dense_sift_features(warped, 64))], [1.0], 0)
    matches = match_dense(*descriptors, (64, 64), (64, 64))
    xy, _ = flow_field(matches)
    picture = flow_to_image(xy, (64, 64))
    assert torch.allclose(picture[..., :2] * 63, xy, atol=1e-4) and picture[..., 2].abs().max() == 0
    listed = sparse_matches(matches, max_matches=10)
    assert len(listed) == 10 and all(match["confidence"] == 1.0 for match in listed)


# --- fusion -----------------------------------------------------------------------------------------------------

def _maps(seed: int, source: str = "x", channels: tuple[int, ...] = (12, 20), grids=((4, 4), (8, 8))) -> FeatureMaps:
    generator = torch.Generator().manual_seed(seed)
    return FeatureMaps(tuple(torch.randn(c, *grid, generator=generator) for c, grid in zip(channels, grids)),
                       source, (32, 32))


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.25)])
def test_fused_sources_each_have_the_norm_of_their_weight(weights):
    sd = (_maps(0, "sd"), _maps(1, "sd"))
    dino = (_maps(2, "dino", (16,), ((6, 6),)), _maps(3, "dino", (16,), ((6, 6),)))
    fused_a, fused_b = fuse_pair([sd, dino], list(weights), pca_dims=8)
    # sd: two layers of 8 PCA dims on the finest grid (8×8); dino: 8 dims upsampled from 6×6.
    assert fused_a.shape == fused_b.shape == (24, 8, 8)
    for fused in (fused_a, fused_b):
        assert torch.allclose(fused[:16].norm(dim=0), torch.full((8, 8), weights[0]), atol=1e-5)
        assert torch.allclose(fused[16:].norm(dim=0), torch.full((8, 8), weights[1]), atol=1e-5)


def test_equal_weights_give_the_same_neighbours_at_any_scale():
    # The anchor's weights 1 and 1 equal the paper's α = 0.5: scaling both halves alike keeps every neighbour.
    sd = (_maps(0, "sd"), _maps(1, "sd"))
    dino = (_maps(2, "dino", (16,), ((8, 8),)), _maps(3, "dino", (16,), ((8, 8),)))
    half = match_dense(*fuse_pair([sd, dino], [0.5, 0.5], 8), (32, 32), (32, 32), radius=0)
    ones = match_dense(*fuse_pair([sd, dino], [1.0, 1.0], 8), (32, 32), (32, 32), radius=0)
    assert torch.equal(half.target_xy, ones.target_xy)


def test_pca_basis_is_orthonormal_deterministic_and_reusable():
    a, b = _maps(0), _maps(1)
    basis = fit_pca_basis([a, b], dims=6)
    again = fit_pca_basis([a, b], dims=6)
    for component, other in zip(basis.components, again.components):
        assert torch.equal(component, other)
        assert torch.allclose(component.T @ component, torch.eye(6), atol=1e-5)
    joint = fuse_pair([(a, b)], [1.0], pca_dims=6)
    fixed = fuse_pair([(a, b)], [1.0], pca_dims=6, bases=[basis])
    assert all(torch.equal(x, y) for x, y in zip(joint, fixed))
    # Projected tokens are centred over the pair: the mean of both images' projections is zero.
    tokens = torch.cat([project(m, basis).layers[0].flatten(1) for m in (a, b)], dim=1)
    assert tokens.mean(1).abs().max() < 1e-5


def test_fusion_refuses_features_of_different_extractors():
    with pytest.raises(ValueError, match="same extractor"):
        fuse_pair([(_maps(0, "sd"), _maps(1, "dino"))], [0.5])
    with pytest.raises(ValueError, match=r"weights must be >= 0; got \[-1.0\]"):
        fuse_pair([(_maps(0), _maps(1))], [-1.0])


# --- extractors -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_model(tiny_sd1):  # noqa: F811
    return load_model(tiny_sd1.folder, device="cpu", dtype=torch.float32)


def _empty_prompt(model) -> Conditioning:
    return encode_prompt(model.tokenizers, model.text_encoders, model.family, "")


def test_sd_layers_have_the_papers_channels_and_strides(sd_model):
    image = texture(128, 0)
    maps = sd_unet_features(sd_model.unet, DiffusersCodec(sd_model.vae), sd_model.schedule, image,
                            _empty_prompt(sd_model), size=128)
    widths = list(reversed(sd_model.unet.config.block_out_channels))
    # ldm output_blocks 2, 5, 8: the decoder's first three levels, at 1/64, 1/32 and 1/16 of the image.
    assert [tuple(layer.shape) for layer in maps.layers] == [(widths[0], 2, 2), (widths[1], 4, 4), (widths[2], 8, 8)]
    assert not any(module._forward_hooks for module in sd_layer_modules(sd_model.unet, (2, 5, 8, 11)))


def test_sd_features_are_bit_identical_across_runs_and_follow_the_seed(sd_model):
    image, prompt, codec = texture(128, 1), _empty_prompt(sd_model), DiffusersCodec(sd_model.vae)
    first, second, other = (sd_unet_features(sd_model.unet, codec, sd_model.schedule, image, prompt, seed=seed,
                                             size=128, layers=(5, 8, 11)) for seed in (42, 42, 43))
    assert all(torch.equal(x, y) for x, y in zip(first.layers, second.layers))
    assert not torch.equal(first.layers[0], other.layers[0])
    assert first.layers[2].shape[-1] == 16  # layer 11 sits at 1/8


def test_sd_features_refuse_bad_layers_and_timesteps(sd_model):
    codec = DiffusersCodec(sd_model.vae)
    with pytest.raises(ValueError, match=r"layers must be distinct .* got \(3,\)"):
        sd_unet_features(sd_model.unet, codec, sd_model.schedule, texture(64, 0), _empty_prompt(sd_model), size=64,
                         layers=(3,))
    with pytest.raises(ValueError, match="timestep must be in"):
        sd_unet_features(sd_model.unet, codec, sd_model.schedule, texture(64, 0), _empty_prompt(sd_model), size=64,
                         timestep=1000)


def test_sd_features_node_caches_by_image_model_t_and_layers(sd_model, monkeypatch):
    cache = FeatureCache()
    monkeypatch.setattr("nodes.correspondence.nodes.FEATURE_CACHE", cache)
    node, ref, codec = AtelierSDFeatures(), ModelRef(sd_model), DiffusersCodec(sd_model.vae)
    image = texture(64, 2).permute(0, 2, 3, 1)
    prompt = _empty_prompt(sd_model)
    conditioning = from_conditioning(prompt)
    first = node.extract(ref, codec, conditioning, image, 100, 42, 64, "2,5,8")[0]
    assert node.extract(ref, codec, conditioning, image, 100, 42, 64, "2,5,8")[0] is first
    assert (cache.hits, cache.misses) == (1, 1)
    for timestep, layers, picture in ((200, "2,5,8", image), (100, "5,8", image), (100, "2,5,8", 1 - image)):
        assert node.extract(ref, codec, conditioning, picture, timestep, 42, 64, layers)[0] is not first
    assert (cache.hits, cache.misses) == (1, 4)
    direct = sd_unet_features(sd_model.unet, codec, sd_model.schedule, image.permute(0, 3, 1, 2), prompt, size=64)
    assert all(torch.equal(x, y) for x, y in zip(first.layers, direct.layers))


def test_feature_cache_drops_the_least_recently_used_past_its_budget():
    entry_bytes = 4 * 4 * 4
    cache = FeatureCache(max_bytes=2 * entry_bytes)

    def make():
        return FeatureMaps((torch.zeros(1, 4, 4),), "demo", (4, 4))

    for key in ("a", "b", "a", "c"):
        cache.get_or_compute(key, make)
    assert len(cache) == 2 and cache.hits == 1
    cache.get_or_compute("a", make)  # "a" was used after "b", so "b" went
    assert cache.hits == 2
    assert cache_module.tensor_digest(torch.zeros(2)) != cache_module.tensor_digest(torch.zeros(2, 1))


TINY_DINOV2_NAME = "tiny"


def write_tiny_dinov2(models_dir: str | os.PathLike) -> None:
    """A random DINOv2 (ViT with 14-px patches, 32-d, two blocks, seed 0) as ``models_dir/dinov2/tiny``, the folder
    Load DINOv2 lists; test_comfy_pack_correspondence.py gives the same one to both hosts."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    Dinov2Model(config).save_pretrained(os.path.join(models_dir, "dinov2", TINY_DINOV2_NAME),
                                        safe_serialization=True)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_dinov2(models)
    return models


def test_dinov2_node_loads_offline_and_gives_last_layer_patch_tokens(tiny_dinov2, monkeypatch):
    monkeypatch.setattr(AtelierLoadDINOv2, "models_dir", str(tiny_dinov2))
    assert AtelierLoadDINOv2.INPUT_TYPES()["required"]["dinov2_name"][0] == ["tiny"]
    backbone = AtelierLoadDINOv2().load("tiny")[0]
    image = texture(70, 0)[:, :, :, :56]  # 70×56: the long side becomes 84 (6 patches), the short 70 (5)
    maps = AtelierDINOv2Features().extract(backbone, image.permute(0, 2, 3, 1), 84)[0]
    assert tuple(maps.layers[0].shape) == (32, 6, 5) and maps.image_size == (70, 56)
    pixels = F.interpolate(image, size=(84, 70), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = backbone.model(pixel_values=(pixels - mean) / std, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + two blocks: the last block's output, before the final norm
    assert torch.allclose(maps.layers[0], hidden[-1][0, 1:].T.reshape(32, 6, 5), atol=1e-5)
    assert torch.equal(maps.layers[0], dinov2_features(backbone.model, image, 84).layers[0])


def test_dinov2_size_must_be_a_multiple_of_the_patch(tiny_dinov2, monkeypatch):
    monkeypatch.setattr(AtelierLoadDINOv2, "models_dir", str(tiny_dinov2))
    with pytest.raises(ValueError, match="size must be a multiple of the patch size 14 .* got 100"):
        dinov2_features(AtelierLoadDINOv2().load("tiny")[0].model, texture(56, 0), 100)


# --- nodes ------------------------------------------------------------------------------------------------------

def _pair(size: int = 64):
    image = texture(size, 6)
    warped, _, _ = warp_with_truth(image, "homography", 1.0)
    return image.permute(0, 2, 3, 1), warped.permute(0, 2, 3, 1)


def test_match_node_outputs_equal_the_maths():
    image_a, image_b = _pair()
    maps_a = AtelierDenseSIFTFeatures().extract(image_a, 64)[0]
    maps_b = AtelierDenseSIFTFeatures().extract(image_b, 64)[0]
    fused_a, fused_b = AtelierFuseFeatures().fuse(maps_a, maps_b, 0.5, 256)
    out = AtelierMatchFeatures().match(fused_a, fused_b, image_a, image_b, 3, 0.04, 20, 1.0)
    flow, confidence, listed, picture = out["result"]
    descriptors = fuse_pair([(dense_sift_features(image_a.permute(0, 3, 1, 2), 64),
                              dense_sift_features(image_b.permute(0, 3, 1, 2), 64))], [0.5], 256)
    matches = match_dense(*descriptors, (64, 64), (64, 64), 3, 0.04)
    xy, expected_confidence = flow_field(matches)
    assert torch.equal(flow[0], flow_to_image(xy, (64, 64))) and torch.equal(confidence[0], expected_confidence)
    assert json.loads(listed) == sparse_matches(matches, 20, 1.0)
    assert picture.shape == (1, 64, 128, 3)
    widget = out["ui"]["atelier_correspondence"][0]
    assert widget["grid"] == [16, 16] and len(widget["targets"]) == 16 * 16 * 2
    assert widget["picture"].startswith("data:image/jpeg;base64,")


def test_match_node_asks_for_fusion_of_layered_features_and_one_image():
    image_a, image_b = _pair()
    maps = AtelierDenseSIFTFeatures().extract(image_a, 64)[0]
    with pytest.raises(ValueError, match="descriptor_a has 3 layers .* Fuse Features"):
        AtelierMatchFeatures().match(maps, maps, image_a, image_a, 3, 0.04, 20, 1.0)
    with pytest.raises(ValueError, match=r"image must be one RGB image of shape \(1, H, W, 3\); got \(2, 64, 64, 3\)"):
        AtelierDenseSIFTFeatures().extract(torch.cat([image_a, image_b]), 64)
    with pytest.raises(ValueError, match="features_a_2 and features_b_2 come together"):
        AtelierFuseFeatures().fuse(maps, maps, 0.5, 0, features_a_2=maps)


def test_fixed_basis_nodes_equal_the_maths_and_fuse_two_sources():
    first, second, third = _maps(0, "sd"), _maps(1, "sd"), _maps(2, "sd")
    dino_a, dino_b = _maps(3, "dino", (16,), ((8, 8),)), _maps(4, "dino", (16,), ((8, 8),))
    basis = AtelierFitFeatureBasis().fit(first, second, 6)[0]
    # The basis fitted on one pair is reused on another pair (second, third) for the first source.
    fused = AtelierFuseFeatures().fuse(second, third, 0.5, 6, features_a_2=dino_a, features_b_2=dino_b,
                                       weight_2=0.5, basis=basis)
    # DINOv2, the second source, is kept whole by default (sd-dino's CO_PCA_DINO = 0)
    expected = fuse_pair([(second, third), (dino_a, dino_b)], [0.5, 0.5], [6, 0],
                         [fit_pca_basis([first, second], 6), None])
    assert all(torch.equal(node.layers[0], maths) for node, maths in zip(fused, expected))
    assert fused[0].layers[0].shape[0] == 6 * 2 + 16  # two SD layers co-PCA'd to 6, DINOv2's 16 channels whole
    with pytest.raises(ValueError, match="basis_2 is for the second source"):
        AtelierFuseFeatures().fuse(second, third, 0.5, 6, basis_2=basis)


def test_sd_features_node_validation_names_the_layers_widget():
    assert "layers must list distinct indices" in AtelierSDFeatures.VALIDATE_INPUTS("2,4")
    assert AtelierSDFeatures.VALIDATE_INPUTS("8,2") is True


def test_instance_swap_of_an_image_with_itself_returns_it_and_keeps_pixels_outside_the_mask():
    image_a, image_b = _pair()
    # Distinct descriptors at full resolution: every pixel's nearest neighbour in the same image is itself.
    distinct = FeatureMaps((torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(0)),), "random", (64, 64))
    assert torch.equal(AtelierInstanceSwap().swap(image_a, image_a, distinct, distinct, 64)[0], image_a)
    maps = AtelierDenseSIFTFeatures().extract(image_a, 64)[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    maps_b = AtelierDenseSIFTFeatures().extract(image_b, 64)[0]
    fused_a, fused_b = AtelierFuseFeatures().fuse(maps, maps_b, 1.0, 0)
    swapped = AtelierInstanceSwap().swap(image_a, image_b, fused_a, fused_b, 64, mask_a=mask)[0]
    assert torch.equal(swapped[0, :16], image_a[0, :16])
    colours_b = image_b.reshape(-1, 3)
    inside = swapped[0, 16:48, 16:48].reshape(-1, 3)
    distances = torch.cdist(inside, colours_b, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(1).values.max() == 0  # every repainted pixel is one of B's
    direct = instance_swap(image_a[0].permute(2, 0, 1), image_b[0].permute(2, 0, 1), fused_a.layers[0],
                           fused_b.layers[0], mask[0], None, 64)
    assert torch.equal(swapped[0], direct.permute(1, 2, 0))


def test_instance_swap_refuses_an_empty_mask():
    image_a, _ = _pair()
    maps = AtelierDenseSIFTFeatures().extract(image_a, 64)[0]
    fused, _ = AtelierFuseFeatures().fuse(maps, maps, 1.0, 0)
    with pytest.raises(ValueError, match="mask_b is empty"):
        AtelierInstanceSwap().swap(image_a, image_a, fused, fused, 64, mask_b=torch.zeros(1, 64, 64))


# --- the example workflow ---------------------------------------------------------------------------------------

def test_correspondence_workflow_runs_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(ROOT, "workflows", "correspondence.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")])
    assert code == 0
    outputs = [line.removeprefix("output: ") for line in capsys.readouterr().out.splitlines()
               if line.startswith("output: ")]
    sizes = sorted(Image.open(path).size for path in outputs)
    # Two match pictures (A and B side by side), the flow at A's size, the swap at its working size.
    assert sizes == sorted([(512, 256), (512, 256), (256, 256), (64, 64)]), sizes
