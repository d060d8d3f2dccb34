"""NoiseShift (techniques.md §4.7, Targets 3 and 10): the grid search finds the analytic shift of a Wiener denoiser,
the identity table samples exactly as the plain model, a table changes what the network is told and nothing else,
and the nodes run on a tiny model in the standalone app and on ComfyUI's own model sampling."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.models.comfy_adapters import denoiser_and_latent_space
from nodes.common.paths import PathOutsideFolderError
from nodes.noiseshift.nodes import (AtelierNoiseShiftApply, AtelierNoiseShiftCalibrate, AtelierNoiseShiftLoad,
                                    AtelierNoiseShiftSave)
from nodes.noiseshift.shift import NoiseShiftTable, calibrate, load_table, shifted_model_sampling
from nodes.sampling.guiders import model_sampling_of
from nodes.sampling.model_sampling import DiscreteModelSampling
from web.nodes_sampling import KSampler


def wiener(assumed_variance: float):
    """The best denoiser for Gaussian data of ``assumed_variance``: D(x, σ) = x·s0² / (s0² + σ²)."""
    return lambda x, sigma: x * assumed_variance / (assumed_variance + sigma * sigma)


@pytest.mark.parametrize(("true_std", "assumed_std"), [(2.0, 1.0), (1.0, 1.6), (1.0, 1.0)])
def test_grid_search_finds_the_wiener_shift_sigma_times_s0_over_s1(true_std, assumed_std):
    # A denoiser that assumes the wrong data variance is best told σ̂ = σ·s0/s1 (techniques.md §4.7); at matching
    # statistics, σ itself. (Far above the data's scale the error hardly depends on σ̂, every estimate being near
    # 0, and 131,072 samples no longer pin it to 1 %: at σ = 8 the matched search gave 8.10.)
    data = torch.randn(2048, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * true_std
    sigmas = torch.tensor([0.3, 1.0, 3.0])
    table = calibrate(wiener(assumed_std ** 2), data, sigmas, torch.Generator().manual_seed(1))
    expected = sigmas.double() * assumed_std / true_std
    assert torch.allclose(table.shifted, expected, rtol=0.01), (table.shifted, expected)


def test_table_shifts_in_log_sigma_and_keeps_zero():
    table = NoiseShiftTable(torch.tensor([1.0, 4.0], dtype=torch.float64),
                            torch.tensor([2.0, 4.0], dtype=torch.float64), (8, 8))
    shifted = table.shift(torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 10.0]))
    assert shifted.tolist() == pytest.approx([0.0, 1.0, 2.0, 2 * math.sqrt(2), 4.0, 10.0], rel=1e-6)
    identity = NoiseShiftTable.identity(torch.tensor([0.1, 1.0, 10.0]), (8, 8))
    sigmas = torch.tensor([0.05, 0.3, 7.0, 20.0])
    assert torch.allclose(identity.shift(sigmas), sigmas, rtol=1e-6)
    with pytest.raises(ValueError, match="ascending"):
        NoiseShiftTable(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 1.0]), (8, 8))


def test_shifted_model_sampling_tells_the_network_the_shifted_sigma_only():
    base = DiscreteModelSampling.from_beta_schedule()
    table = NoiseShiftTable(torch.tensor([0.01, 100.0], dtype=torch.float64),
                            torch.tensor([0.015, 150.0], dtype=torch.float64), (8, 8))
    shifted = shifted_model_sampling(base, table)
    sigma, x = torch.tensor([2.0]), torch.randn(1, 4, 8, 8)
    assert isinstance(shifted, DiscreteModelSampling)
    assert torch.equal(shifted.calculate_input(sigma, x), base.calculate_input(sigma * 1.5, x))
    assert torch.equal(shifted.timestep(sigma), base.timestep(sigma * 1.5))
    output = torch.randn_like(x)
    assert torch.equal(shifted.calculate_denoised(sigma, output, x), base.calculate_denoised(sigma * 1.5, output, x))
    # what the sampler reads stays the model's own
    assert torch.equal(shifted.sigmas, base.sigmas) and shifted.sigma_max == base.sigma_max
    assert torch.equal(shifted.noise_scaling(sigma, output, x), base.noise_scaling(sigma, output, x))
    # a second table replaces the first, it does not compound
    again = shifted_model_sampling(shifted, NoiseShiftTable.identity(torch.tensor([1.0]), (8, 8)))
    assert torch.equal(again.calculate_input(sigma, x), base.calculate_input(sigma, x))
    with pytest.raises(ValueError, match="LCM"):
        shifted_model_sampling(DiscreteModelSampling.from_beta_schedule("lcm"), table)


def test_identity_table_samples_exactly_as_the_plain_model_and_a_shift_changes_it(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (plain,) = KSampler().sample(model, 3, 4, 5.0, "euler", "karras", positive, negative, latent, 1.0)
    training = model_sampling_of(model).sigmas.double()
    (identity,) = AtelierNoiseShiftApply().apply(model, NoiseShiftTable.identity(training[::50], (8, 8)))
    (same,) = KSampler().sample(identity, 3, 4, 5.0, "euler", "karras", positive, negative, latent, 1.0)
    assert torch.equal(plain["samples"], same["samples"])
    louder = NoiseShiftTable(training[::50], training[::50] * 1.5, (8, 8))
    (shifted_model,) = AtelierNoiseShiftApply().apply(model, louder)
    (shifted,) = KSampler().sample(shifted_model, 3, 4, 5.0, "euler", "karras", positive, negative, latent, 1.0)
    assert not torch.allclose(plain["samples"], shifted["samples"], atol=1e-3)
    assert model.noise_shift is None  # the input model is unchanged


def test_calibrate_node_gives_a_table_on_training_sigmas_and_refuses_shifted_models(tiny_sd1_prompts):
    model, positive, _ = tiny_sd1_prompts
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    table, report = AtelierNoiseShiftCalibrate().calibrate(model, positive, latent, 4, 0)
    training = model_sampling_of(model).sigmas.double()
    assert table.sigmas.numel() == 4 and table.latent_size == (8, 8)
    for value in (*table.sigmas.tolist(), *table.shifted.tolist()):  # where a discrete model is evaluated
        assert torch.isclose(training, torch.tensor(value, dtype=torch.float64), rtol=1e-4).any()
    ratios = table.shifted / table.sigmas
    assert bool(((ratios >= 0.49) & (ratios <= 2.01)).all()) and "sigma" in report
    (shifted_model,) = AtelierNoiseShiftApply().apply(model, table)
    with pytest.raises(ValueError, match="NoiseShift-patched"):
        AtelierNoiseShiftCalibrate().calibrate(shifted_model, positive, latent, 4, 0)
    with pytest.raises(ValueError, match="does not follow NoiseShift"), denoiser_and_latent_space(shifted_model):
        pass
    with pytest.raises(ValueError, match="1 to 64 latents"):
        AtelierNoiseShiftCalibrate().calibrate(model, positive, {"samples": torch.zeros(4, 8, 8)}, 4, 0)


def test_comfyuis_own_model_sampling_is_shifted_as_a_subclass():
    # Inside ComfyUI, NoiseShift Apply puts this object on the MODEL (add_object_patch("model_sampling", ...)):
    # ComfyUI's apply_model then evaluates the network at σ̂ for every sampler, and its type checks still hold.
    source = os.environ.get("ATELIER_COMFYUI")
    if not source:
        pytest.skip("needs ATELIER_COMFYUI (ComfyUI v0.3.64's source)")
    loaded_before = set(sys.modules)
    sys.path.insert(0, source)
    try:
        import comfy.model_sampling as comfy_sampling

        class Discrete(comfy_sampling.ModelSamplingDiscrete, comfy_sampling.EPS):  # as ComfyUI builds SD1's
            pass

        check_comfy_shift(Discrete(), comfy_sampling.EPS)
    finally:
        sys.path.remove(source)
        for name in set(sys.modules) - loaded_before:  # other tests must not find a ComfyUI in this process
            if name == "comfy" or name.startswith("comfy."):
                del sys.modules[name]


def check_comfy_shift(base: torch.nn.Module, eps_class: type) -> None:
    table = NoiseShiftTable(torch.tensor([0.01, 100.0], dtype=torch.float64),
                            torch.tensor([0.02, 200.0], dtype=torch.float64), (8, 8))
    shifted = table.model_sampling(base)
    assert isinstance(shifted, eps_class) and isinstance(shifted, torch.nn.Module)
    sigma, x = torch.tensor([1.5]), torch.randn(1, 4, 8, 8)
    assert torch.equal(shifted.calculate_input(sigma, x), base.calculate_input(sigma * 2, x))
    assert torch.equal(shifted.timestep(sigma), base.timestep(sigma * 2))
    assert torch.equal(shifted.sigmas, base.sigmas) and float(shifted.sigma_max) == float(base.sigma_max)
    assert shifted.to(torch.float64).sigmas.dtype == torch.float64  # moves like the module it copies
    assert base.sigmas.dtype == torch.float32  # and the original stays where it was


def test_noiseshift_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "noiseshift.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "5.steps=3", "--set", "12.steps=3", "--set", "15.steps=3", "--set", "9.levels=3"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output: ")]
    assert len(lines) == 8  # four pictures with NoiseShift, four without
    assert all("noiseshift" in line for line in lines)


def test_save_and_load_nodes_round_trip_a_table_inside_the_models_folder(tmp_path):
    table = NoiseShiftTable(torch.tensor([0.1, 1.0], dtype=torch.float64), torch.tensor([0.08, 0.9],
                                                                                        dtype=torch.float64), (16, 24))
    save = type("Save", (AtelierNoiseShiftSave,), {"models_dir": str(tmp_path)})
    load = type("Load", (AtelierNoiseShiftLoad,), {"models_dir": str(tmp_path)})
    assert save().save(table, "sd15_256")["ui"]["text"] == ["noiseshift/sd15_256.safetensors"]
    assert load.INPUT_TYPES()["required"]["table_name"][0] == ["sd15_256.safetensors"]
    (loaded,) = load().load("sd15_256.safetensors")
    assert torch.equal(loaded.sigmas, table.sigmas) and torch.equal(loaded.shifted, table.shifted)
    assert loaded.latent_size == (16, 24)
    before = load.IS_CHANGED("sd15_256.safetensors")
    save().save(NoiseShiftTable.identity(torch.tensor([1.0]), (8, 8)), "sd15_256.safetensors")
    assert load.IS_CHANGED("sd15_256.safetensors") != before  # a rewritten file is read again
    with pytest.raises(PathOutsideFolderError):
        save().save(table, "../escaped")
    assert "got an empty name" in AtelierNoiseShiftSave.VALIDATE_INPUTS("  ")
    from safetensors.torch import save_file

    save_file({"sigmas": torch.ones(2)}, str(tmp_path / "noiseshift" / "other.safetensors"))
    with pytest.raises(ValueError, match="not an Atelier NoiseShift table"):
        load_table(tmp_path / "noiseshift" / "other.safetensors")
    (tmp_path / "noiseshift" / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_table(tmp_path / "noiseshift" / "garbage.safetensors")
