"""The embedded model's dataset, scorer and training script, on smoke runs of a few steps (no real training)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nodes.embedded import dataset
from nodes.embedded.dataset import (COLOURS, POSITIONS, SHAPES, held_out_captions, is_held_out, make_batch,
                                    render, score_image)

SMOKE = dict(steps_vae=3, steps_unet=3, steps_decoder=3, steps_focus=3, batch_vae=2, batch_unet=2, batch_decoder=2,
             checkpoint_every=1, log_every=1)


def test_make_batch_same_seed_same_batch_and_shapes():
    images, captions, scenes = make_batch(np.random.default_rng(7), 3)
    again, captions_again, _ = make_batch(np.random.default_rng(7), 3)
    other = make_batch(np.random.default_rng(8), 3)[0]
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other)
    assert [scene.caption for scene in scenes] == captions


def test_make_batch_rejects_empty_batch():
    with pytest.raises(ValueError, match="got 0"):
        make_batch(np.random.default_rng(0), 0)


def test_captions_name_their_labels():
    _, captions, scenes = make_batch(np.random.default_rng(1), 200)
    for caption, scene in zip(captions, scenes):
        words = caption.replace(",", "").split()
        assert words[words.index(scene.shape) - 1] == scene.colour, caption
        assert (scene.size in words) or not any(size in words for size in dataset.SIZES), caption
        assert any(phrase in caption for phrase in dataset._POSITION_PHRASES[scene.position]), caption
        assert scene.background_colour != scene.colour


def test_held_out_captions_never_drawn_for_training():
    held = held_out_captions(200)
    assert len(held) == 200 and held == held_out_captions(200)
    assert all(is_held_out(s.shape, s.colour, s.position) for s in held)
    held_captions = {scene.caption for scene in held}
    _, captions, scenes = make_batch(np.random.default_rng(2), 3000)
    assert not held_captions & set(captions)
    assert not any(is_held_out(s.shape, s.colour, s.position) for s in scenes)
    # Every shape, colour and position still occurs in training, only not in the held-out combinations.
    assert {s.shape for s in scenes} == set(SHAPES) and {s.colour for s in scenes} == set(COLOURS)
    assert {s.position for s in scenes} == set(POSITIONS)


def test_score_image_oracle_is_near_perfect():
    held = held_out_captions(200)
    scores = [score_image(render(scene)) for scene in held]
    assert np.mean([score.colour == s.colour for score, s in zip(scores, held)]) >= 0.95
    assert np.mean([score.position == s.position for score, s in zip(scores, held)]) >= 0.95


def test_score_image_finds_no_shape_in_a_plain_image():
    assert score_image(torch.full((3, 64, 64), 0.3)).colour is None


def _config(out, **changes):
    from nodes.embedded.train import TrainConfig

    return dataclasses.replace(TrainConfig(out=os.fspath(out), **SMOKE), **changes)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    from nodes.embedded.train import train

    out = tmp_path_factory.mktemp("embedded_smoke")
    return out, train(_config(out))


def test_smoke_training_writes_a_loadable_model_that_generates(smoke_run):
    from bench.embedded_model import NodeGenerator
    from nodes.embedded.train import MAX_TOTAL_MB

    _, (folder, single_file, megabytes) = smoke_run
    assert os.path.isfile(single_file) and 0 < megabytes <= MAX_TOTAL_MB
    image = NodeGenerator(folder, steps=2, cfg=7.5)("a red circle", seed=0)
    assert image.shape == (3, 64, 64) and torch.isfinite(image).all()


def test_single_file_loads_with_the_folders_config(smoke_run):
    from nodes.models.loading import load_model

    _, (folder, single_file, _) = smoke_run
    from_folder, from_file = load_model(folder), load_model(single_file, config_dir=folder)
    for a, b in zip(from_folder.unet.state_dict().values(), from_file.unet.state_dict().values()):
        assert torch.equal(a, b)


class Interrupted(Exception):
    pass


def test_resume_continues_exactly(smoke_run, tmp_path, monkeypatch):
    from nodes.embedded import train as training

    out, _ = smoke_run
    update = training._Progress.update

    def interrupt_at_the_third_unet_step(progress, step, loss):
        if progress.stage == "unet" and step == 2:
            raise Interrupted  # after the checkpoint of step 2, before step 3's
        update(progress, step, loss)

    with monkeypatch.context() as patch:
        patch.setattr(training._Progress, "update", interrupt_at_the_third_unet_step)
        with pytest.raises(Interrupted):
            training.train(_config(tmp_path))
    training.train(_config(tmp_path, resume=True))
    straight, resumed = (safe_open(os.path.join(folder, training.CHECKPOINT_NAME), "pt")
                         for folder in (out, tmp_path))
    for header in (straight, resumed):
        assert {k: v for k, v in json.loads(header.metadata()["atelier"]).items()
                if k in ("stage", "step")} == {"stage": "focus", "step": 3}
    weights = [key for key in straight.keys() if key.startswith(("model.unet.", "model.text_encoder.",
                                                                 "model.vae.decoder."))]
    assert weights and set(weights) <= set(resumed.keys())
    for key in weights:
        assert torch.equal(straight.get_tensor(key), resumed.get_tensor(key)), key


def test_resume_without_checkpoint_is_refused(tmp_path):
    from nodes.embedded.train import train

    with pytest.raises(ValueError, match="needs a checkpoint"):
        train(_config(tmp_path, resume=True))


# --- the shipped model --------------------------------------------------------------------------------------------

def _dominant_colours(ckpt_name: str, models_dir: str, prompt: str, seed: int) -> list[str | None]:
    """Through ComfyUI's core nodes, as a workflow runs them: 32 64×64 images for ``prompt``, scored."""
    from web.nodes_conditioning import CLIPTextEncode
    from web.nodes_latent import EmptyLatentImage, VAEDecode
    from web.nodes_loaders import CheckpointLoaderSimple
    from web.nodes_sampling import KSampler

    loader = type("Loader", (CheckpointLoaderSimple,), {"models_dir": models_dir})()
    model, clip, vae = loader.load_checkpoint(ckpt_name)
    positive, negative = (CLIPTextEncode().encode(clip, text)[0] for text in (prompt, ""))
    latent = EmptyLatentImage().generate(64, 64, 32)[0]
    latent = KSampler().sample(model, seed, 20, 7.5, "euler", "normal", positive, negative, latent, 1.0)[0]
    images = VAEDecode().decode(vae, latent)[0]
    return [score_image(image.permute(2, 0, 1)).colour for image in images]


@pytest.mark.parametrize("prompt, colour", [("a red circle", "red"), ("a blue square", "blue")])
def test_shipped_model_draws_the_colour_it_is_asked_for(tmp_path, prompt, colour):
    from nodes.embedded.train import SHIPPED_NAME
    from nodes.models.loading import list_checkpoints

    models_dir = str(tmp_path / "models")  # empty: the checkpoint comes from the pack itself
    assert f"{SHIPPED_NAME}.safetensors" in list_checkpoints(models_dir)
    colours = _dominant_colours(f"{SHIPPED_NAME}.safetensors", models_dir, prompt, seed=0)
    # Most of them, out of 32 rather than 4: the shipped model draws "a blue square" blue about 3 times in 4
    # (purple otherwise), so one batch of 4 passes or fails by the seed's luck; a model that drew colours at
    # random would get 4 of 32.
    assert colours.count(colour) > len(colours) / 2, f"{prompt!r} gave {collections.Counter(colours)}"


def test_shipped_folder_and_single_file_hold_the_same_weights(tmp_path):
    from nodes.embedded.train import SHIPPED_NAME
    from nodes.models.loading import load_checkpoint

    models_dir = str(tmp_path / "models")
    folder = load_checkpoint(f"diffusers/{SHIPPED_NAME}", models_dir)
    single_file = load_checkpoint(f"{SHIPPED_NAME}.safetensors", models_dir)
    assert single_file.family == folder.family == "sd1"
    pairs = {"unet": (folder.unet, single_file.unet), "vae": (folder.vae, single_file.vae),
             "text_encoder": (folder.text_encoders[0], single_file.text_encoders[0])}
    for name, (one, other) in pairs.items():
        a, b = one.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    assert single_file.vae.config.scaling_factor == folder.vae.config.scaling_factor
