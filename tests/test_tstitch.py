"""T-Stitch (techniques.md §4.2, Targets 3 and 5): the small model makes exactly the first r·N steps, r = 0 and
r = 1 are the large and the small model alone, bit for bit, identical models make r irrelevant, and the build-time
check refuses models whose latents, text conditioning or prediction differ."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts, tiny_sdxl  # noqa: F401  (session fixtures)
from nodes.models.loading import load_model
from nodes.models.lora import LoraSpec
from nodes.models.refs import ModelRef
from nodes.tstitch.nodes import AtelierTStitch
from nodes.tstitch.stitch import check_stitchable, small_model_steps
from tiny_models import save_tiny_model
from web.nodes_sampling import KSampler


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> ModelRef:
    """Another tiny SD1 model (other weights, same widths): the small model's stand-in."""
    return ModelRef(load_model(save_tiny_model("sd1", tmp_path_factory.mktemp("tiny_small"), seed=9).folder,
                               device="cpu"))


def _counting(ref: ModelRef) -> list[int]:
    calls = [0]
    ref.model.unet.conv_out.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _sample(model, positive, negative, steps: int = 10) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return KSampler().sample(model, 4, steps, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]


def test_small_model_steps_are_the_first_r_of_n():
    assert [small_model_steps(10, r) for r in (0.0, 0.1, 0.4, 0.45, 1.0)] == [0, 1, 4, 4, 10]
    with pytest.raises(ValueError, match="ratio"):
        small_model_steps(10, 1.5)


def test_stitch_calls_the_small_model_for_the_first_steps_and_the_ends_are_each_model_alone(tiny_sd1_prompts,
                                                                                            small):
    large, positive, negative = tiny_sd1_prompts
    small_calls, large_calls = _counting(small), _counting(large)
    node = AtelierTStitch()
    stitched = _sample(node.patch(large, small, 0.4)[0], positive, negative)
    assert (small_calls[0], large_calls[0]) == (4, 6)  # one call per step: both guidance halves in one batch
    large_only, small_only = _sample(large, positive, negative), _sample(small, positive, negative)
    assert torch.equal(_sample(node.patch(large, small, 0.0)[0], positive, negative), large_only)
    assert torch.equal(_sample(node.patch(large, small, 1.0)[0], positive, negative), small_only)
    assert not torch.equal(stitched, large_only) and not torch.equal(stitched, small_only)


def test_identical_models_give_the_same_picture_at_every_ratio(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    pictures = [_sample(AtelierTStitch().patch(model, model, ratio)[0], positive, negative, 6)
                for ratio in (0.0, 0.4, 1.0)]
    assert all(torch.equal(picture, pictures[0]) for picture in pictures)


def test_models_that_cannot_share_a_trajectory_are_refused_at_build_time(tiny_sd1_prompts, tiny_sdxl, tiny_sd1):
    large = tiny_sd1_prompts[0]
    node = AtelierTStitch()
    with pytest.raises(ValueError, match="cross-attention width is 96 in the small model, 32 in the large"):
        node.patch(large, ModelRef(load_model(tiny_sdxl.folder, device="cpu")), 0.4)
    v_model = ModelRef(load_model(tiny_sd1.folder, device="cpu", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="prediction type is 'v_prediction' in the small model, 'epsilon'"):
        node.patch(large, v_model, 0.4)
    with pytest.raises(ValueError, match="noise schedule differs"):
        check_stitchable({"noise schedule": torch.ones(3)}, {"noise schedule": torch.zeros(3)})
    with pytest.raises(ValueError, match="latent channels is 9"):
        check_stitchable({"latent channels": 9}, {"latent channels": 4})
    with pytest.raises(ValueError, match="other LoRAs"):
        node.patch(large, large.with_lora(LoraSpec("style.safetensors", 1.0, 1.0)), 0.4)
    with pytest.raises(TypeError, match="both be Atelier's or both ComfyUI's"):
        node.patch(large, object(), 0.4)
