"""What travels on the MODEL socket in the standalone app: a loaded checkpoint and the LoRAs to run on it.

A loaded checkpoint is shared by every node that loads the same file, so a node never changes it: LoRA nodes make
new refs, and the nodes that run the model enter :meth:`ModelRef.in_use`, which takes the model's lock and switches
it to the ref's LoRAs for the duration of the call. Inside ComfyUI the MODEL socket carries ComfyUI's own
``ModelPatcher`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch

from ..common.memory import MEMORY
from ..common.paths import confine
from .loading import LoadedModel, comfy_folder_paths, files_under, load_model
from .lora import LoraSpec, ready_loras, set_loras


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
    # the sampling view that replaces the one of the model's training schedule, for a UNet trained otherwise (a
    # rectified flow's, nodes/sampling/model_sampling.py), which the KSampler nodes' guider follows; None: the model's
    model_sampling_override: object | None = None
    # a step-aware patch (nodes/sampling/patches.py: Faster Diffusion, ...), which the KSampler nodes' guider runs;
    # it stays in this process (a recipe does not carry it: the nodes that spread work refuse a patched model)
    sampling_patch: object | None = None

    def with_lora(self, lora: LoraSpec) -> ModelRef:
        """This model with one more LoRA (the shared model is not touched until a node uses the ref)."""
        return dataclasses.replace(self, loras=(*self.loras, lora))

    def recipe(self) -> ModelRecipe:
        """How another process loads the same model with the same LoRAs (see :class:`ModelRecipe`)."""
        return ModelRecipe(self.model.source, self.model.schedule.prediction_type, str(self.model.dtype), self.loras,
                           self.noise_shift, self.model_sampling_override, self.model.unet_source)

    @contextlib.contextmanager
    def in_use(self, *parts: str, when_ready: bool = False) -> Iterator[LoadedModel]:
        """Holds the model's lock with this ref's LoRAs active (another thread cannot switch them mid-call), and
        ``parts`` (``"unet"``, ``"text"``, ``"vae"``; by default all) on the model's device, where the memory
        manager keeps them until the block ends.

        Every LoRA is waited for, unless ``when_ready``: then the ``when_ready`` ones still being read stay out,
        for a sampler that brings them in between steps (:meth:`pending_loras`, :meth:`bring_in_loras`).
        """
        model = self.model
        held = (MEMORY.use(model.resident, model.parts(parts) if parts else None) if model.resident is not None
                else contextlib.nullcontext())
        with model.lock, held:
            with MEMORY.resizing(model.resident):
                set_loras(model, ready_loras(model, self.loras) if when_ready else self.loras)
            yield model

    def pending_loras(self) -> tuple[LoraSpec, ...]:
        """This ref's LoRAs not running now (``when_ready`` ones whose files are still being read), inside
        :meth:`in_use`."""
        running = {spec.path for spec in self.model.active_loras}  # real paths, as set_loras keeps them
        return tuple(spec for spec in self.loras if os.path.realpath(spec.path) not in running)

    def bring_in_loras(self, pending: tuple[LoraSpec, ...], wait: bool = False) -> tuple[LoraSpec, ...]:
        """Inside :meth:`in_use`, between two sampling steps: run the ``pending`` LoRAs whose files have been
        read since (all of them with ``wait``, waiting for their reads); returns those still pending."""
        if wait or ready_loras(self.model, pending):
            with MEMORY.resizing(self.model.resident):
                set_loras(self.model, self.loras if wait else ready_loras(self.model, self.loras))
        return self.pending_loras()


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """A :class:`ModelRef` as another process rebuilds it: the file (at the same path there), what the UNet
    predicts and its dtype, the LoRAs, and a UNet file that replaced the checkpoint's; small and picklable, where the
    model itself is neither."""

    source: str
    prediction_type: str
    dtype: str  # "torch.float32", as str(torch.dtype) writes it
    loras: tuple[LoraSpec, ...] = ()
    noise_shift: object | None = None
    model_sampling_override: object | None = None
    unet_file: str | None = None

    def load(self) -> ModelRef:
        """The model from this process's cache (:func:`~nodes.models.loader.load_model`), loaded on first use."""
        dtype = getattr(torch, self.dtype.removeprefix("torch."))
        loaded = load_model(self.source, prediction_type=self.prediction_type, dtype=dtype, unet_file=self.unet_file)
        return ModelRef(loaded, self.loras, self.noise_shift, self.model_sampling_override)


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


class SavedFilesFolder(ModelsFolder):
    """Nodes that save files of one kind in a models subfolder and load them back (routers, NoiseShift tables):
    ``FOLDER`` in the models folder, ``.safetensors`` only; every name is confined to the folder."""

    FOLDER: ClassVar[str]
    PURPOSE: ClassVar[str]  # what the files are, for the error when no models folder is known
    EXTENSION: ClassVar[str] = ".safetensors"

    @classmethod
    def saved_folder(cls) -> str:
        return cls.models_subfolder(cls.FOLDER, cls.PURPOSE)

    @classmethod
    def saved_names(cls) -> list[str]:
        """The files a Load node lists."""
        return sorted(files_under(cls.saved_folder(), (cls.EXTENSION,)))

    @classmethod
    def saved_path(cls, name: str) -> str:
        return confine(cls.saved_folder(), name)

    @classmethod
    def saved_digest(cls, name: str) -> str:
        """The file's SHA-256: a Load node's IS_CHANGED, so that a rewritten file is read again."""
        with open(cls.saved_path(name), "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()


class SaveToFolder(SavedFilesFolder):
    """A Save node of a :class:`SavedFilesFolder` kind: an output node whose ``filename`` widget names the file in
    ``models/FOLDER``; the subclass's ``save`` hands :meth:`saved` the function that writes the file."""

    RETURN_TYPES: ClassVar[tuple] = ()
    RETURN_NAMES: ClassVar[tuple] = ()
    OUTPUT_TOOLTIPS: ClassVar[tuple] = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def VALIDATE_INPUTS(cls, filename: str | None) -> bool | str:
        if filename is not None and not filename.strip():
            return f"filename must name a file inside models/{cls.FOLDER}; got an empty name"
        return True

    def saved(self, filename: str, write: Callable[[str], None]) -> dict:
        """Write ``filename`` (the extension added when missing; the folder made) with ``write(path)``; the node's
        result, which shows ``FOLDER/name``."""
        name = filename.strip()
        path = self.saved_path(name if name.endswith(self.EXTENSION) else name + self.EXTENSION)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path)
        return {"ui": {"text": [f"{self.FOLDER}/{os.path.relpath(path, os.path.realpath(self.saved_folder()))}"]},
                "result": ()}
