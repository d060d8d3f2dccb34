"""Generation end to end on tiny models: ComfyUI's core nodes and Atelier's own sampler through the executor
(text-to-image, image-to-image, determinism, previews, interrupts), LongAlign prompts and the tiled VAE."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_models import tiny_sd1, tiny_sdxl  # noqa: F401  (session fixtures)
from nodes.common.denoiser import DiffusersCodec
from nodes.common.progress import InterruptedByUser, use_sink
from nodes.generation.nodes import AtelierSampler, AtelierTextEncode
from nodes.models.clip import Clip
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef
from nodes.sampling.guidance import to_conditioning
from web.executor import Executor
from web.folders import DataFolders
from web.nodes_latent import VAEDecode, VAEDecodeTiled
from web.registry import node_classes

LONG_PROMPT = " ".join(f"A small red circle number {i} sits on a striped blue background near a tree." for i in
                       range(1, 16))  # about 250 tokens


@pytest.fixture
def setup(tmp_path, tiny_sd1):  # noqa: F811
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    shutil.copytree(tiny_sd1.folder, models / "diffusers" / "tiny_sd1")
    folders = DataFolders.under(str(tmp_path / "data"))
    return folders, Executor(node_classes(folders, str(models)))


def text_to_image(seed=1, sampler="euler", scheduler="normal", steps=3, width=64, prompt="a red circle",
                  atelier_sampler=False):
    """An API prompt of ComfyUI's core nodes; ``atelier_sampler`` samples with Atelier's own sampler node instead."""
    sampling = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": 1.0}
    if atelier_sampler:
        sampler_node = {"class_type": "AtelierSampler", "inputs": {**sampling, "momentum": 0.0}}
    else:
        sampler_node = {"class_type": "KSampler", "inputs": sampling}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "diffusers/tiny_sd1"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 64, "batch_size": 1}},
        "5": sampler_node,
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "t2i"}},
    }


def run(executor, prompt, events=None):
    checked = executor.validate(prompt)
    assert checked.ok, (checked.error, checked.node_errors)
    listener = (lambda event, data: events.append((event, data))) if events is not None else None
    result = executor.execute(checked.prompt, "test", checked.outputs, listener)
    assert result.status == "success", result.messages[-1]
    return result


def saved_pixels(folders, result, node="7"):
    image = result.outputs[node]["images"][0]
    return np.asarray(Image.open(os.path.join(folders.output, image["subfolder"], image["filename"])))


def test_text_to_image_runs_through_the_executor_with_previews(setup):
    folders, executor = setup
    events = []
    result = run(executor, text_to_image(), events)
    assert saved_pixels(folders, result).shape == (64, 64, 3)
    previews = [data for event, data in events if event == "preview" and data["node"] == "5"]
    progress = [data["value"] for event, data in events if event == "progress" and data["node"] == "5"]
    assert progress == [1, 2, 3] and len(previews) == 3 and previews[0]["image"].size == (8, 8)


def test_same_seed_same_bits_other_seed_other_image(setup):
    folders, executor = setup
    first = saved_pixels(folders, run(executor, text_to_image(seed=5)))
    executor.free()  # run everything again, not from the cache
    again = saved_pixels(folders, run(executor, text_to_image(seed=5)))
    other = saved_pixels(folders, run(executor, text_to_image(seed=6)))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


@pytest.mark.parametrize("sampler, scheduler, steps, atelier", [
    ("euler_ancestral", "normal", 3, False), ("dpmpp_2m", "karras", 3, False),
    ("dpmpp_2m_sde", "exponential", 3, False),
    ("uni_pc", "simple", 3, False), ("ghvb", "normal", 3, True), ("hb_dpmpp_2m", "f_scheduler", 5, True)])
def test_samplers_run_end_to_end(setup, sampler, scheduler, steps, atelier):
    folders, executor = setup
    prompt = text_to_image(sampler=sampler, scheduler=scheduler, steps=steps, atelier_sampler=atelier)
    assert saved_pixels(folders, run(executor, prompt)).any()


def test_image_to_image(setup):
    folders, executor = setup
    Image.new("RGB", (64, 64), (200, 30, 30)).save(os.path.join(folders.input, "red.png"))
    prompt = text_to_image()
    prompt["8"] = {"class_type": "LoadImage", "inputs": {"image": "red.png"}}
    prompt["9"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
    prompt["5"]["inputs"].update(latent_image=["9", 0], denoise=0.5, steps=4)
    events = []
    run(executor, prompt, events)
    steps = [data["value"] for event, data in events if event == "progress" and data["node"] == "5"]
    assert steps == [1, 2, 3, 4]  # ComfyUI's rule: the last 4 steps of an 8-step schedule (steps / denoise)


def test_interrupt_stops_sampling_within_one_step(setup):
    folders, executor = setup

    def listener(event, data):
        if event == "progress" and data["node"] == "5" and data["value"] == 2:
            executor.interrupt()

    checked = executor.validate(text_to_image(steps=30))
    result = executor.execute(checked.prompt, "stop", checked.outputs, listener)
    assert result.status == "interrupted"
    stopped = dict(result.messages)["execution_interrupted"]
    assert stopped["node_id"] == "5"


def _long_align(clip: Clip, text: str, encoding: str):
    (conditioning,) = AtelierTextEncode().encode(clip, text, encoding)
    return to_conditioning(conditioning, clip.ref.model.family)


def test_a_200_token_prompt_encodes_to_longaligns_length(tiny_sd1):  # noqa: F811
    clip = Clip(ModelRef(load_model(tiny_sd1.folder)))
    long = _long_align(clip, LONG_PROMPT, "auto")
    short = _long_align(clip, "a red circle", "auto")
    empty = _long_align(clip, "", "longalign")  # the paper's negative for a long prompt
    width = clip.ref.model.text_encoders[0].config.hidden_size
    assert long.embeds.shape == empty.embeds.shape == (1, 240, width) and short.embeds.shape == (1, 77, width)
    pads = empty.embeds[0, 1:]  # the start token, then one pad embedding repeated
    assert torch.allclose(pads, pads[:1].expand_as(pads))


def test_sdxl_prompt_carries_pooled_text_and_size(tiny_sdxl):  # noqa: F811
    clip = Clip(ModelRef(load_model(tiny_sdxl.folder)))
    encoded = _long_align(clip, "a blue square", "auto")
    widths = [encoder.config.hidden_size for encoder in clip.ref.model.text_encoders]
    assert encoded.embeds.shape == (1, 77, sum(widths)) and encoded.pooled.shape[0] == 1
    assert encoded.time_ids.shape == (1, 6)


def test_tiled_decode_with_one_tile_equals_the_untiled_decode(tiny_sd1):  # noqa: F811
    vae = DiffusersCodec(load_model(tiny_sd1.folder).vae)
    samples = {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))}
    (whole,) = VAEDecode().decode(vae, samples)
    (one_tile,) = VAEDecodeTiled().decode(vae, samples, tile_size=128, overlap=32)
    (tiled,) = VAEDecodeTiled().decode(vae, samples, tile_size=64, overlap=16)
    assert torch.equal(one_tile, whole) and tiled.shape == whole.shape == (1, 64, 96, 3)
    assert 0 <= float(tiled.min()) and float(tiled.max()) <= 1


def test_interrupt_in_a_long_tiled_decode(tiny_sd1):  # noqa: F811
    vae = DiffusersCodec(load_model(tiny_sd1.folder).vae)

    class StopAtOnce:
        def progress(self, step, total, preview):
            pass

        def interrupted(self):
            return True

    with use_sink(StopAtOnce()), pytest.raises(InterruptedByUser):
        VAEDecodeTiled().decode(vae, {"samples": torch.zeros(1, 4, 32, 32)}, tile_size=128, overlap=32)


def test_text_to_image_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "text_to_image.json")
    # An empty models folder: the workflow's checkpoint is the embedded model that ships with the pack.
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "Sampler.steps=3"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output: ")]
    assert len(lines) == 4  # the workflow's batch
    assert all(Image.open(line.removeprefix("output: ")).size == (64, 64) for line in lines)


@pytest.mark.parametrize("node, inputs, message", [
    ("5", {"sampler_name": "euler_ancestral", "scheduler": "karras"}, "runs with schedulers ('normal',)"),
    ("5", {"scheduler": "f_scheduler", "sampler_name": "dpmpp_2m", "steps": 7}, "steps in (5, 6, 8)"),
    ("5", {"sampler_name": "hb_dpmpp_2m", "momentum": 1.5}, "must be in (0.0, 1.0]; got 1.5"),
    ("5", {"sampler_name": "euler", "momentum": 0.5}, "momentum applies to the samplers"),
])
def test_bad_settings_are_node_errors_before_anything_runs(setup, node, inputs, message):
    _, executor = setup
    prompt = text_to_image(atelier_sampler=True)
    prompt[node]["inputs"].update(inputs)
    result = executor.validate(prompt)
    assert not result.ok
    [error] = result.node_errors[node]["errors"]
    assert error["type"] == "custom_validation_failed" and message in error["details"]


def test_longalign_keeps_every_word_even_a_pad_character(tiny_sdxl):  # noqa: F811
    from nodes.models.text import encode_long, split_sentences

    model = load_model(tiny_sdxl.folder)
    prompt = "Wow! A fox. It jumps!"
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):  # the second pads with "!"
        states, _ = encode_long(tokenizer, encoder, prompt, -2, 40)
        # every segment keeps its start token and its words, "!" included; the pad embedding fills the rest
        kept = sum(len(tokenizer(segment)["input_ids"]) - 1 for segment in split_sentences(prompt))
        pads = states[0, kept:]
        assert torch.allclose(pads, pads[:1].expand_as(pads))
        assert not torch.allclose(states[0, kept - 1], pads[0])


def test_linked_settings_pass_validation_and_widget_limits_still_hold(setup):
    _, executor = setup
    prompt = text_to_image(atelier_sampler=True)
    result = executor.validate({**prompt, "5": {**prompt["5"], "inputs": {**prompt["5"]["inputs"], "steps": 20000}}})
    assert "steps must be in [1, 10000]; got 20000" in result.node_errors["5"]["errors"][0]["details"]
    assert AtelierSampler.VALIDATE_INPUTS(sampler_name="euler", scheduler="normal", steps=None, denoise=None,
                                          momentum=0.0) is True
