"""What travels on the MODEL socket in the standalone app: a loaded checkpoint and the LoRAs to run on it.

A loaded checkpoint is shared by every node that loads the same file, so a node never changes it: LoRA nodes make
new refs, and the nodes that run the model enter :meth:`ModelRef.in_use`, which takes the model's lock and switches
it to the ref's LoRAs for the duration of the call. Inside ComfyUI the MODEL socket carries ComfyUI's own
``ModelPatcher`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import ClassVar

import torch

from .loading import LoadedModel, comfy_folder_paths, load_model
from .lora import LoraSpec, set_loras


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A loaded model and the LoRAs to run on it.

    Example (the lock and the switch, for any node that runs the model)::

        with ref.in_use() as loaded:
            eps = loaded.unet(x, t, encoder_hidden_states=embeds).sample
    """

    model: LoadedModel
    loras: tuple[LoraSpec, ...] = ()
    # NoiseShift's table (nodes/noiseshift), which the KSampler nodes' model sampling follows; None: no shift
    noise_shift: object | None = None

    def with_lora(self, lora: LoraSpec) -> ModelRef:
        """This model with one more LoRA (the shared model is not touched until a node uses the ref)."""
        return dataclasses.replace(self, loras=(*self.loras, lora))

    def recipe(self) -> ModelRecipe:
        """How another process loads the same model with the same LoRAs (see :class:`ModelRecipe`)."""
        return ModelRecipe(self.model.source, self.model.schedule.prediction_type, str(self.model.dtype), self.loras,
                           self.noise_shift)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[LoadedModel]:
        """Holds the model's lock with this ref's LoRAs active: another thread cannot switch them mid-call."""
        with self.model.lock:
            set_loras(self.model, self.loras)
            yield self.model


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """A :class:`ModelRef` as another process rebuilds it: the file (at the same path there), what the UNet
    predicts and its dtype, and the LoRAs; small and picklable, where the model itself is neither."""

    source: str
    prediction_type: str
    dtype: str  # "torch.float32", as str(torch.dtype) writes it
    loras: tuple[LoraSpec, ...] = ()
    noise_shift: object | None = None

    def load(self) -> ModelRef:
        """The model from this process's cache (:func:`~nodes.models.loader.load_model`), loaded on first use."""
        dtype = getattr(torch, self.dtype.removeprefix("torch."))
        return ModelRef(load_model(self.source, prediction_type=self.prediction_type, dtype=dtype), self.loras,
                        self.noise_shift)


def models_subfolder(models_dir: str | None, name: str, purpose: str | None = None) -> str | None:
    """``models_dir/name`` in the standalone app, ComfyUI's ``models/name`` inside ComfyUI.

    Args:
        models_dir: the folder the standalone app bound, or None inside ComfyUI.
        name: the kind's folder ("linfusion", "routers", "watermark_keys", ...).
        purpose: what the folder is for, to name in the error when there is none; None returns None instead.
    Raises:
        ValueError: no models folder is known and ``purpose`` was given.
    """
    if models_dir is not None:
        return os.path.join(models_dir, name)
    folder_paths = comfy_folder_paths()
    if folder_paths is not None:
        return os.path.join(folder_paths.models_dir, name)
    if purpose is not None:
        raise ValueError(f"no models folder for {purpose}: pass --models-dir (standalone) or run inside ComfyUI")
    return None


class ModelsFolder:
    """Nodes that list model files; the standalone app binds ``models_dir``, inside ComfyUI it stays None."""

    models_dir: ClassVar[str | None] = None

    @classmethod
    def models_subfolder(cls, name: str, purpose: str | None = None) -> str | None:
        """This node's ``models/name`` folder (see :func:`models_subfolder`)."""
        return models_subfolder(cls.models_dir, name, purpose)
