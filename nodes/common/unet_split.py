"""A UNet call split into its encoder and its decoder, for both hosts' UNets (``techniques.md`` §3.1).

Faster Diffusion reuses the encoder's features across steps and feature inheritance reuses parts of the network:
both need the forward pass cut in two. The encoder is the input convolution, the down blocks and the mid block; it
gives the skip features and the mid block's output (:class:`UNetFeatures`). The decoder is the up blocks and the
output layers; it takes those features and the time embedding of the step it decodes, which need not be the step
the features were computed at.

A :class:`UNetCall` is one call of a UNet with its conditioning bound, so a technique sees only latents,
timesteps and features:

- :class:`DiffusersUNetCall` over diffusers' ``UNet2DConditionModel`` (the standalone app), with SDXL's added
  text/time embedding and ControlNet residuals, added to the skips and the mid output at encode time as diffusers
  adds them;
- :class:`ComfyUNetCall` over ComfyUI's ``UNetModel`` (``openaimodel.py``), with its ``y`` vector (SDXL, SD2
  unCLIP), ControlNet residuals (applied where ComfyUI applies them: inputs and mid at encode time, the skips'
  share at decode time) and the input, output and embedding patches of ``transformer_options``.

``decode(encode(x, t), t)`` is the full forward, bit for bit: the same modules in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from .comfy_host import comfy_module

# The transformer block class of diffusers and of ComfyUI (ldm/modules/attention.py): both name it so
TRANSFORMER_BLOCK_CLASSES = frozenset(("BasicTransformerBlock",))


# Where each host's UNet keeps its encoder, middle and decoder blocks, in the order they run
_UNET_PARTS = (("down_blocks", "input_blocks"), ("mid_block", "middle_block"), ("up_blocks", "output_blocks"))
DECODER = 2

@dataclasses.dataclass(frozen=True)
class UNetFeatures:
    """What the encoder hands the decoder: the skip features, shallowest first, and the mid block's output."""

    skips: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def repeat(self, times: int) -> UNetFeatures:
        """These features for ``times`` decoder inputs in one batch: the batch repeated whole, ``times`` times."""
        return UNetFeatures(tuple(skip.repeat(times, 1, 1, 1) for skip in self.skips), self.mid.repeat(times, 1, 1, 1))


class UNetCall(Protocol):
    """One UNet call with its conditioning bound (batch B): latents and timesteps in, the raw prediction out.

    ``batches_steps``: whether :meth:`decode` takes several steps' timesteps in one batch (not where ControlNet
    residuals of this step enter the decoder)."""

    batches_steps: bool
    dtype: torch.dtype  # the network's: inputs are cast to it
    network: torch.nn.Module  # the UNet itself (feature inheritance wraps its layers)

    def with_network(self, network: Any, dtype: torch.dtype) -> UNetCall:
        """The same call (conditioning, not ControlNet residuals) on another network of the same host and family
        (T-Stitch's small model), which computes in ``dtype``."""
        ...

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The full forward: x (B, C, h, w) at timesteps (B,) to the prediction (B, C_out, h, w)."""
        ...

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> UNetFeatures: ...

    def decode(self, features: UNetFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        """The prediction from ``features`` of batch n·B, with the time embedding of ``timesteps`` (n·B,): n copies
        of the call's conditioning are decoded in one batch (Faster Diffusion's parallel decoding)."""
        ...


def feature_level(tensor: torch.Tensor, latent_size: tuple[int, int]) -> int:
    """How many times a UNet feature map (B, C, h, w) or token sequence (B, h·w, C) was halved from the latent's
    size (H, W): 0 at full resolution.

    Example:
        >>> feature_level(torch.zeros(2, 320, 16, 16), (64, 64)), feature_level(torch.zeros(2, 64 * 64, 320), (64, 64))
        (2, 0)
    """
    pixels = tensor.shape[-2] * tensor.shape[-1] if tensor.ndim == 4 else tensor.shape[1]
    return round(math.log(latent_size[0] * latent_size[1] / pixels, 4))


def transformer_blocks(network: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """The network's transformer blocks (diffusers' or ComfyUI's ``BasicTransformerBlock``) in the order they run,
    each with its part: 0 the encoder, 1 the middle, 2 (``DECODER``) the decoder."""
    blocks = []
    for name, module in network.named_modules():
        if type(module).__name__ in TRANSFORMER_BLOCK_CLASSES:
            part = next((rank for rank, names in enumerate(_UNET_PARTS) if name.split(".")[0] in names), None)
            if part is None:
                raise ValueError(f"a transformer block outside a UNet's encoder, middle or decoder: {name}")
            blocks.append((part, module))
    return sorted(blocks, key=lambda block: block[0])  # stable: each part's blocks stay in their order


class _OutputsTaken(Exception):
    """Raised by the last hook of :func:`module_outputs`: the rest of the network is not needed."""


def module_outputs(modules: list[torch.nn.Module], call: Callable[[], Any]) -> list[torch.Tensor]:
    """The outputs of ``modules`` (the first tensor of a tuple, a diffusers output's ``sample``) during ``call()``, a
    forward of the network that holds them, in the order of ``modules``; the forward stops once all have given theirs.

    Raises:
        ValueError: the call ended without reaching them all.
    """
    taken: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, inputs, output):
            taken[index] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            if len(taken) == len(modules):
                raise _OutputsTaken
        return hook

    handles = [module.register_forward_hook(hook_for(index)) for index, module in enumerate(modules)]
    try:
        call()
    except _OutputsTaken:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(taken) != len(modules):
        raise ValueError(f"the network ran without reaching {len(modules) - len(taken)} of the layers asked for")
    return [taken[index] for index in range(len(modules))]


@contextlib.contextmanager
def forwards_replaced(modules: list[torch.nn.Module], replacement: Callable[[torch.nn.Module], Callable]
                      ) -> Iterator[None]:
    """Each module's forward replaced by ``replacement(module)`` for the block; what the instance had before (its
    class's forward, or another patch's) comes back afterwards, also on an error."""
    before = [vars(module).get("forward") for module in modules]
    for module in modules:
        module.forward = replacement(module)
    try:
        yield
    finally:
        for module, forward in zip(modules, before):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _repeat_batch(value: Any, times: int) -> Any:
    """A conditioning tensor (or None) for ``times`` copies of its batch, repeated whole."""
    if value is None or times == 1:
        return value
    return value.repeat(times, *([1] * (value.ndim - 1)))


class DiffusersUNetCall:
    """:class:`UNetCall` over a diffusers ``UNet2DConditionModel``.

    Supports what Atelier's checkpoints use: cross-attention states, SDXL's ``text_time`` added embedding
    (``added_cond_kwargs``) and ControlNet residuals. Class labels, T2I-Adapter residuals, attention masks and
    GLIGEN are refused at construction.
    """

    def __init__(self, unet: Any, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None,
                 down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                 mid_block_additional_residual: torch.Tensor | None = None):
        """
        Raises:
            ValueError: a UNet with class embeddings or an addition embedding other than SDXL's ``text_time``; one
                ControlNet residual without the other.
        """
        config = unet.config
        if unet.class_embedding is not None or config.addition_embed_type not in (None, "text_time"):
            raise ValueError("the UNet split serves UNets without class embeddings, with no added embedding or "
                             f"SDXL's text_time; got addition_embed_type {config.addition_embed_type!r}")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("ControlNet residuals come as both the down-block and the mid-block ones, or neither")
        self.unet = self.network = unet
        self.encoder_hidden_states = encoder_hidden_states
        self.added_cond_kwargs = added_cond_kwargs
        self.down_residuals = down_block_additional_residuals
        self.mid_residual = mid_block_additional_residual
        self.batches_steps = True  # ControlNet residuals enter at encode time
        self.dtype = unet.dtype

    def with_network(self, network: Any, dtype: torch.dtype) -> DiffusersUNetCall:
        added = self.added_cond_kwargs
        if added is not None:
            added = {name: value.to(dtype) for name, value in added.items()}
        return DiffusersUNetCall(network, self.encoder_hidden_states.to(dtype), added)

    def _repeated(self, times: int) -> tuple[torch.Tensor, dict | None]:
        added = self.added_cond_kwargs
        if added is not None:
            added = {name: _repeat_batch(value, times) for name, value in added.items()}
        return _repeat_batch(self.encoder_hidden_states, times), added

    def _embedding(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   added: dict | None) -> torch.Tensor:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        return emb if unet.time_embed_act is None else unet.time_embed_act(emb)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, timesteps), timesteps)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> UNetFeatures:
        unet = self.unet
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        states, added = self._repeated(1)
        emb = self._embedding(x, timesteps, states, added)
        states = unet.process_encoder_hidden_states(encoder_hidden_states=states, added_cond_kwargs=added)
        sample = unet.conv_in(x)
        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=states)
            else:
                sample, res_samples = block(hidden_states=sample, temb=emb)
            skips += res_samples
        if self.down_residuals is not None:
            skips = tuple(skip + residual for skip, residual in zip(skips, self.down_residuals, strict=True))
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=states)
            else:
                sample = unet.mid_block(sample, emb)
        if self.mid_residual is not None:
            sample = sample + self.mid_residual
        return UNetFeatures(skips, sample)

    def decode(self, features: UNetFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        sample = features.mid
        times = sample.shape[0] // self.encoder_hidden_states.shape[0]
        states, added = self._repeated(times)
        emb = self._embedding(sample, timesteps, states, added)
        states = unet.process_encoder_hidden_states(encoder_hidden_states=states, added_cond_kwargs=added)
        # diffusers forwards the skips' sizes to the upsamplers when the latent is not a multiple of the UNet's
        # total downscale (the upsampled map would otherwise be one pixel off)
        multiple = 2 ** unet.num_upsamplers
        forward_size = any(size % multiple for size in features.skips[0].shape[-2:])
        skips = features.skips
        for index, block in enumerate(unet.up_blocks):
            res_samples, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_size and index < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                               encoder_hidden_states=states, upsample_size=upsample_size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                               upsample_size=upsample_size)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


class ComfyUNetCall:
    """:class:`UNetCall` over ComfyUI's ``UNetModel``, with the arguments ComfyUI's ``apply_model`` passes it
    (``context``, ``y``, ``control``, ``transformer_options`` and extra conditioning keywords).

    The blocks run through ComfyUI's own ``forward_timestep_embed`` and ``apply_control``, so attention patches,
    ControlNets and block patches (FreeU's ``output_block_patch``) act as in ComfyUI's forward. Video UNets
    (SVD's time context) and codebook heads are refused.
    """

    def __init__(self, diffusion_model: Any, context: torch.Tensor | None, y: torch.Tensor | None, control: Any,
                 transformer_options: dict, dtype: torch.dtype | None = None, **kwargs: Any):
        """``dtype``: what the network computes in (ComfyUI's manual cast may differ from the weights'); default
        the network's own.

        Raises:
            ValueError: keywords this split does not pass on (video UNets), or a codebook head.
        """
        unexpected = {name for name, value in kwargs.items() if value is not None}
        if unexpected or diffusion_model.predict_codebook_ids:
            raise ValueError(f"the UNet split serves image UNets; got {sorted(unexpected) or 'a codebook head'}")
        self.model = self.network = diffusion_model
        self.context = context
        self.y = y
        self.control = control
        self.transformer_options = transformer_options
        self.batches_steps = control is None  # ComfyUI adds a ControlNet's skip residuals in the decoder
        self.dtype = diffusion_model.dtype if dtype is None else dtype
        self.extra = kwargs
        self._openaimodel = comfy_module("comfy.ldm.modules.diffusionmodules.openaimodel")
        self._util = comfy_module("comfy.ldm.modules.diffusionmodules.util")

    def with_network(self, network: Any, dtype: torch.dtype) -> ComfyUNetCall:
        def cast(value):
            return None if value is None else value.to(dtype)

        return ComfyUNetCall(network, cast(self.context), cast(self.y), None, self.transformer_options, dtype,
                             **self.extra)

    def _embedding(self, timesteps: torch.Tensor, dtype: torch.dtype, y: torch.Tensor | None) -> torch.Tensor:
        model = self.model
        emb = model.time_embed(self._util.timestep_embedding(timesteps, model.model_channels).to(dtype))
        for patch in self.transformer_options.get("patches", {}).get("emb_patch", []):
            emb = patch(emb, model.model_channels, self.transformer_options)
        return emb if model.num_classes is None else emb + model.label_emb(y)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, timesteps), timesteps)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> UNetFeatures:
        model, options = self.model, self.transformer_options
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        patches = options.get("patches", {})
        emb = self._embedding(timesteps, x.dtype, self.y)
        skips, h = [], x
        for index, block in enumerate(model.input_blocks):
            options["block"] = ("input", index)
            h = self._openaimodel.forward_timestep_embed(block, h, emb, self.context, options)
            h = self._openaimodel.apply_control(h, self.control, "input")
            for patch in patches.get("input_block_patch", []):
                h = patch(h, options)
            skips.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, options)
        options["block"] = ("middle", 0)
        if model.middle_block is not None:
            h = self._openaimodel.forward_timestep_embed(model.middle_block, h, emb, self.context, options)
        h = self._openaimodel.apply_control(h, self.control, "middle")
        return UNetFeatures(tuple(skips), h)

    def decode(self, features: UNetFeatures, timesteps: torch.Tensor) -> torch.Tensor:
        model, options = self.model, self.transformer_options
        h = features.mid
        times = h.shape[0] // (self.context.shape[0] if self.context is not None else h.shape[0])
        if times > 1 and self.control is not None:
            raise ValueError("decoding several steps in one batch is not possible under a ControlNet: its residuals "
                             "are computed one step at a time")
        context, y = _repeat_batch(self.context, times), _repeat_batch(self.y, times)
        emb = self._embedding(timesteps, h.dtype, y)
        patches = options.get("patches", {})
        skips = list(features.skips)
        for index, block in enumerate(model.output_blocks):
            options["block"] = ("output", index)
            skip = self._openaimodel.apply_control(skips.pop(), self.control, "output")
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, options)
            h = torch.cat([h, skip], dim=1)
            output_shape = skips[-1].shape if skips else None
            h = self._openaimodel.forward_timestep_embed(block, h, emb, context, options, output_shape)
        return model.out(h.type(features.mid.dtype))
