"""The progress hook: how a node reports progress, sends previews and text, and honours an interrupt.

Nodes call :func:`progress` inside their long loops. Whoever runs the node decides where the calls go:

- the standalone executor (``web/``) plugs in a :class:`ProgressSink` with :func:`use_sink`;
- inside ComfyUI, with no sink plugged in, the calls go to ComfyUI's own progress bar, preview sender and
  interrupt flag;
- anywhere else (a plain script, a unit test) they do nothing.

``nodes/`` never imports ``web/``: the sink is the only seam between them.

Example:
    >>> seen = []
    >>> class Recorder:
    ...     def progress(self, step, total, preview):
    ...         seen.append((step, total))
    ...     def interrupted(self):
    ...         return False
    >>> with use_sink(Recorder()):
    ...     for step in range(1, 3):
    ...         progress(step, 2)
    >>> seen
    [(1, 2), (2, 2)]
    >>> progress(1, 2)  # no sink: nothing happens
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

from PIL import Image

from .comfy_host import comfy_module

PREVIEW_MAX_SIZE = 512  # ComfyUI's default --preview-size; previews are for the eye, not for saving.


class InterruptedByUser(Exception):
    """Raised inside a node when the user asked to stop the running prompt."""


class ProgressSink(Protocol):
    """Receives a running node's progress; plugged in by the executor."""

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None: ...

    def text(self, message: str) -> None: ...

    def interrupted(self) -> bool: ...


# A context variable rather than a module global: each executor thread sees only its own sink.
_SINK: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("atelier_progress_sink", default=None)


@contextlib.contextmanager
def use_sink(sink: ProgressSink) -> Iterator[None]:
    """Route :func:`progress` and :func:`check_interrupt` calls to ``sink`` inside the ``with`` block."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def progress(step: int, total: int, preview: Image.Image | None = None) -> None:
    """Report that ``step`` of ``total`` steps is done, with an optional preview image.

    It also checks for an interrupt, so a loop that reports progress every step stops within one step.

    Args:
        step: steps done so far, 0 <= step <= total.
        total: number of steps, at least 1.
        preview: a small RGB image of the work in progress, or None.
    Raises:
        ValueError: ``step`` or ``total`` out of range.
        InterruptedByUser: the user asked to stop.
    """
    if total < 1 or not 0 <= step <= total:
        raise ValueError(f"progress needs 0 <= step <= total and total >= 1; got step={step}, total={total}")
    sink = _SINK.get()
    if sink is not None:
        if sink.interrupted():
            raise InterruptedByUser("interrupted by the user")
        sink.progress(step, total, preview)
        return
    comfy = _comfy_utils()
    if comfy is not None:
        comfy_utils, model_management = comfy
        model_management.throw_exception_if_processing_interrupted()
        bar = comfy_utils.ProgressBar(total)
        bar.update_absolute(step, total, None if preview is None else ("JPEG", preview, PREVIEW_MAX_SIZE))


def progress_text(message: str) -> None:
    """Show ``message`` on the running node in the standalone editor (what the node chose, what it waits for),
    as ComfyUI's progress text; with no sink (a script, a test, inside ComfyUI, whose memory decisions are its
    own) nothing happens."""
    sink = _SINK.get()
    if sink is not None:
        sink.text(message)


def check_interrupt() -> None:
    """Raise :class:`InterruptedByUser` if the user asked to stop; call it in loops that report no progress."""
    sink = _SINK.get()
    if sink is not None:
        if sink.interrupted():
            raise InterruptedByUser("interrupted by the user")
        return
    comfy = _comfy_utils()
    if comfy is not None:
        comfy[1].throw_exception_if_processing_interrupted()


def _comfy_utils():
    """ComfyUI's progress and interrupt modules when we run inside ComfyUI, else None."""
    utils = comfy_module("comfy.utils")
    return None if utils is None else (utils, comfy_module("comfy.model_management"))
