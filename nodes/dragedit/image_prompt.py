"""DiffEditor's image-prompt encoder (``techniques.md`` row 33): the picture's CLIP image features turned into 64
tokens that every cross-attention also attends to, on the middle sampling steps. Read from the official code
(MC-E/DragonDiffusion at f9b5bdf, Apache-2.0): ``Resampler``, ``PerceiverAttention`` and ``IPAttnProcessor`` in
``src/unet/attention_processor.py``, ``DragonPipeline.init_proj``/``get_image_embeds``/``load_adapter`` in
``src/models/dragondiff.py``; the published weights are ``model/ip_sd15_64.bin`` of
huggingface.co/Adapter/DragonDiffusion (197 MB; a pickle: convert it to ``.safetensors`` once, see the README) with the
image encoder of huggingface.co/h94/IP-Adapter (``models/image_encoder``: OpenCLIP ViT-H/14, ``model.safetensors``).

- The encoder: CLIP's vision tower, its penultimate hidden states (B, 257, 1280) of the picture resized to 256²
  then 224² (``CLIPImageProcessor``'s defaults, CLIP's mean and std); the unconditional tokens come from an image of
  zeros (after normalisation), as the code makes them.
- The Resampler (IP-Adapter-Plus's): 64 learned queries of width ``cross_attention_dim`` refined by 4 layers of
  Perceiver attention over [image features; queries] and a feed-forward, each with pre-LayerNorm and a residual; the
  attention scales queries and keys by d^-1/4 each.
- Every cross-attention gains ``to_k_ip``/``to_v_ip`` over the 64 tokens; its output before the output projection
  gains ``scale`` × that attention (0.1 for drags), on steps 10–19 of 50 only.

Departures: the resizes are on float images (bicubic, antialiased) rather than PIL's on 8-bit; the tokens are passed
beside the text rather than appended to it (the same attention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..common.memory import MEMORY, runs_on
from ..common.unet_split import forwards_replaced, transformer_blocks
from ..models.formats import check_safetensors, layout_difference, tensor_shapes

# Source: DragonPipeline.init_proj: depth 4, dim_head 64, heads 12, 64 queries, ff_mult 4, dim and output width the
# UNet's cross_attention_dim, input width the image encoder's hidden size.
RESAMPLER_DEPTH, RESAMPLER_HEADS, RESAMPLER_HEAD_DIM, IMAGE_TOKENS, FF_MULT = 4, 12, 64, 64, 4
# ip_sd15_64.bin: a Resampler of 29,955,072 and cross-attention keys and values of 19,169,280 parameters for SD1.5
# (196.5 MB in float32: the published file's 197 MB)
PUBLISHED_PARAMETERS = 49_124_352
SD15_CROSS_ATTENTION_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
DEFAULT_IP_SCALE = 0.1  # Source: demo.py, the drag tab's ip_scale
IP_FIRST_STEP, IP_LAST_STEP = 10, 19  # Source: IPAttnProcessor, 10 <= iter_cur < 20
# Source: CLIPImageProcessor's defaults (the code builds it bare) after get_image_embeds' PIL resize to 256²
PROMPT_RESIZE, CLIP_SIZE = 256, 224
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ENCODER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "configs",
                              "ip_adapter_image_encoder", "config.json")


class PerceiverAttention(torch.nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, inner * 2, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        query = self.to_q(latents)
        keys, values = self.to_kv(torch.cat([features, latents], dim=-2)).chunk(2, dim=-1)
        query, keys, values = (tensor.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                               for tensor in (query, keys, values))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weights = ((query * scale) @ (keys * scale).transpose(-2, -1)).float().softmax(-1).to(query.dtype)
        return self.to_out((weights @ values).transpose(1, 2).flatten(2))


class Resampler(torch.nn.Module):
    """IP-Adapter-Plus's Resampler: ``queries`` learned tokens of width ``dim`` attending to the image features."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(1, queries, dim) / dim ** 0.5)
        self.proj_in = torch.nn.Linear(embedding_dim, dim)
        self.proj_out = torch.nn.Linear(dim, output_dim)
        self.norm_out = torch.nn.LayerNorm(output_dim)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([
            PerceiverAttention(dim, dim_head, heads),
            torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim * ff_mult, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(features.shape[0], 1, 1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class _ImageKeysValues(torch.nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.to_k_ip = torch.nn.Linear(width, hidden, bias=False)
        self.to_v_ip = torch.nn.Linear(width, hidden, bias=False)


class ImagePromptAdapter(torch.nn.Module):
    """The published file's two parts: ``image_proj`` (the Resampler) and ``ip_adapter``, the UNet's attention
    processors in diffusers' order (down, up, mid blocks; self-attention at even indices, without weights; each
    cross-attention's ``to_k_ip``/``to_v_ip`` at the odd ones)."""

    def __init__(self, cross_attention_widths: tuple[int, ...], width: int, embedding_dim: int,
                 depth: int = RESAMPLER_DEPTH, heads: int = RESAMPLER_HEADS):
        super().__init__()
        self.image_proj = Resampler(width, depth, RESAMPLER_HEAD_DIM, heads, IMAGE_TOKENS, embedding_dim, width,
                                    FF_MULT)
        self.ip_adapter = torch.nn.ModuleList(
            module for hidden in cross_attention_widths for module in (torch.nn.Module(),
                                                                        _ImageKeysValues(hidden, width)))

    @property
    def keys_values(self) -> list[_ImageKeysValues]:
        return list(self.ip_adapter[1::2])


def adapter_layout(tensors: dict[str, torch.Tensor]) -> dict:
    """The :class:`ImagePromptAdapter` arguments a file's tensors describe (widths, depth, heads).

    Raises:
        ValueError: not an image-prompt adapter file (no Resampler or no cross-attention keys).
    """
    try:
        width = tensors["image_proj.latents"].shape[-1]
        embedding_dim = tensors["image_proj.proj_in.weight"].shape[1]
        heads = tensors["image_proj.layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM
    except KeyError as missing:
        raise ValueError(f"not DiffEditor's image-prompt adapter (ip_sd15_64): no {missing}") from None
    depth = len({match.group(1) for key in tensors if (match := re.match(r"image_proj\.layers\.(\d+)\.", key))})
    indices = sorted({int(match.group(1)) for key in tensors
                      if (match := re.match(r"ip_adapter\.(\d+)\.to_k_ip\.weight$", key))})
    if not indices:
        raise ValueError("not DiffEditor's image-prompt adapter (ip_sd15_64): no ip_adapter.*.to_k_ip weights")
    widths = tuple(tensors[f"ip_adapter.{index}.to_k_ip.weight"].shape[0] for index in indices)
    return dict(cross_attention_widths=widths, width=width, embedding_dim=embedding_dim, depth=depth, heads=heads)


def load_image_prompt_adapter(path: str) -> ImagePromptAdapter:
    """The converted ``ip_sd15_64.safetensors`` (keys ``image_proj.*`` and ``ip_adapter.*``), checked name by name
    and shape by shape against the layout its widths describe; float32, on the CPU.

    Raises:
        UnsafeModelFormatError: not ``.safetensors``.
        ValueError: another file, or a layout that differs.
    """
    check_safetensors(path)
    tensors = load_file(path)
    with torch.device("meta"):
        adapter = ImagePromptAdapter(**adapter_layout(tensors))
    count, detail = layout_difference(tensor_shapes(adapter.state_dict()), tensor_shapes(tensors))
    if count:
        raise ValueError(f"{os.path.basename(path)!r} is not in the layout of DiffEditor's image-prompt adapter "
                         f"({count} differences: {detail})")
    adapter.load_state_dict({key: value.float() for key, value in tensors.items()}, assign=True)
    return adapter.eval()


def load_image_encoder(path: str) -> torch.nn.Module:
    """CLIP's vision tower from a ``.safetensors`` file in transformers' layout (h94/IP-Adapter's
    ``models/image_encoder/model.safetensors``, which ComfyUI users keep in ``models/clip_vision``), with the
    ``config.json`` beside it if there is one, else the shipped ViT-H/14 one; float32, on the CPU.

    Raises:
        UnsafeModelFormatError: not ``.safetensors``.
        ValueError: a file whose tensors differ from the config's layout.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    check_safetensors(path)
    beside = os.path.join(os.path.dirname(path), "config.json")
    config = CLIPVisionConfig.from_json_file(beside if os.path.isfile(beside) else ENCODER_CONFIG)
    tensors = load_file(path)
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(config)
    expected = {key: shape for key, shape in tensor_shapes(encoder.state_dict()).items()
                if not key.endswith("position_ids")}  # a buffer some files carry and others not
    found = {key: shape for key, shape in tensor_shapes(tensors).items() if not key.endswith("position_ids")}
    count, detail = layout_difference(expected, found)
    if count:
        raise ValueError(f"{os.path.basename(path)!r} is not the image encoder of its config (hidden "
                         f"{config.hidden_size}, {config.num_hidden_layers} layers): {count} differences: {detail}")
    encoder.load_state_dict({key: value.float() for key, value in tensors.items() if key in expected}, strict=False,
                            assign=True)
    embeddings = encoder.vision_model.embeddings  # its position ids are a buffer outside the file
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).unsqueeze(0), persistent=False)
    return encoder.eval()


def clip_pixels(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in 0..1 as the code feeds CLIP: resized to 256², then 224², normalised with CLIP's mean and std.

    Example:
        >>> tuple(clip_pixels(torch.rand(1, 3, 100, 60)).shape)
        (1, 3, 224, 224)
    """
    resized = image.float()
    for size in (PROMPT_RESIZE, CLIP_SIZE):
        resized = F.interpolate(resized, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = (torch.tensor(values, device=image.device).reshape(1, 3, 1, 1) for values in (CLIP_MEAN, CLIP_STD))
    return (resized - mean) / std


@dataclasses.dataclass
class ImagePrompt:
    """The loaded encoder and adapter (the ``DIFFEDITOR_IMAGE_PROMPT`` socket)."""

    encoder: torch.nn.Module
    adapter: ImagePromptAdapter

    @torch.no_grad()
    def tokens(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The picture's (1, 3, H, W) 64 tokens and the unconditional ones (an image of zeros), (1, 64, width) each,
        on the CPU."""
        with MEMORY.use_module(self.encoder), MEMORY.use_module(self.adapter):
            pixels = clip_pixels(image.to(runs_on(self.encoder)))
            features = self.encoder(torch.cat([pixels, torch.zeros_like(pixels)]),
                                    output_hidden_states=True).hidden_states[-2]
            tokens = self.adapter.image_proj(features.to(runs_on(self.adapter))).float().cpu()
        conditional, unconditional = tokens.chunk(2)
        return conditional, unconditional


def cross_attentions(network: torch.nn.Module) -> list[torch.nn.Module]:
    """A UNet's cross-attentions (diffusers' or ComfyUI's) in the published file's order: diffusers registers the
    down blocks, then the up blocks, then the middle block."""
    blocks = transformer_blocks(network)
    return [block.attn2 for wanted in (0, 2, 1) for part, block in blocks if part == wanted]


class ImagePromptAttention:
    """The cross-attentions' image-prompt branch, installed on a UNet for a sampling run: inside :meth:`attending`,
    each cross-attention of a [positive, negative] call adds ``scale`` × attention over the picture's tokens (the
    unconditional ones for the negative row), before its output projection (``IPAttnProcessor``)."""

    def __init__(self, adapter: ImagePromptAdapter, conditional: torch.Tensor, unconditional: torch.Tensor,
                 scale: float = DEFAULT_IP_SCALE):
        self.adapter, self.scale = adapter, scale
        self.pair_tokens = torch.cat([conditional, unconditional])
        self.tokens: torch.Tensor | None = None

    @contextlib.contextmanager
    def installed(self, network: torch.nn.Module) -> Iterator[None]:
        """The network's cross-attentions, in the published file's order (encoder, decoder, middle; checked against
        the adapter's widths), wrapped for the block."""
        ordered = cross_attentions(network)
        widths = tuple(module.to_k.out_features for module in ordered)
        pairs = self.adapter.keys_values
        adapter_widths = tuple(pair.to_k_ip.out_features for pair in pairs)
        text_width = ordered[0].to_k.in_features if ordered else 0
        if widths != adapter_widths or text_width != pairs[0].to_k_ip.in_features:
            raise ValueError(f"the image-prompt adapter is for a UNet with cross-attentions {adapter_widths} over "
                             f"{pairs[0].to_k_ip.in_features}-wide text; this one has {widths} over {text_width}")
        branches = dict(zip(ordered, pairs))
        with forwards_replaced(ordered, lambda module: self._attention(module, branches[module])):
            yield

    @contextlib.contextmanager
    def attending(self) -> Iterator[None]:
        """The branch on for the calls in the block."""
        self.tokens = self.pair_tokens
        try:
            yield
        finally:
            self.tokens = None

    def _attention(self, module: torch.nn.Module, pair: _ImageKeysValues):
        forward = module.forward

        def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = forward(hidden, *args, **kwargs)
            tokens = self.tokens
            if tokens is None or hidden.ndim != 3 or hidden.shape[0] != tokens.shape[0]:
                return out
            tokens = tokens.to(hidden)
            query, keys, values = (tensor.unflatten(-1, (module.heads, -1)).transpose(1, 2) for tensor in (
                module.to_q(hidden), F.linear(tokens, pair.to_k_ip.weight.to(hidden)),
                F.linear(tokens, pair.to_v_ip.weight.to(hidden))))
            extra = F.scaled_dot_product_attention(query, keys, values).transpose(1, 2).flatten(2)
            return out + self.scale * F.linear(extra, module.to_out[0].weight.to(extra))

        return run
