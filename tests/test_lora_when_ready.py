"""SwiftDiffusion's LoRA loading (techniques.md §4.14, issue 28): files read on a background thread while the
graph goes on, a LoRA marked "when ready" coming in at the first step boundary after its read, never inside a
step, and a bound on resident adapters. (Hot swap = fresh load and unload = base are in test_models_loading.py.)
"""

from __future__ import annotations

import threading

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_loras, tiny_sd1_prompts, tiny_sd1_prompts_no_loras  # noqa: F401
from nodes.models import lora
from nodes.models.lora import LoraReads, LoraSpec, read_lora_file
from nodes.sampling.guiders import Guider
from nodes.sampling.k_samplers import EVALUATIONS_PER_STEP, SAMPLER_NAMES, Sampler, run_sampler
from nodes.sampling.model_sampling import DiscreteModelSampling

STEPS = 6
SIGMAS = torch.cat([torch.linspace(14.0, 0.1, STEPS), torch.zeros(1)])


def _model_sampling() -> DiscreteModelSampling:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteModelSampling(torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_boundary_the_switch_uses_is_the_first_model_call_of_a_step(name):
    """Call k·n (n from EVALUATIONS_PER_STEP) is always directly followed by a step's callback: the step's first
    call. The samplers missing from the table really do vary (a LoRA then waits for its file)."""
    events = []

    def model(x, sigma, **extra):
        events.append("call")
        return x * 0.9

    run_sampler(Sampler.from_name(name), model, _model_sampling(), SIGMAS, torch.randn(1, 4, 8, 8),
                torch.zeros(1, 4, 8, 8), 0, callback=lambda step: events.append("step"))
    calls = [index for index, event in enumerate(events) if event == "call"]
    first_calls = [number for number, index in enumerate(calls) if index + 1 < len(events) and
                   events[index + 1] == "step"]
    every = EVALUATIONS_PER_STEP.get(name)
    if every is None:
        gaps = {later - earlier for earlier, later in zip(first_calls, first_calls[1:])}
        assert len(gaps) > 1 or first_calls[0] != 0, f"{name} calls the model as often every step"
        return
    switch_points = [call for call in range(1, len(calls)) if call % every == 0]
    assert set(switch_points) <= set(first_calls)
    assert len(switch_points) >= STEPS - 2  # all boundaries but those of degenerate last steps


@pytest.fixture
def gated_reads(monkeypatch):
    """LORA_READS whose reads finish only when the test opens the gate."""
    gate = threading.Event()

    def read(path: str):
        assert gate.wait(30), "the gate was never opened"
        return read_lora_file(path)

    reads = LoraReads(read)
    monkeypatch.setattr(lora, "LORA_READS", reads)
    return reads, gate


@pytest.fixture
def prompts(tiny_sd1_prompts_no_loras):
    return tiny_sd1_prompts_no_loras


def _record_unet_calls(unet: torch.nn.Module, model) -> tuple[list, object]:
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone(),
                      output.sample.clone(), model.active_loras))

    return calls, unet.register_forward_hook(hook, with_kwargs=True)


def _sample(ref, positive, negative, sampler_name: str, callback=None) -> torch.Tensor:
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return Guider(ref, {"positive": positive, "negative": negative}, 5.0).sample(
        noise, torch.zeros(1, 4, 8, 8), Sampler.from_name(sampler_name), SIGMAS, preview=False, callback=callback)


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_a_lora_read_during_step_j_runs_from_step_j_plus_one_and_base_before(prompts, tiny_sd1_loras, gated_reads,
                                                                               sampler_name):
    reads, gate = gated_reads
    ref, positive, negative = prompts
    spec = LoraSpec(tiny_sd1_loras[0], 1.0, 0.0, when_ready=True)
    with_lora = ref.with_lora(spec)
    ready_during = 2

    def open_gate_in_step(step: dict) -> None:
        if step["i"] == ready_during:
            gate.set()
            reads.start(spec.path).result()  # the read is done before this step's remaining calls

    calls, handle = _record_unet_calls(ref.model.unet, ref.model)
    try:
        _sample(with_lora, positive, negative, sampler_name, open_gate_in_step)
    finally:
        handle.remove()
    every = EVALUATIONS_PER_STEP[sampler_name]
    per_call = len(calls) // (STEPS * every - (every - 1))  # UNet calls per model call (the last step has one)
    switch = (ready_during + 1) * every * per_call  # the first UNet call of step ready_during + 1
    assert [bool(active) for *_, active in calls] == [False] * switch + [True] * (len(calls) - switch)
    for lora_on in (False, True):  # each call's ε is the base's or the LoRA's, exactly
        lora.set_loras(ref.model, [spec] if lora_on else [])
        for x, t, embeds, eps, active in calls:
            if bool(active) == lora_on:
                assert torch.equal(ref.model.unet(x, t, encoder_hidden_states=embeds).sample, eps)


def test_a_when_ready_lora_read_before_sampling_runs_from_the_first_step(prompts, tiny_sd1_loras,
                                                                         gated_reads):
    reads, gate = gated_reads
    ref, positive, negative = prompts
    spec = LoraSpec(tiny_sd1_loras[0], 1.0, 0.0, when_ready=True)
    gate.set()
    reads.start(spec.path).result()
    calls, handle = _record_unet_calls(ref.model.unet, ref.model)
    try:
        _sample(ref.with_lora(spec), positive, negative, "euler")
    finally:
        handle.remove()
    assert calls and all(active for *_, active in calls)


def test_by_default_a_run_waits_for_its_lora_and_equals_a_synchronous_load(prompts, tiny_sd1_loras,
                                                                           gated_reads):
    reads, gate = gated_reads
    ref, positive, negative = prompts
    waiting = ref.with_lora(LoraSpec(tiny_sd1_loras[1]))
    reads.start(tiny_sd1_loras[1])  # as Load LoRA does
    threading.Timer(0.3, gate.set).start()
    background = _sample(waiting, positive, negative, "euler")
    ref.model.remove_all_loras()
    synchronous = _sample(waiting, positive, negative, "euler")  # read on this thread (the gate is open)
    assert torch.equal(background, synchronous)
    assert not torch.equal(background, _sample(ref, positive, negative, "euler"))


def test_a_when_ready_lora_waits_under_a_sampler_without_fixed_boundaries(prompts, tiny_sd1_loras,
                                                                          gated_reads):
    reads, gate = gated_reads
    ref, positive, negative = prompts
    gate.set()
    exact = _sample(ref.with_lora(LoraSpec(tiny_sd1_loras[0])), positive, negative, "dpm_adaptive")
    ref.model.remove_all_loras()
    when_ready = _sample(ref.with_lora(LoraSpec(tiny_sd1_loras[0], when_ready=True)), positive, negative,
                         "dpm_adaptive")
    assert torch.equal(exact, when_ready)


def test_resident_adapters_are_bounded_least_recently_run_first(prompts, tiny_sd1_loras, monkeypatch):
    model = prompts[0].model
    monkeypatch.setattr(lora, "MAX_RESIDENT_LORAS", 1)
    a, b = (LoraSpec(path) for path in tiny_sd1_loras)
    lora.set_loras(model, [a])
    lora.set_loras(model, [b])
    assert [adapter.path for adapter in model.lora_adapters.values()] == [b.path]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    swapped = model.unet(x, t, encoder_hidden_states=embeds).sample
    model.remove_all_loras()
    lora.set_loras(model, [b])
    assert torch.equal(swapped, model.unet(x, t, encoder_hidden_states=embeds).sample)
    lora.set_loras(model, [a, b])  # both running: over the bound, but nothing running is unloaded
    assert len(model.lora_adapters) == 2


def test_reads_ahead_are_bounded_and_a_dropped_read_is_read_again(tiny_sd1_loras, tmp_path):
    started = []

    def read(path: str):
        started.append(path)
        return read_lora_file(path)

    reads = LoraReads(read, ahead=1)
    first = reads.start(tiny_sd1_loras[0])
    first.result()
    reads.start(tiny_sd1_loras[1]).result()  # the first read is dropped: one ahead at most
    assert not reads.ready(tiny_sd1_loras[0]) and reads.ready(tiny_sd1_loras[1])
    assert reads.take(tiny_sd1_loras[0]).keys() == read_lora_file(tiny_sd1_loras[0]).keys()
    assert started.count(str(tiny_sd1_loras[0])) == 2
    with pytest.raises(Exception, match="safetensors"):
        bad = tmp_path / "x.ckpt"
        bad.write_bytes(b"0")
        reads.start(bad)
        reads.take(bad)


def test_the_example_workflow_runs_headless_on_the_shipped_model_with_a_lora_for_it(tmp_path, capsys):
    import os

    from nodes.loaders.nodes import EMBEDDED_CHECKPOINT
    from nodes.models.loading import load_model
    from tiny_models import write_tiny_lora
    from web.cli import main

    (tmp_path / "models" / "loras").mkdir(parents=True)
    write_tiny_lora(load_model(EMBEDDED_CHECKPOINT).pipeline, tmp_path / "models" / "loras" / "style.safetensors")
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "lora_when_ready.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "5.steps=4", "--set", "10.steps=4"]) == 0
    saved = [os.path.basename(line.split("output: ")[-1]) for line in capsys.readouterr().out.splitlines()
             if "output: " in line]
    assert sum(file.startswith("lora_when_ready_") for file in saved) == 4
    assert sum(file.startswith("lora_waited_") for file in saved) == 4
