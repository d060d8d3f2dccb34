"""Feature inheritance (techniques.md §4.6, Targets 3 and 9; A-SDM's idea, our design): every step full is the plain
sampler bit for bit; the inheriting parts run exactly at the full steps; the whole UNet inherited at step j gives
step j − 1's prediction; and only the parts at or below min_level inherit."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.common.unet_split import DiffusersUNetCall
from nodes.inheritance.inherit import FeatureInheritance, full_steps
from nodes.inheritance.nodes import AtelierFeatureInheritance
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.patches import StepSchedule
from web.nodes_sampling import KSampler

STEPS = 6


def _sample(model, positive, negative) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return KSampler().sample(model, 2, STEPS, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]


def test_step_modes():
    assert full_steps(8, "uniform", 1) == frozenset(range(8))
    assert sorted(full_steps(8, "uniform", 3)) == [0, 3, 6]
    assert sorted(full_steps(10, "front_dense", 2, 0.3)) == [0, 1, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="mode"):
        full_steps(8, "sometimes")


@pytest.mark.parametrize("granularity", ["unit", "layer", "unet"])
def test_every_step_full_is_the_plain_sampler_and_inheriting_changes_the_picture(tiny_sd1_prompts, granularity):
    model, positive, negative = tiny_sd1_prompts
    plain = _sample(model, positive, negative)
    node = AtelierFeatureInheritance()
    (every_step,) = node.patch(model, granularity, "uniform", 1, 0.0, 0)
    assert torch.equal(_sample(every_step, positive, negative), plain)
    (inheriting,) = node.patch(model, granularity, "uniform", 2, 0.0, 1)
    assert not torch.equal(_sample(inheriting, positive, negative), plain)
    assert model.sampling_patch is None


def test_inheriting_parts_run_at_the_full_steps_only_and_only_below_min_level(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    (patched,) = AtelierFeatureInheritance().patch(model, "layer", "uniform", 2, 0.0, 1)
    patch = patched.sampling_patch
    _sample(patched, positive, negative)
    # the tiny UNet's latents are 8×8: level 0 is 8×8 and never counted; everything at 4×4 and below runs at the
    # full steps 0, 2, 4 only (one call per step: both guidance halves batched)
    assert patch.runs and set(patch.runs.values()) == {len(full_steps(STEPS, "uniform", 2))}
    assert not any(name.startswith(("down_blocks.0.", "up_blocks.3.")) for name in patch.runs)
    assert any(name.startswith("mid_block.") for name in patch.runs)
    (units,) = AtelierFeatureInheritance().patch(model, "unit", "uniform", 3, 0.0, 0)
    _sample(units, positive, negative)
    assert units.sampling_patch.runs and all(name.rsplit(".", 1)[-1] in ("attn1", "attn2", "ff")
                                             for name in units.sampling_patch.runs)
    assert set(units.sampling_patch.runs.values()) == {2}  # steps 0 and 3


def test_the_whole_unet_inherited_at_step_j_gives_step_j_minus_1s_prediction(tiny_sd1_prompts):
    unet = tiny_sd1_prompts[0].model.unet
    sampling = DiscreteModelSampling.from_beta_schedule()
    steps = StepSchedule.of(torch.tensor([14.6, 5.0, 2.0, 0.7, 0.0]), sampling.timestep)
    call = DiffusersUNetCall(unet, torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0)))
    patch = FeatureInheritance("unet", "uniform", 2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outputs = [patch.unet(call, torch.randn(2, 4, 8, 8, generator=generator), steps.timesteps[i].expand(2),
                              steps) for i in range(4)]
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[3], outputs[2])
    assert not torch.equal(outputs[2], outputs[1])
    assert patch.runs == {"unet": 2}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="granularity"):
        FeatureInheritance("block-ish")
    with pytest.raises(ValueError, match="min_level"):
        FeatureInheritance(min_level=-1)
