"""The progress hook: silent alone, routed to the executor's sink, and to ComfyUI's progress bar inside ComfyUI."""

import sys
import types

import pytest
from PIL import Image

from nodes.common import progress as hook


class Recorder:
    def __init__(self, stop_after=None):
        self.calls = []
        self.stop_after = stop_after

    def progress(self, step, total, preview):
        self.calls.append((step, total, preview))

    def interrupted(self):
        return self.stop_after is not None and len(self.calls) >= self.stop_after


def test_without_a_sink_calls_do_nothing():
    hook.progress(1, 2)
    hook.check_interrupt()


def test_sink_receives_steps_and_previews_and_is_removed_after_the_block():
    sink, preview = Recorder(), Image.new("RGB", (4, 4))
    with hook.use_sink(sink):
        hook.progress(1, 3)
        hook.progress(2, 3, preview)
    hook.progress(3, 3)
    assert sink.calls == [(1, 3, None), (2, 3, preview)]


def test_interrupt_raises_at_the_next_progress_call():
    sink = Recorder(stop_after=2)
    with hook.use_sink(sink), pytest.raises(hook.InterruptedByUser):
        for step in range(1, 11):
            hook.progress(step, 10)
    assert len(sink.calls) == 2
    with hook.use_sink(sink), pytest.raises(hook.InterruptedByUser):
        hook.check_interrupt()


@pytest.mark.parametrize("step, total", [(-1, 3), (4, 3), (0, 0)])
def test_out_of_range_steps_are_refused(step, total):
    with pytest.raises(ValueError, match=f"step={step}, total={total}"):
        hook.progress(step, total)


@pytest.fixture
def fake_comfyui(monkeypatch):
    """ComfyUI's comfy.utils.ProgressBar and interrupt check, recording what they receive."""
    updates, state = [], {"interrupted": False}

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total, preview))

    def throw_exception_if_processing_interrupted():
        if state["interrupted"]:
            raise RuntimeError("ComfyUI's InterruptProcessingException")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")
    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    comfy.utils, comfy.model_management = utils, management
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    yield updates, state


def test_inside_comfyui_calls_go_to_its_progress_bar(fake_comfyui):
    updates, state = fake_comfyui
    preview = Image.new("RGB", (4, 4))
    hook.progress(1, 4)
    hook.progress(2, 4, preview)
    assert updates == [(1, 4, None), (2, 4, ("JPEG", preview, hook.PREVIEW_MAX_SIZE))]
    state["interrupted"] = True
    with pytest.raises(RuntimeError, match="InterruptProcessingException"):
        hook.check_interrupt()
