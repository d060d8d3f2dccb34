"""ComfyUI's MODEL, VAE and CLIP behind Atelier's protocols (``nodes/common/denoiser.py``), and the one place that
turns whatever arrives on those sockets into a :class:`Denoiser`, a :class:`LatentCodec` and a
:class:`Conditioning`.

A technique is written once, against the protocols (``interop.md`` §1, §3). Standalone, the sockets carry Atelier's
own objects (a :class:`ModelRef`, a :class:`DiffusersCodec`, a :class:`Clip`); inside ComfyUI they carry a
``ModelPatcher``, a ``comfy.sd.VAE`` and a ``comfy.sd.CLIP``, which the adapters here wrap. Nothing here imports
``comfy`` at import time: ComfyUI's classes come from :func:`comfy_module` when they are needed.

The denoiser adapter calls the model as ComfyUI's samplers do, ``apply_model(x, σ, ...)`` in the k-diffusion view
(x_VE = x_VP/√ᾱ, σ = √((1−ᾱ)/ᾱ)), so that the model's own ``model_sampling`` turns its ε, v or x0 output into x̂₀,
and the user's patches (LoRAs, the UNet wrapper, attention patches) act as they would in their KSampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..common.comfy_host import comfy_model_family, comfy_module, comfy_noise_schedule, has_sampling_patch
from ..common.denoiser import (Conditioning, Denoiser, DiffusersCodec, DiffusersDenoiser, LatentCodec,
                               LatentSpace, NoiseSchedule)
from ..common.unet_split import forwards_replaced
from ..sampling.model_sampling import DiscreteModelSampling
from .clip import CHUNK_TOKENS, Clip
from .lora import LoraSpec, prefetch_lora
from .refs import ModelRef
from .text import ENCODINGS, LONGALIGN_TOKENS, encode_prompt, join_segments, split_sentences

# The families whose ComfyUI model needs nothing but cross-attention states (and an inpainting model's concat):
# SDXL's adm vector ``y`` is not built here yet (#21).
ADAPTED_FAMILIES = ("sd1", "sd2")
# calc_cond_batch's marker for a conditional chunk (comfy/samplers.py: COND = 0); patches read it per chunk.
COND_CHUNK = 0

# What a node that samples with its own sampler says of a MODEL carrying a sampling patch, in either host.
SAMPLING_PATCH_REFUSAL = ("this node samples with its own sampler, which does not run a sampling patch (Faster "
                          "Diffusion, ...): use KSampler or SamplerCustom after the patch, or give this node the "
                          "model from before it")


def _check_adapted(patcher: Any) -> None:
    family = comfy_model_family(patcher)
    if family not in ADAPTED_FAMILIES:
        raise ValueError(f"ComfyUI's model is adapted for the families {ADAPTED_FAMILIES}; got {family!r}")


class ComfyDenoiser:
    """:class:`Denoiser` over ComfyUI's MODEL (a ``ModelPatcher``).

    Its predictions are x̂₀ (``schedule.prediction_type`` is "sample") whatever the network predicts: the model's
    ``apply_model`` returns x̂₀ through its own ``model_sampling``, and :meth:`NoiseSchedule.eps_from_prediction`
    recovers ε from it exactly. Inputs go to the model's device and the prediction comes back to the caller's.
    """

    def __init__(self, patcher: Any, differentiable: bool = False):
        """
        Args:
            differentiable: gradients flow through the network to its inputs where the caller enables them (prompt
                optimisation), on copies of its weights made once outside inference mode (ComfyUI loads weights
                inside ``torch.inference_mode``, which autograd cannot save); the copies double its memory.
        Raises:
            ValueError: a model that is not SD1 or SD2, or not on a discrete ε, v or x0 schedule.
        """
        _check_adapted(patcher)
        if has_sampling_patch(patcher):  # its wrappers run under ComfyUI's samplers only, never here
            raise ValueError(SAMPLING_PATCH_REFUSAL)
        self.patcher = patcher
        self.schedule = dataclasses.replace(comfy_noise_schedule(patcher), prediction_type="sample")
        self._copies = WeightCopies(patcher.model) if differentiable else None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if conditioning.pooled is not None:
            raise ValueError("conditioning with pooled embeddings and time ids (SDXL) cannot drive an "
                             f"{'/'.join(ADAPTED_FAMILIES)} model; got pooled {tuple(conditioning.pooled.shape)}")
        # Every call, not once: a VAE encode or another model may have evicted this one since.
        comfy_module("comfy.model_management").load_models_gpu([self.patcher])
        device = self.patcher.load_device
        alpha_bar = self.schedule.alpha_bar(t.expand(x_t.shape[0]) if t.ndim == 0 else t)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
        x_ve = x_t.double() / alpha_bar.sqrt().reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.device)
        conditioning = conditioning.repeat_to(x_t.shape[0]).to(device)
        options = self.patcher.model_options
        transformer_options = {**options.get("transformer_options", {}), "sigmas": sigma.float().to(device),
                               "cond_or_uncond": [COND_CHUNK]}
        arguments = {"c_crossattn": conditioning.embeds, "transformer_options": transformer_options}
        if conditioning.concat is not None:
            arguments["c_concat"] = conditioning.concat
        x_in, sigma_in = x_ve.float().to(device), sigma.float().to(device)

        def denoise() -> torch.Tensor:
            if "model_function_wrapper" in options:  # the user's UNet wrapper, called as calc_cond_batch calls it
                return options["model_function_wrapper"](self.patcher.model.apply_model, {
                    "input": x_in, "timestep": sigma_in, "c": arguments, "cond_or_uncond": [COND_CHUNK]})
            return self.patcher.model.apply_model(x_in, sigma_in, **arguments)

        if self._copies is not None and torch.is_grad_enabled():
            denoised = self._copies.run(denoise)
        else:
            with torch.no_grad():
                denoised = denoise()
        return denoised.to(x_t.device, x_t.dtype)


class _Holder(torch.nn.Module):
    """A module and a call that uses it, so that ``torch.func.functional_call`` can swap its weights for the call."""

    def __init__(self, module: torch.nn.Module, call: Callable[[], Any]):
        super().__init__()
        self.module, self._call = module, call

    def forward(self) -> Any:
        return self._call()


class WeightCopies:
    """Copies of a module's parameters, made outside inference mode at the first :meth:`run` (ComfyUI's
    inference-mode weights cannot be saved for backward; copies can)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._weights: dict[str, torch.Tensor] | None = None

    def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` with the module's parameters replaced by the copies for its duration."""
        if self._weights is None:
            with torch.inference_mode(False):
                self._weights = {f"module.{name}": parameter.detach().clone()
                                 for name, parameter in self.module.named_parameters()}
        return torch.func.functional_call(_Holder(self.module, call), self._weights, ())


# SD's VAE halves the image three times; ComfyUI's LatentFormat does not record it, and the adapted families share it.
SD_DOWNSCALE = 8


@dataclasses.dataclass(frozen=True)
class ComfyLatentSpace:
    """:class:`LatentSpace` of ComfyUI's MODEL, from its ``latent_format``: what a sampler needs without the VAE."""

    latent_channels: int
    downscale: int
    scaling_factor: float
    shift_factor: float

    @classmethod
    def of(cls, patcher: Any) -> "ComfyLatentSpace":
        """
        Raises:
            ValueError: a model that is not SD1 or SD2.
        """
        _check_adapted(patcher)
        latent_format = patcher.get_model_object("latent_format")
        return cls(int(latent_format.latent_channels), SD_DOWNSCALE, *_latent_scaling(latent_format))


def _latent_scaling(latent_format: Any) -> tuple[float, float]:
    """The scale and shift of ComfyUI's ``LatentFormat``: it has a shift only where its process_in subtracts one
    (SD3, Flux); SD's has none."""
    return float(latent_format.scale_factor), float(getattr(latent_format, "shift_factor", 0.0))


class ComfyCodec:
    """:class:`LatentCodec` over a ``comfy.sd.VAE``, with the latent scaling of the MODEL it goes with (ComfyUI keeps
    the scale in the model's ``latent_format``, not in the VAE)."""

    def __init__(self, vae: Any, latent_format: Any):
        """
        Raises:
            ValueError: a VAE whose downscale is not one integer factor (video and audio VAEs).
        """
        if isinstance(vae.downscale_ratio, bool) or not isinstance(vae.downscale_ratio, int):
            raise ValueError(f"the VAE must downscale images by one integer factor; got {vae.downscale_ratio!r}")
        self.vae = vae
        self.latent_channels = vae.latent_channels
        self.downscale = vae.downscale_ratio
        self.scaling_factor, self.shift_factor = _latent_scaling(latent_format)

    @property
    def device(self) -> torch.device:
        """ComfyUI's VAE's load device, where it computes."""
        return self.vae.device

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H/f, W/f) of images (B, 3, H, W) in 0..1, on the images' device (ComfyUI's VAE returns
        them on its intermediate device, the CPU); ComfyUI's VAE takes IMAGE's (B, H, W, 3)."""
        return _comfy_encode(self.vae, image)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in 0..1 of latents (B, C, h, w), on the latents' device; ComfyUI's VAE returns
        IMAGE's (B, H, W, 3)."""
        return _comfy_decode(self.vae, latent)


def _comfy_encode(vae: Any, image: torch.Tensor) -> torch.Tensor:
    return vae.encode(image.movedim(1, -1)).float().to(image.device)


def _comfy_decode(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    return vae.decode(latent).movedim(-1, 1).float().to(latent.device)


def vae_encoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images (B, 3, H, W) in 0..1 → the VAE posterior's means (B, C, H/f, W/f), unscaled, by what arrived on a VAE
    socket: Atelier's :class:`DiffusersCodec` or ComfyUI's ``comfy.sd.VAE`` (which needs no model to encode).

    Raises:
        TypeError: neither.
    """
    if isinstance(vae, DiffusersCodec):
        return vae.encode
    if _is_comfy(vae, "comfy.sd", "VAE"):
        return lambda image: _comfy_encode(vae, image)
    raise TypeError(f"vae must be Atelier's (standalone) or ComfyUI's VAE; got {type(vae).__name__}")


def vae_decoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents (B, C, h, w) → images (B, 3, H, W) in 0..1, by what arrived on a VAE socket: Atelier's
    :class:`DiffusersCodec` or ComfyUI's ``comfy.sd.VAE`` (which needs no model to decode).

    Raises:
        TypeError: neither.
    """
    if isinstance(vae, DiffusersCodec):
        return vae.decode
    if _is_comfy(vae, "comfy.sd", "VAE"):
        return lambda latent: _comfy_decode(vae, latent)
    raise TypeError(f"vae must be Atelier's (standalone) or ComfyUI's VAE; got {type(vae).__name__}")


def _comfy_class(module: str, name: str) -> type | None:
    """ComfyUI's class ``module.name`` inside ComfyUI; None standalone."""
    found = comfy_module(module)
    return None if found is None else getattr(found, name)


def _is_comfy(value: Any, module: str, name: str) -> bool:
    cls = _comfy_class(module, name)
    return cls is not None and isinstance(value, cls)


def _check_unpatched(model: ModelRef) -> None:
    # Inside ComfyUI a NoiseShift table lives in the MODEL's model_sampling and a sampling patch in its wrappers, and
    # every sampler follows them; standalone, only the KSampler nodes' guider does (nodes/sampling/guiders.py).
    if model.noise_shift is not None:
        raise ValueError("this node samples with its own sampler, which does not follow NoiseShift in the standalone "
                         "app: use KSampler or SamplerCustom after NoiseShift Apply, or give this node the model "
                         "from before it")
    if model.model_sampling_override is not None:
        raise ValueError("this node samples with its own sampler on the checkpoint's training schedule, and this "
                         "MODEL samples on another (a rectified flow's, or Rectified Diffusion's linear betas): use "
                         "SamplerCustom with the model's own nodes")
    if model.sampling_patch is not None:
        raise ValueError(SAMPLING_PATCH_REFUSAL)


def model_network(model: Any) -> torch.nn.Module:
    """The UNet of what arrived on a MODEL socket, to read its layout: diffusers' standalone (its modules keep their
    shapes while the memory manager holds the weights elsewhere), ComfyUI's ``diffusion_model`` inside ComfyUI.

    Raises:
        TypeError: neither host's MODEL.
    """
    if isinstance(model, ModelRef):
        return model.model.unet
    if _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        return model.get_model_object("diffusion_model")
    raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")


def denoiser_network(denoiser: Denoiser) -> torch.nn.Module:
    """The UNet behind a denoiser of :func:`denoiser_and_codec`: diffusers' standalone, ComfyUI's LDM
    ``diffusion_model`` (an object patch's where one replaces it; loaded by ComfyUI's model management at each
    call) inside ComfyUI."""
    if isinstance(denoiser, ComfyDenoiser):
        return denoiser.patcher.get_model_object("diffusion_model")
    return denoiser.unet


@contextlib.contextmanager
def denoiser_and_codec(model: Any, vae: Any, differentiable: bool = False) -> Iterator[tuple[Denoiser, LatentCodec]]:
    """The :class:`Denoiser` and :class:`LatentCodec` of what arrived on a MODEL and a VAE socket.

    Atelier's :class:`ModelRef` and :class:`DiffusersCodec` (standalone) hold the model's lock, with the ref's LoRAs,
    for the ``with`` block; ComfyUI's ``ModelPatcher`` and ``comfy.sd.VAE`` are wrapped in :class:`ComfyDenoiser`
    and :class:`ComfyCodec`, whose memory ComfyUI manages. ``differentiable``: gradients flow through the denoiser
    where the caller enables them (see :func:`differentiable_denoiser`).

    Raises:
        TypeError: the two are not both Atelier's or both ComfyUI's.
        ValueError: ComfyUI's model is of a family the adapter does not serve (see :class:`ComfyDenoiser`).
    """
    if isinstance(model, ModelRef) and isinstance(vae, DiffusersCodec):
        _check_unpatched(model)
        with model.in_use() as loaded:
            yield DiffusersDenoiser(loaded.unet, loaded.schedule, differentiable=differentiable), vae
    elif _is_comfy(model, "comfy.model_patcher", "ModelPatcher") and _is_comfy(vae, "comfy.sd", "VAE"):
        yield ComfyDenoiser(model, differentiable), ComfyCodec(vae, model.get_model_object("latent_format"))
    else:
        raise TypeError("model and vae must both be Atelier's (standalone: a loaded checkpoint and its codec) or "
                        f"both ComfyUI's (a ModelPatcher and a comfy.sd.VAE); got {type(model).__name__} and "
                        f"{type(vae).__name__}")


@contextlib.contextmanager
def denoiser_and_latent_space(model: Any) -> Iterator[tuple[Denoiser, LatentSpace]]:
    """The :class:`Denoiser` and :class:`LatentSpace` of what arrived on a MODEL socket, for a sampler that needs
    no VAE: Atelier's :class:`ModelRef` holds the model's lock with the ref's LoRAs for the ``with`` block (its
    own VAE's codec gives the latent space); ComfyUI's ``ModelPatcher`` gives :class:`ComfyDenoiser` and
    :class:`ComfyLatentSpace`.

    Raises:
        TypeError: neither.
        ValueError: ComfyUI's model is of a family the adapter does not serve (see :class:`ComfyDenoiser`).
    """
    if isinstance(model, ModelRef):
        _check_unpatched(model)
        with model.in_use() as loaded:
            yield DiffusersDenoiser(loaded.unet, loaded.schedule), DiffusersCodec(loaded.vae)
    elif _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        yield ComfyDenoiser(model), ComfyLatentSpace.of(model)
    else:
        raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")


def refuse_attention_patches(model: Any, node: str) -> None:
    """Refuse ComfyUI's attention patches on a MODEL for a ``node`` that rewrites the attention itself: they would
    take over the blocks it works in (Atelier's MODEL carries none)."""
    if isinstance(model, ModelRef):
        return
    options = model.model_options.get("transformer_options", {})
    patched = [name for name in options.get("patches", {}) if name.startswith(("attn1", "attn2"))]
    patched += [f"replace {name}" for name in options.get("patches_replace", {}) if name in ("attn1", "attn2")]
    if patched:
        raise ValueError(f"this MODEL carries attention patches ({', '.join(sorted(patched))}) that take over the "
                         f"attention {node} works in: give {node} the model without them")


def model_device(model: Any) -> torch.device:
    """Where a sampling run on what arrived on a MODEL socket keeps its latents: Atelier's model's device, or
    ComfyUI's MODEL's load device (where ComfyUI's KSampler samples)."""
    return model.model.device if isinstance(model, ModelRef) else model.load_device


def model_family(model: Any) -> str:
    """Atelier's family name (``"sd1"``, ``"sd2"``, ``"sdxl"``, ...) of what arrived on a MODEL socket: Atelier's
    :class:`ModelRef` knows its own; ComfyUI's ``ModelPatcher`` is read by :func:`comfy_model_family`.

    Raises:
        TypeError: neither.
        ValueError: ComfyUI's model is of a family Atelier does not know (SD3, Flux, ...).
    """
    if isinstance(model, ModelRef):
        return model.model.family
    if _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        return comfy_model_family(model)
    raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")


def noise_schedule(model: Any) -> NoiseSchedule:
    """The training noise schedule of what arrived on a MODEL socket: Atelier's :class:`ModelRef` knows its own;
    ComfyUI's ``ModelPatcher`` is read by :func:`comfy_noise_schedule`.

    Raises:
        TypeError: neither.
        ValueError: ComfyUI's model is not on a discrete timestep schedule.
    """
    if isinstance(model, ModelRef):
        override = model.model_sampling_override
        if override is None:
            return model.model.schedule
        if isinstance(override, DiscreteModelSampling):  # a discrete schedule other than the checkpoint's
            return override.noise_schedule()
        raise ValueError("this MODEL samples as a rectified flow, not on a training noise schedule: give this node "
                         "the model from before the rectified-flow node")
    if _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        return comfy_noise_schedule(model)
    raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")


def noise_shift_table(model: Any) -> Any:
    """The NoiseShift table what arrived on a MODEL socket carries, or None: Atelier's ref holds it, ComfyUI's
    MODEL in the ``model_sampling`` object patch NoiseShift Apply made."""
    if isinstance(model, ModelRef):
        return model.noise_shift
    return getattr(getattr(model, "object_patches", {}).get("model_sampling"), "noise_shift", None)


def model_with_lora(model: Any, path: str, strength: float, *, when_ready: bool = False) -> Any:
    """What arrived on a MODEL socket with LoRA file ``path`` on its diffusion model, in that host's way: Atelier's
    runs it beside the base weights (read ahead on a background thread; ``when_ready`` lets sampling start without
    it, SwiftDiffusion); ComfyUI's gets ComfyUI's own weight patches, as its LoraLoaderModelOnly gives.

    Raises:
        TypeError: neither host's MODEL.
    """
    if strength == 0:
        return model
    if isinstance(model, ModelRef):
        prefetch_lora(model.model, path)
        return model.with_lora(LoraSpec(path, strength, 0.0, when_ready=when_ready))
    if _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        tensors = comfy_module("comfy.utils").load_torch_file(path, safe_load=True)
        return comfy_module("comfy.sd").load_lora_for_models(model, None, tensors, strength, 0)[0]
    raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")


def text_conditioning(clip: Any, text: str) -> Conditioning:
    """The :class:`Conditioning` (batch 1) of ``text`` from what arrived on a CLIP socket: Atelier's :class:`Clip`
    encodes as Atelier's samplers do (:func:`encode_prompt`); ComfyUI's ``comfy.sd.CLIP`` through its tokenizer and
    ``encode_from_tokens``, for an SD1 or SD2 model (the cross-attention states alone).

    Raises:
        TypeError: neither.
    """
    if isinstance(clip, Clip):
        with clip.ref.in_use() as loaded:
            return encode_prompt(loaded.tokenizers, loaded.text_encoders, loaded.family, text)
    if _is_comfy(clip, "comfy.sd", "CLIP"):
        return Conditioning(clip.encode_from_tokens(clip.tokenize(text)))
    raise TypeError(f"clip must be Atelier's CLIP (standalone) or ComfyUI's comfy.sd.CLIP; got {type(clip).__name__}")


def comfy_prompt_conditioning(clip: Any, text: str, encoding: str = "auto",
                              max_tokens: int = LONGALIGN_TOKENS) -> list:
    """ComfyUI's CONDITIONING of ``text`` from ComfyUI's CLIP, with LongAlign's segment-level encoding for prompts
    over 77 tokens (or always), as :func:`nodes.models.text.encode_long` does on Atelier's encoders.

    Every encoding goes through the user's ``clip.tokenize`` and ``encode_from_tokens``, so their CLIPSetLastLayer,
    LoRAs, embeddings and ``(word:1.2)`` weights apply. A prompt within 77 tokens under "auto" is encoded as
    ComfyUI's CLIPTextEncode does. Otherwise each sentence is encoded alone and keeps its start token and words,
    and :func:`join_segments` joins them. A sentence over 77 tokens keeps ComfyUI's first chunk, which ComfyUI may
    end before the 77th token so as not to split a word (Atelier's tokenizer cuts at 77 exactly). SDXL's pooled
    output is the first sentence's, as in ``encode_long``.

    Returns:
        ``[[states (1, L, D), {"pooled_output": pooled}]]``.
    Raises:
        TypeError: ``clip`` is not ComfyUI's.
        ValueError: an unknown ``encoding``.
    """
    _check_comfy_clip(clip)
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}; got {encoding!r}")

    tokens = _word_tokens(clip, text)
    if encoding == "auto" and max(_word_count(chunks) for chunks in tokens.values()) + 2 <= CHUNK_TOKENS:
        states, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return [[states, {"pooled_output": pooled}]]
    kept, pooled = [], None
    for segment in split_sentences(text):
        first_chunk = {name: chunks[:1] for name, chunks in _word_tokens(clip, segment).items()}
        length = 1 + max(_word_count(chunks) for chunks in first_chunk.values())
        states, segment_pooled = clip.encode_from_tokens(first_chunk, return_pooled=True)
        kept.append(states[0, :length])
        pooled = segment_pooled if pooled is None else pooled
    empty_states, _ = clip.encode_from_tokens(_word_tokens(clip, ""), return_pooled=True)
    return [[join_segments(kept, empty_states[0], max_tokens), {"pooled_output": pooled}]]


def _word_tokens(clip: Any, prompt: str) -> dict[str, list]:
    """ComfyUI's tokens of ``prompt``: {tokenizer name: chunks of (token, weight, word id)}."""
    return clip.tokenize(prompt, return_word_ids=True)


def _word_count(chunks: list) -> int:
    """The prompt's own tokens in ComfyUI's chunks: ComfyUI gives start, end and padding tokens the word id 0."""
    return sum(1 for chunk in chunks for _, _, word in chunk if word > 0)


def _check_comfy_clip(clip: Any) -> None:
    if not _is_comfy(clip, "comfy.sd", "CLIP"):
        raise TypeError(f"clip must be ComfyUI's comfy.sd.CLIP here; got {type(clip).__name__}")


def comfy_pooled_text_embeddings(clip: Any, prompts: Sequence[str]) -> torch.Tensor:
    """One pooled embedding per prompt from ComfyUI's CLIP: ``clip.tokenize`` and ``encode_from_tokens(...,
    return_pooled=True)``, which for an SD1 checkpoint's CLIP is the last layer's state at the end token, unprojected,
    as Atelier's :func:`nodes.router.embeddings.pooled_text_embeddings` reads its own encoder. A prompt longer than
    one 77-token chunk pools its first chunk, as Atelier's cut at 77 tokens does.

    Returns:
        (N, D) float32 on the CPU.
    Raises:
        TypeError: ``clip`` is not ComfyUI's.
        ValueError: no prompts.
    """
    _check_comfy_clip(clip)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt; got none")
    pooled = [clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)[1] for prompt in prompts]
    return torch.cat(pooled).float().cpu()


def comfy_token_lengths(clip: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Each prompt's length in tokens by ComfyUI's tokenizer, start and end tokens included, as Atelier's
    :func:`nodes.router.embeddings.token_lengths` counts: ComfyUI marks the prompt's own tokens with a word id
    above 0, and its start, end and padding tokens with 0.

    Returns:
        (N,) float64.
    Raises:
        TypeError: ``clip`` is not ComfyUI's.
        ValueError: a CLIP with several tokenizers (SDXL's).
    """
    _check_comfy_clip(clip)

    def length(prompt: str) -> int:
        tokens = _word_tokens(clip, prompt)
        if len(tokens) != 1:
            raise ValueError(f"prompt lengths are counted for a CLIP with one tokenizer (SD1, SD2); got {list(tokens)}")
        (chunks,) = tokens.values()
        return _word_count(chunks) + 2  # and the start and end tokens

    return torch.tensor([float(length(prompt)) for prompt in prompts], dtype=torch.float64)


# --- prompts as embedding vectors (prompt optimisation) --------------------------------------------------------------

class AtelierPromptVectors:
    """A prompt of embedding vectors through Atelier's single-encoder CLIP (SD1, SD2): start token, the vectors,
    end token, padding to 77, as the tokenizer lays out a typed prompt; differentiable where gradients are on."""

    def __init__(self, clip: Clip):
        self.clip = clip
        self.table = clip.token_table()
        self.tokenizer = clip.ref.model.tokenizers[0]
        ((self.key, (empty,)),) = clip.tokenize("").items()
        self.start, self.end, self.pad = empty[0][0], self.tokenizer.eos_token_id, empty[-1][0]

    def ids(self, text: str) -> list[int]:
        """The ids of ``text``'s tokens, without start and end (weights ignored)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def row(self, vectors: torch.Tensor) -> list[tuple[Any, float]]:
        row = [(self.start, 1.0)] + [(vector, 1.0) for vector in vectors] + [(self.end, 1.0)]
        return row + [(self.pad, 1.0)] * (CHUNK_TOKENS - len(row))

    def encode(self, vectors: torch.Tensor) -> Conditioning:
        """The conditioning (1, 77, D) of a prompt whose tokens are ``vectors`` (L, D)."""
        embeds = self.clip.encode_from_tokens({self.key: [self.row(vectors)]},
                                              differentiable=torch.is_grad_enabled())
        return Conditioning(embeds.to(vectors.device))


class ComfyPromptVectors(AtelierPromptVectors):
    """:class:`AtelierPromptVectors` through ComfyUI's CLIP (SD1, SD2), on copies of its weights when gradients are
    on (see :class:`ComfyDenoiser`); ComfyUI's tokens take embedding tensors as they take textual inversions."""

    def __init__(self, clip: Any):
        tokenizer = getattr(clip.tokenizer, clip.tokenizer.clip)
        self.clip, self.key, self.tokenizer = clip, clip.tokenizer.clip_name, tokenizer.tokenizer
        self.start, self.end, self.pad = tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token
        clip.load_model()
        encoder = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
        self.table = encoder.transformer.get_input_embeddings().weight.detach().float().clone()
        self._copies = WeightCopies(clip.cond_stage_model)

    def encode(self, vectors: torch.Tensor) -> Conditioning:
        tokens = {self.key: [self.row(vectors)]}
        if not torch.is_grad_enabled():
            return Conditioning(self.clip.encode_from_tokens(tokens).to(vectors.device))
        # ComfyUI's CLIP layers add their residuals in place, over a tensor their layer norm keeps for backward
        layers = [module for module in self.clip.cond_stage_model.modules() if type(module).__name__ == "CLIPLayer"]
        with forwards_replaced(layers, _residuals_out_of_place):
            embeds = self._copies.run(lambda: self.clip.encode_from_tokens(tokens))
        return Conditioning(embeds.to(vectors.device))


def _residuals_out_of_place(layer: torch.nn.Module) -> Callable:
    """ComfyUI's ``CLIPLayer`` forward with its two residual additions out of place (the same sums), so autograd can
    take it."""
    def run(x: torch.Tensor, mask: Any = None, optimized_attention: Any = None) -> torch.Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return run


def prompt_vectors(clip: Any) -> AtelierPromptVectors:
    """The prompt-as-vectors encoder of what arrived on a CLIP socket (Atelier's or ComfyUI's, SD1 or SD2).

    Raises:
        TypeError: neither host's CLIP.
        ValueError: a family with two text encoders (SDXL).
    """
    if isinstance(clip, Clip):
        return AtelierPromptVectors(clip)
    if _is_comfy(clip, "comfy.sd", "CLIP"):
        if not hasattr(clip.tokenizer, "clip"):
            raise ValueError(f"ComfyUI's {type(clip.tokenizer).__name__} has several text encoders; one (SD1, SD2) "
                             "is needed")
        return ComfyPromptVectors(clip)
    raise TypeError(f"clip must be Atelier's or ComfyUI's CLIP; got {type(clip).__name__}")


@contextlib.contextmanager
def differentiable_denoiser(model: Any) -> Iterator[Denoiser]:
    """A :class:`Denoiser` of what arrived on a MODEL socket through which gradients flow to the inputs: Atelier's
    holding the model's lock for the block, ComfyUI's on copies of its weights (see :class:`ComfyDenoiser`).

    Raises:
        TypeError: neither host's MODEL.
    """
    if isinstance(model, ModelRef):
        _check_unpatched(model)
        with model.in_use() as loaded:
            yield DiffusersDenoiser(loaded.unet, loaded.schedule, differentiable=True)
    elif _is_comfy(model, "comfy.model_patcher", "ModelPatcher"):
        yield ComfyDenoiser(model, differentiable=True)
    else:
        raise TypeError(f"model must be Atelier's (standalone) or ComfyUI's ModelPatcher; got {type(model).__name__}")
