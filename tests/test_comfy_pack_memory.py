"""Atelier's tiled patch under ComfyUI's model management (issue 21): graph (a) costs no second resident copy of the
UNet, and ``/free`` releases the UNet with the patch as it does without.

Each graph runs in a fresh ComfyUI process of its own, so that the process's peak resident set (``VmHWM``) belongs
to that graph alone: (a) — CheckpointLoaderSimple → the tiled patch → KSampler → VAEDecode, 256×256, 2 steps — and
the same graph without the patch. After the prompt, ``/free`` (unload_models and free_memory) drops ComfyUI's
loaded models and its node-output cache; if anything of Atelier's (the patched clone, its UNet wrapper, a cache)
still held the model, the UNet's weights would stay resident and the patched process's RSS would not fall as far
as the unpatched one's. Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree.

Without ComfyUI, the stand-ins of ``test_comfy_adapters.py`` check the same in-process: once ComfyUI has unloaded
the model and the prompt's objects are dropped, a weak reference to the model dies, so no Atelier object (the
patch's wrapper, the denoiser and codec adapters, a module-level cache) keeps it alive.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import types
import weakref
from dataclasses import dataclass

import pytest
from safetensors import safe_open

from comfyui_host import ComfyUIServer
from nodes.highres.nodes import AtelierTiledDiffusion
from nodes.models.comfy_adapters import denoiser_and_codec
from test_comfy_adapters import VAE, ModelPatcher, _inputs, inside_comfy  # noqa: F401  (inside_comfy: a fixture)
from test_comfy_pack_tiled import SIZE_PX, ksampler, tiled_patch

TILE_PX = 128  # 16-latent tiles, as in (a)
PATCH_MODE = "mixture"
PEAK_RSS_RATIO_LIMIT = 1.10  # the bound: within 10 % of the unpatched graph
# ComfyUI runs the UNet in float32 here (FLOAT32_FLAGS), whatever the file stores.
UNET_BYTES_PER_WEIGHT = 4
UNET_PREFIX = "model.diffusion_model."
# /free is handled by ComfyUI's prompt worker between prompts, then garbage collected; RSS is sampled until it has
# not fallen for this long.
RSS_SETTLE_SECONDS = 3.0
RSS_SETTLE_TIMEOUT = 60.0
# What /free must give back with the patch, as a share of what it gives back without: the UNet is most of it.
FREED_SHARE_OF_UNPATCHED = 0.9


@dataclass(frozen=True)
class MemoryFigures:
    """One ComfyUI process's resident set, in bytes: its peak, after the prompt, and after /free."""

    peak: int
    after_prompt: int
    after_free: int

    @property
    def freed(self) -> int:
        return self.after_prompt - self.after_free


def process_memory(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmHWM``, ``VmRSS``) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(f"{field} not in /proc/{pid}/status")


def settled_rss(pid: int) -> int:
    """VmRSS once it has stopped falling for :data:`RSS_SETTLE_SECONDS` (or at :data:`RSS_SETTLE_TIMEOUT`)."""
    lowest = process_memory(pid, "VmRSS")
    lowest_since = started = time.monotonic()
    while time.monotonic() - lowest_since < RSS_SETTLE_SECONDS and time.monotonic() - started < RSS_SETTLE_TIMEOUT:
        time.sleep(0.25)
        rss = process_memory(pid, "VmRSS")
        if rss < lowest:
            lowest, lowest_since = rss, time.monotonic()
    return lowest


def graph_a(checkpoint: str, patched: bool) -> dict:
    """(a) with 16-latent tiles, or the same graph with KSampler on the loader's MODEL."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour town at noon", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE_PX, "height": SIZE_PX, "batch_size": 1}},
        "sample": ksampler(["patch", 0] if patched else ["4", 0]),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["4", 2]}},
        "image": {"class_type": "SaveImage", "inputs": {"filename_prefix": "memory", "images": ["decode", 0]}},
    }
    if patched:
        prompt["patch"] = tiled_patch(PATCH_MODE, TILE_PX)
    return prompt


def unet_bytes(checkpoint_path: str) -> int:
    """The UNet's size in ComfyUI's memory (float32), from the checkpoint's tensor shapes."""
    total = 0
    with safe_open(checkpoint_path, "np") as file:
        for key in file.keys():
            if key.startswith(UNET_PREFIX):
                count = 1
                for side in file.get_slice(key).get_shape():
                    count *= side
                total += count
    return total * UNET_BYTES_PER_WEIGHT


def measure(environment, models, base: str, patched: bool) -> MemoryFigures:
    with ComfyUIServer(environment, base, models.path) as server:
        images = server.run(graph_a(models.checkpoint, patched))
        assert images["image"][0].shape == (SIZE_PX, SIZE_PX, 3)
        pid = server.process.pid
        after_prompt = process_memory(pid, "VmRSS")
        peak = process_memory(pid, "VmHWM")
        server.free()
        return MemoryFigures(peak, after_prompt, settled_rss(pid))


@pytest.fixture(scope="module")
def memory(comfyui_environment, random_sd15_models, tmp_path_factory) -> dict[str, MemoryFigures]:
    """The figures of a fresh ComfyUI process per graph: "plain" (no patch) and "patched"."""
    figures = {name: measure(comfyui_environment, random_sd15_models, str(tmp_path_factory.mktemp(f"comfyui_{name}")),
                             patched=name == "patched")
               for name in ("plain", "patched")}
    megabytes = {name: {field: round(value / 2 ** 20) for field, value in vars(figure).items()}
                 for name, figure in figures.items()}
    print(f"\nresident set (MiB): {megabytes}; peak ratio patched/plain "
          f"{figures['patched'].peak / figures['plain'].peak:.3f}")
    return figures


def test_the_patch_keeps_peak_rss_within_10_percent_of_the_unpatched_graph(memory):
    """No second resident copy of the UNet: the patched clone shares the loader's weights."""
    assert memory["patched"].peak <= PEAK_RSS_RATIO_LIMIT * memory["plain"].peak


def test_free_releases_the_unet_with_the_patch_as_without(memory, random_sd15_models):
    """After /free nothing of Atelier's keeps the UNet alive: the patched process gives back the UNet's size (about
    as much as the unpatched one), and ends no larger than the unpatched one by a tenth of the UNet."""
    unet = unet_bytes(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint))
    print(f"UNet in float32: {unet / 2 ** 20:.0f} MiB")
    assert memory["plain"].freed >= unet  # the measurement itself sees the UNet go
    assert memory["patched"].freed >= FREED_SHARE_OF_UNPATCHED * memory["plain"].freed
    assert memory["patched"].after_free <= memory["plain"].after_free + unet / 10


class ClonablePatcher(ModelPatcher):
    """The stand-in MODEL with ModelPatcher's clone (sharing the model's weights) and its UNet-wrapper setter."""

    def clone(self) -> ClonablePatcher:
        clone = ClonablePatcher(model_options=dict(self.model_options))
        clone.model = self.model
        return clone

    def set_model_unet_function_wrapper(self, wrapper) -> None:
        self.model_options["model_function_wrapper"] = wrapper


def test_nothing_of_atelier_keeps_the_model_once_comfyui_has_unloaded_it(inside_comfy, monkeypatch):
    """The tiled patch's clone, sampled through the denoiser and codec adapters (8×8 latent, 4-latent tiles), then
    dropped as /free drops ComfyUI's output cache: the model goes with it."""
    # The tile loop asks ComfyUI whether the user interrupted (nodes/common/progress.py).
    monkeypatch.setitem(sys.modules, "comfy.utils", types.ModuleType("comfy.utils"))
    monkeypatch.setattr(sys.modules["comfy.model_management"], "throw_exception_if_processing_interrupted",
                        lambda: None, raising=False)
    loader_output = ClonablePatcher()
    model = weakref.ref(loader_output.model)
    (patched,) = AtelierTiledDiffusion().patch(loader_output, "mixture", 32, 8, 16, 2, 0)
    x_t, t, conditioning = _inputs()
    with denoiser_and_codec(patched, VAE()) as (denoiser, codec):
        codec.decode(denoiser(x_t, t, conditioning))
    assert inside_comfy == [[patched]] * len(inside_comfy)  # the adapter asked ComfyUI to load the patched clone
    inside_comfy.clear()  # ComfyUI's unload_all_models
    del loader_output, patched, denoiser, codec  # ComfyUI's output cache, reset by free_memory
    gc.collect()
    assert model() is None
