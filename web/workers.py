"""What runs a queued prompt: a worker. The queue (``web/prompt_queue.py``) gives each worker its own thread.

Without ``--ray`` the one worker is a :class:`LocalWorker`, an executor in the server's process. With ``--ray``
each worker is a Ray actor behind ``web/ray_workers.py``'s ``RayWorker``, which streams the same events back.
"""

from __future__ import annotations

import logging
from typing import Protocol

from nodes.correspondence.cache import FEATURE_CACHE
from nodes.models.loading import unload_all

from .executor import ExecutionResult, Executor, Listener

logger = logging.getLogger(__name__)

# The widgets that name a model file: a worker that ran a prompt with these holds those models afterwards, and the
# queue prefers it for the next prompt that names them (each worker keeps its own caches).
MODEL_INPUTS = ("ckpt_name", "vae_name", "lora_name", "linfusion_name", "encoder_name")


class WorkerLost(Exception):
    """The worker running a prompt is gone (its process, or the machine it ran on, died)."""


class Worker(Protocol):
    name: str  # for logs and error reports

    def execute(self, prompt: dict, prompt_id: str, outputs: list[str], listener: Listener,
                extra_data: dict) -> ExecutionResult:
        """Run a validated prompt, reporting its events to ``listener`` as they happen.

        Raises:
            WorkerLost: the worker died while it ran the prompt.
        """
        ...

    def interrupt(self) -> None:
        """Stop the running prompt at its next progress call or node boundary."""
        ...

    def release(self, unload_models: bool) -> None:
        """Drop cached results and feature maps, and with ``unload_models`` the loaded models."""
        ...


class LocalWorker:
    """A worker in this process: the executor the server validates with, on the queue's thread."""

    name = "local"

    def __init__(self, executor: Executor):
        self.executor = executor

    def execute(self, prompt: dict, prompt_id: str, outputs: list[str], listener: Listener,
                extra_data: dict) -> ExecutionResult:
        return self.executor.execute(prompt, prompt_id, outputs, listener, extra_data)

    def interrupt(self) -> None:
        self.executor.interrupt()

    def release(self, unload_models: bool) -> None:
        self.executor.free()
        FEATURE_CACHE.clear()  # extracted feature maps, up to 2 GiB, are cached results too
        logger.info("freed cached results and feature maps")
        if unload_models:
            logger.info("unloaded %d models", unload_all())


def model_files(prompt: dict) -> frozenset[str]:
    """The model files a prompt names (:data:`MODEL_INPUTS`).

    Example:
        >>> sorted(model_files({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        ...                     "3": {"class_type": "KSampler", "inputs": {"sampler_name": "euler"}}}))
        ['a.safetensors']
    """
    return frozenset(value for node in prompt.values() for name, value in node.get("inputs", {}).items()
                     if name in MODEL_INPUTS and isinstance(value, str))
