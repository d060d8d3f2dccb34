"""SADA (techniques.md §4.5, Targets 3 and 8): an empty acceleration range is the plain Euler and DPM++ 2M, bit for
bit; a trajectory whose ε is affine in z is stable, so calls are skipped, never more than max_interval in a row; the
Lagrange extrapolation is exact for cubic x̂₀ trajectories; windows of one token (sx = sy = 1) equal step skipping
alone; and the node's MODEL and SAMPLER run through SamplerCustom on a tiny model."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.sada.nodes import AtelierSADA
from nodes.sada.solver import SadaSettings, lagrange_extrapolate, sample_sada
from nodes.sada.tokens import TokenPruning, TokenScores, window_tokens
from nodes.sampling.k_samplers import Sampler, run_sampler
from nodes.sampling.model_sampling import DiscreteModelSampling
from web.nodes_sampling import BasicScheduler, SamplerCustom

SAMPLING = DiscreteModelSampling.from_beta_schedule()


def _sigmas(steps: int) -> torch.Tensor:
    """``steps`` σ evenly spaced in timestep from 999, then 0."""
    return torch.cat([SAMPLING.sigma(torch.linspace(999, 0, steps + 1)[:-1]), torch.zeros(1)])


class Counted:
    """A denoiser D(x, σ) that records the σ of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, sigma, **_):
        self.calls.append(float(sigma[0]))
        return self.denoiser(x, sigma)


def wiener(x, sigma):
    """The ideal denoiser of Gaussian data of variance 0.5: x̂₀ linear in x, so ε is affine in z."""
    return x * 0.5 / (0.5 + sigma.reshape(-1, 1, 1, 1) ** 2)


def curved(x, sigma):
    """A denoiser that is not linear in x."""
    return torch.tanh(x) * (0.6 + 0.1 * sigma.reshape(-1, 1, 1, 1).sin())


def _run(denoiser, sampler, steps: int = 50):
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    model = Counted(denoiser)
    latent = run_sampler(sampler, model, SAMPLING, _sigmas(steps), noise, torch.zeros_like(noise), 0)
    return latent, model.calls


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_an_empty_acceleration_range_is_the_plain_solver_bit_for_bit(solver):
    plain, plain_calls = _run(curved, solver)
    sada, calls = _run(curved, Sampler(sample_sada, {"solver": solver, "acc_start": 30, "acc_end": 30}))
    assert torch.equal(sada, plain)
    assert calls == plain_calls


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_a_stable_trajectory_skips_calls_never_more_than_max_interval_in_a_row(solver):
    sigmas = _sigmas(50).tolist()
    for max_interval in (1, 2, 4):
        options = {"solver": solver, "acc_start": 3, "acc_end": 50, "lagrange_term": 0, "max_interval": max_interval}
        _, calls = _run(wiener, Sampler(sample_sada, options))
        computed = [sigmas.index(call) for call in calls]
        assert len(calls) < 50
        gaps = [b - a - 1 for a, b in zip(computed, computed[1:])]
        assert max(gaps) == max_interval  # skipped in a row: as many as allowed, never more
        assert computed[:4] == [0, 1, 2, 3]  # three drifts first: the earliest skip is step 4


def test_the_default_settings_skip_by_the_criterion_then_by_lagrange_every_fourth_step_computed():
    sigmas = _sigmas(50).tolist()
    sada, calls = _run(wiener, Sampler(sample_sada, {"solver": "euler"}))
    computed = [sigmas.index(call) for call in calls]
    assert [step for step in computed if 25 <= step < 47] == [25, 29, 33, 37, 41, 45]
    # the last decision is made at step 46 (acc_end 47 is exclusive): 47 is skipped, 48 and 49 computed
    assert computed[-3:] == [45, 48, 49] and all(step in computed for step in range(11))
    plain, _ = _run(wiener, "euler")
    assert torch.allclose(sada, plain, atol=0.05)  # a stable (linear) trajectory is extrapolated closely


def test_lagrange_extrapolation_is_exact_for_a_cubic_trajectory():
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)

    def x0(step: float) -> torch.Tensor:
        return sum(coefficients[k] * step ** k for k in range(4))

    points = [9, 13, 17, 21]
    for at in (22, 23, 24, 30):
        assert torch.allclose(lagrange_extrapolate(points, [x0(p) for p in points], at), x0(at), rtol=1e-9)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="multiple"):
        SadaSettings(lagrange_step=25)
    with pytest.raises(ValueError, match="max_interval"):
        SadaSettings(max_interval=0)
    with pytest.raises(ValueError, match="solver"):
        sample_sada(Counted(wiener), torch.zeros(1, 4, 2, 2), _sigmas(4), solver="heun")
    assert SadaSettings().skip_kind(5, True, 0) is None  # before acc_start: computed
    assert SadaSettings().skip_kind(12, True, 4) is None  # four in a row already


def _sada_run(model, positive, negative, sx: int = 3, sy: int = 3, patched: bool = True):
    """SamplerCustom with the SADA node's sampler (its defaults, 50 steps) and its MODEL, or the plain MODEL."""
    sada_model, sampler = AtelierSADA().build(model, "euler", 10, 47, 24, 4, 4, 4, sx, sy, 1, 5 * 1024)
    (sigmas,) = BasicScheduler().get_sigmas(model, "normal", 50, 1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sampled, _ = SamplerCustom().sample(sada_model if patched else model, True, 5, 5.0, positive, negative, sampler,
                                        sigmas, latent)
    return sampled["samples"], sada_model.sampling_patch


def test_sada_node_runs_through_sampler_custom_with_fewer_calls_and_pruned_blocks(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    calls = []
    hook = model.model.unet.conv_out.register_forward_hook(lambda *_: calls.append(1))
    try:
        sampled, pruning = _sada_run(model, positive, negative)
    finally:
        hook.remove()
    assert sampled.shape == (1, 4, 8, 8) and torch.isfinite(sampled).all()
    assert 20 <= len(calls) < 50  # the Lagrange phase alone skips 18 of steps 25..46
    assert pruning.pruned_passes > 0


def test_windows_of_one_token_keep_every_token_and_equal_the_step_skipping_alone(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    steps_only, _ = _sada_run(model, positive, negative, patched=False)
    every_token, pruning = _sada_run(model, positive, negative, sx=1, sy=1)
    assert pruning.pruned_passes > 0 and torch.equal(every_token, steps_only)
    pruned, _ = _sada_run(model, positive, negative)
    assert not torch.equal(pruned, steps_only)


def test_token_windows_and_the_refresh_rule():
    mask = window_tokens(7, 8, 3, 3, torch.Generator().manual_seed(1)).reshape(7, 8)
    assert int(mask.sum()) == 2 * 2 and not mask[6:].any() and not mask[:, 6:].any()  # whole windows only
    for row in range(2):
        for column in range(2):
            assert int(mask[row * 3:row * 3 + 3, column * 3:column * 3 + 3].sum()) == 1
    scores = TokenScores(SadaSettings())
    pruning = TokenPruning(scores)
    assert pruning.mode(12) is None  # no criterion recorded yet
    scores.record(torch.randn(1, 4, 8, 8))
    assert [pruning.mode(step) for step in (9, 10, 11, 14, 47)] == [None, "full", "prune", "full", None]
    scores.last_skipped = 20  # refreshes count from the step after the last skipped one
    assert [pruning.mode(step) for step in (21, 22, 25)] == ["full", "prune", "full"]
