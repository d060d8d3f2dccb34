"""What a loaded checkpoint is: :class:`LoadedModel`, and the records of the LoRAs that live on it.

The LoRA records are here, with the model that holds them, so that ``lora`` (which changes a model's LoRAs) and
``loader`` (which makes models) both import this module and never each other.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import torch

from ..common.denoiser import NoiseSchedule
from ..common.memory import Resident

MAX_LORA_STRENGTH = 100.0  # far beyond any useful strength; larger values are typing mistakes


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One LoRA to run: its file and how strongly it acts on the UNet and on the text encoder(s)."""

    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    # SwiftDiffusion's opt-in: sampling starts without it and it comes in at the first step boundary after its file
    # is read (nodes.models.lora.LoraReads); by default a run waits for every LoRA before its first step
    when_ready: bool = False

    def __post_init__(self) -> None:
        for name in ("strength_model", "strength_clip"):
            value = getattr(self, name)
            if not -MAX_LORA_STRENGTH <= value <= MAX_LORA_STRENGTH:
                raise ValueError(f"{name} must be in [-{MAX_LORA_STRENGTH}, {MAX_LORA_STRENGTH}]; got {value}")


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A LoRA resident on a model as a named adapter."""

    name: str  # the adapter name in diffusers/PEFT
    path: str  # real path of the file
    signature: tuple[int, int]  # (size, mtime_ns) when it was read
    components: tuple[str, ...]  # which of the model's components (unet, text_encoder, text_encoder_2) it adapts


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A checkpoint in memory: the diffusers pipeline that holds its parts, and what the techniques need to know.

    ``unet``, ``vae``, ``text_encoders``, ``tokenizers`` and ``scheduler_config`` read through to ``pipeline``.
    One object is shared by every node that loads the same file (see ``loader.load_model``); LoRAs live on it as
    named adapters (``nodes.models.lora``), never merged into its weights.
    """

    pipeline: Any = dataclasses.field(repr=False)  # the diffusers pipeline of ``model_configs.pipeline_class``
    family: str  # one of families.FAMILIES
    schedule: NoiseSchedule = dataclasses.field(repr=False)  # the training schedule and what the UNet predicts
    dtype: torch.dtype
    device: torch.device
    source: str  # the real path of the file or folder it came from
    # the real path of a UNet file that replaced the checkpoint's UNet (loader.load_model's unet_file), or None
    unet_source: str | None = None
    # LoRAs resident as adapters (by adapter name) and the ones running now; managed by nodes.models.lora.
    lora_adapters: dict[str, LoraAdapter] = dataclasses.field(default_factory=dict, repr=False)
    active_loras: tuple[LoraSpec, ...] = ()
    # Held while choosing LoRAs and running the model: the model is shared, and a LoRA switch in another thread
    # must not land in the middle of a sampling loop.
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)
    # its components as the memory manager keeps them; None inside ComfyUI
    resident: Resident | None = dataclasses.field(default=None, repr=False)

    @staticmethod
    def label_of(source: str, unet_source: str | None = None) -> str:
        """How logs and messages name a model: its file's name, and the UNet file's that replaced its UNet."""
        name = os.path.basename(source)
        return name if unet_source is None else f"{name} + {os.path.basename(unet_source)}"

    @property
    def label(self) -> str:
        """:meth:`label_of` this model."""
        return self.label_of(self.source, self.unet_source)

    def remove_all_loras(self) -> None:
        """Unload every LoRA: the adapter layers are taken out and the original modules put back, so the model's
        parameters and outputs are exactly the base model's again (``nodes.models.lora`` adds them)."""
        if self.lora_adapters:
            self.pipeline.unload_lora_weights()
        self.lora_adapters.clear()
        self.active_loras = ()

    def parts(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The pipeline components that ``names`` stand for: ``"unet"``, ``"vae"``, ``"text"`` (every text
        encoder of :attr:`text_encoders`), as :meth:`~nodes.models.refs.ModelRef.in_use` takes them."""
        text = tuple(name for name in ("text_encoder", "text_encoder_2")
                     if any(getattr(self.pipeline, name, None) is encoder for encoder in self.text_encoders))
        components = {"unet": ("unet",), "vae": ("vae",), "text": text}
        unknown = set(names) - set(components)
        if unknown:
            raise ValueError(f"model parts are {sorted(components)}; got {sorted(unknown)}")
        return tuple(part for name in names for part in components[name])

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def unet_in_channels(self) -> int:
        """4, or 9 for an inpainting UNet, which takes the noisy latent, then the mask (1 channel) and the masked
        image's latent (4), concatenated along channels."""
        return int(self.pipeline.unet.config.in_channels)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """SD1/SD2: ``(text_encoder,)``; SDXL: ``(text_encoder, text_encoder_2)``; the SDXL refiner:
        ``(text_encoder_2,)``, its OpenCLIP bigG encoder, which also gives the pooled embedding."""
        if self.family == "sdxl":
            return self.pipeline.text_encoder, self.pipeline.text_encoder_2
        if self.family == "sdxl_refiner":
            return (self.pipeline.text_encoder_2,)
        return (self.pipeline.text_encoder,)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """The CLIP tokenizer of each of :attr:`text_encoders`, in the same order."""
        if self.family == "sdxl":
            return self.pipeline.tokenizer, self.pipeline.tokenizer_2
        if self.family == "sdxl_refiner":
            return (self.pipeline.tokenizer_2,)
        return (self.pipeline.tokenizer,)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config (betas, timestep spacing, prediction type) to build diffusers schedulers from."""
        return dict(self.pipeline.scheduler.config)
