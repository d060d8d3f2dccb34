"""Session-scoped fixtures for tiny models: each is built once per test run, under pytest's temporary folder.

Import the fixtures a test module uses: ``from fixtures_models import tiny_sd1  # noqa: F401``.
"""

from __future__ import annotations

import pytest

from tiny_models import TinyModel, build_tiny_pipeline, save_tiny_model, write_tiny_lora


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> TinyModel:
    """A tiny SD1-layout model as a diffusers folder, a configs-only folder and an original-layout single file."""
    return save_tiny_model("sd1", tmp_path_factory.mktemp("tiny_sd1"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> TinyModel:
    """A tiny SD2-layout model (OpenCLIP-style text encoder, linear projections), in the same three forms."""
    return save_tiny_model("sd2", tmp_path_factory.mktemp("tiny_sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> TinyModel:
    """A tiny SDXL-layout model (two text encoders, size conditioning), in the same three forms."""
    return save_tiny_model("sdxl", tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd1_loras(tmp_path_factory) -> tuple[str, str]:
    """Two different kohya-format LoRA files for the tiny SD1 layout."""
    folder = tmp_path_factory.mktemp("tiny_sd1_loras")
    pipeline = build_tiny_pipeline("sd1")
    paths = (str(folder / "a.safetensors"), str(folder / "b.safetensors"))
    for seed, path in enumerate(paths):
        write_tiny_lora(pipeline, path, style="kohya", seed=seed + 1)
    return paths


@pytest.fixture(scope="session")
def tiny_sdxl_lora(tmp_path_factory) -> str:
    """A diffusers/PEFT-format LoRA file for the tiny SDXL layout, covering both text encoders."""
    path = str(tmp_path_factory.mktemp("tiny_sdxl_lora") / "xl.safetensors")
    write_tiny_lora(build_tiny_pipeline("sdxl"), path, style="peft", seed=3)
    return path


@pytest.fixture
def tiny_sd1_prompts_no_loras(tiny_sd1_prompts):
    """``tiny_sd1_prompts`` with no LoRA resident on the shared model, before and after the test."""
    ref = tiny_sd1_prompts[0]
    ref.model.remove_all_loras()
    yield tiny_sd1_prompts
    ref.model.remove_all_loras()


@pytest.fixture(scope="session")
def tiny_sd1_prompts(tiny_sd1):
    """The tiny SD1 model loaded on the CPU as a MODEL, with 'a red circle' and the empty prompt encoded by its
    CLIP: (model, positive, negative)."""
    from nodes.models.clip import Clip
    from nodes.models.loading import load_model
    from nodes.models.refs import ModelRef

    ref = ModelRef(load_model(tiny_sd1.folder, device="cpu"))
    clip = Clip(ref)
    return ref, clip.encode("a red circle"), clip.encode("")
