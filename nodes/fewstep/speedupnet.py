"""SpeedUpNet (Chai et al., ECCV 2024, "SpeedUpNet: A Plug-and-Play Adapter Network for Accelerating Text-to-Image
Diffusion Models"): an adapter on SD1.5's cross-attention that carries the negative prompt's effect, so that a few
steps without classifier-free guidance give a guided-looking picture.

Read from the official code (williechai/speedup-plugin-for-stable-diffusions, MIT: ``speed_up_net/
attention_processor.py``'s ``SUNAttnProcessor``, ``sun_pipe.py``, ``demo/``). The published adapter
(huggingface.co/Williechai/SpeedUpNet, ``sun_adapter_sdv15_4step_addpos.safetensors``) holds one processor per
cross-attention, keyed as IP-Adapter's are: ``"{i}.{name}"``, i the processor's index in diffusers'
``unet.attn_processors`` order (down blocks, up blocks, then the mid block; self-attentions take the even indices
and have no weights), loaded with a strict ``load_state_dict``. Each holds, H its hidden width and 768 the text
width:

- ``to_k_neg.weight``, ``to_v_neg.weight`` (H, 768), ``to_k_neg_alpha``, ``to_k_neg_beta`` (H,): the negative
  prompt's branch;
- ``to_k_extra_pos.weight``, ``to_v_extra_pos.weight`` (H, 768), ``to_k_extra_pos_alpha``, ``to_k_extra_pos_beta``
  (H,): an extra branch on the positive prompt (the published file's ``addpos``; the code fails without it).

In each cross-attention the context is the positive prompt's tokens followed by the negative prompt's 77; with the
query Q of the image tokens and softmax attention Attn (heads as the layer's):

    A   = Attn(Q, K(pos), V(pos))                          the layer's own attention
    A_n = Attn(Q, K_neg(neg), V_neg(neg))                 A_p = Attn(Q, K_pos(pos), V_pos(pos))
    out = to_out(A − (α_n ⊙ ‖A‖·A_n/‖A_n‖ + β_n) + (α_p ⊙ ‖A‖·A_p/‖A_p‖ + β_p))

Self-attention is untouched. The authors sample with diffusers' ``DPMSolverMultistepScheduler`` from SD1.5's
scheduler config on trailing timesteps, 4 steps, guidance 0 (no CFG), the prompt encoded as [positive, negative]
along the tokens (154 for one-chunk prompts). Here that is ComfyUI's "dpmpp_2m" (DPM-Solver++(2M), diffusers'
multistep solver with its first-order last step) on the trailing grid's sigmas, cfg 1.

Departure: ‖·‖ is taken per sample; the official code takes one norm over the whole batch, which is the same for
the one image its pipeline makes per call and couples the images of a batch otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from ..common.unet_split import UNetCall, forwards_replaced
from ..models.formats import layout_difference
from ..sampling.patches import StepSchedule

logger = logging.getLogger(__name__)

SUN_TOKENS = 77  # the negative prompt's tokens at the end of the context: one CLIP chunk
SUN_STEPS = 4
BRANCHES = ("neg", "extra_pos")
# Each UNet's blocks in the order diffusers registers them (its attn_processors order): ComfyUI's UNet registers
# its middle block before its output blocks, diffusers' mid block comes after the up blocks.
PROCESSOR_ORDER = {"down_blocks": 0, "input_blocks": 0, "up_blocks": 1, "output_blocks": 1, "mid_block": 2,
                   "middle_block": 2}


def branch_keys(index: int, branch: str) -> tuple[str, str, str, str]:
    """The file's keys of one branch of processor ``index``: K and V weights, α and β."""
    return (f"{index}.to_k_{branch}.weight", f"{index}.to_v_{branch}.weight", f"{index}.to_k_{branch}_alpha",
            f"{index}.to_k_{branch}_beta")


@dataclasses.dataclass(frozen=True)
class SunBranch:
    """One of a processor's two branches: K and V projections of the text (H, 768), α and β (H,)."""

    key: torch.Tensor
    value: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype) -> SunBranch:
        return SunBranch(*(tensor.to(device, dtype) for tensor in dataclasses.astuple(self)))

    def attend(self, query: torch.Tensor, text: torch.Tensor, heads: int, reference_norm: torch.Tensor
               ) -> torch.Tensor:
        """α ⊙ (‖A‖ / ‖A_b‖)·A_b + β for A_b this branch's attention of ``query`` over ``text``."""
        attended = multi_head_attention(query, F.linear(text, self.key), F.linear(text, self.value), heads)
        return self.alpha * (attended * (reference_norm / _sample_norm(attended))) + self.beta


def _sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    # kept above 0 (any tiny floor does): a branch whose attention is all zeros then adds β alone, where the official
    # code divides 0 by 0
    return tensor.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (tensor.ndim - 1)))


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention (B, N, H) of merged-head projections, split into ``heads`` heads (scale 1/√head width)."""
    batch, width = query.shape[0], query.shape[-1]
    split = [tensor.reshape(batch, -1, heads, width // heads).transpose(1, 2) for tensor in (query, key, value)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(batch, -1, width)


def attention_modules(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every attention layer (``attn1``, ``attn2``) of diffusers' or ComfyUI's UNet, by name, in diffusers'
    ``attn_processors`` order: the index of each is its processor's in an adapter file."""
    found = [(name, module) for name, module in network.named_modules() if name.rsplit(".", 1)[-1] in ("attn1",
                                                                                                       "attn2")]
    return sorted(found, key=lambda item: PROCESSOR_ORDER[item[0].split(".", 1)[0]])  # stable within each part


def speedupnet_layout(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a SpeedUpNet adapter for ``network`` (either host's UNet): each cross-attention's two
    branches at its processor index, H its attention width, the text width its ``to_k`` takes (768 on SD1.5)."""
    layout = {}
    for index, (name, module) in enumerate(attention_modules(network)):
        if name.endswith("attn2"):
            width, text = module.to_q.out_features, module.to_k.in_features
            for branch in BRANCHES:
                layout.update(zip(branch_keys(index, branch), ((width, text), (width, text), (width,), (width,))))
    return layout


def read_speedupnet(path: str, network: torch.nn.Module) -> dict[str, dict[str, SunBranch]]:
    """The adapter file's processors by the name of the cross-attention each belongs to in ``network``, its two
    branches by name ("neg", "extra_pos"), after checking the file's keys and shapes against
    :func:`speedupnet_layout` (from the header, before reading a tensor).

    Raises:
        ValueError: a file whose keys or shapes are not SpeedUpNet's for this UNet.
    """
    modules = attention_modules(network)
    expected = speedupnet_layout(network)
    with safe_open(path, framework="pt") as handle:
        found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    count, detail = layout_difference(expected, found)
    if count:
        raise ValueError(f"{os.path.basename(path)!r} is not a SpeedUpNet adapter for this UNet: expected SUN's "
                         f"16 cross-attention processors of an SD1.5-family UNet (sun_adapter_sdv15_4step_addpos"
                         f".safetensors), {len(expected)} tensors; {detail}")
    tensors = load_file(path)
    return {name: {branch: SunBranch(*(tensors[key].float() for key in branch_keys(index, branch)))
                   for branch in BRANCHES}
            for index, (name, _) in enumerate(modules) if name.endswith("attn2")}


def sun_cross_attention(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                        branches: dict[str, SunBranch]) -> torch.Tensor:
    """A cross-attention layer (diffusers' ``Attention`` or ComfyUI's ``CrossAttention``: ``to_q``, ``to_k``,
    ``to_v``, ``to_out``, ``heads``) with SUN's processor, for ``context`` = positive tokens then the negative's 77.

    Example:
        >>> from diffusers.models.attention_processor import Attention
        >>> layer = Attention(8, cross_attention_dim=768, heads=2, dim_head=4)
        >>> silent = SunBranch(torch.randn(8, 768), torch.randn(8, 768), torch.zeros(8), torch.zeros(8))  # α = β = 0
        >>> hidden, context = torch.randn(1, 5, 8), torch.randn(1, 154, 768)
        >>> out = sun_cross_attention(layer, hidden, context, {"neg": silent, "extra_pos": silent})
        >>> torch.allclose(out, layer(hidden, encoder_hidden_states=context[:, :77]), atol=1e-6)
        True
    """
    positive, negative = context[:, :-SUN_TOKENS], context[:, -SUN_TOKENS:]
    query = module.to_q(hidden)
    attended = multi_head_attention(query, module.to_k(positive), module.to_v(positive), module.heads)
    norm = _sample_norm(attended)
    combined = (attended - branches["neg"].attend(query, negative, module.heads, norm)
                + branches["extra_pos"].attend(query, positive, module.heads, norm))
    return module.to_out[1](module.to_out[0](combined))


class SpeedUpNetPatch:
    """SUN's processors in a UNet's cross-attention for the sampler's calls (a
    :class:`~nodes.sampling.patches.SamplingPatch`, in either host).

    A layer runs them when its context is at least two 77-token chunks, the last one read as the negative prompt (the
    node's positive output); a shorter context (a ControlNet's, or the node's input prompt wired by mistake) runs the
    layer as it is, and a sampler call in which no layer ran them is logged once.
    """

    def __init__(self, path: str, processors: dict[str, dict[str, SunBranch]]):
        self.path = path
        self._processors = processors
        # the adapter on the device and in the dtype the layers compute in (one placement kept: the last one used)
        self._placed: dict[tuple, dict[str, dict[str, SunBranch]]] = {}
        self._warned = False

    def denoised(self, apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 steps: StepSchedule) -> torch.Tensor:
        return apply(x)

    def unet(self, call: UNetCall, x: torch.Tensor, timesteps: torch.Tensor, steps: StepSchedule) -> torch.Tensor:
        matched = []
        with self.installed(call.network, matched):
            output = call.forward(x, timesteps)
        if not matched and not self._warned:
            self._warned = True
            logger.warning("SpeedUpNet (%s): a sampler call had no prompt with the negative's tokens appended, and "
                           "ran without the adapter; give SamplerCustom the node's positive output",
                           os.path.basename(self.path))
        return output

    @contextlib.contextmanager
    def installed(self, network: torch.nn.Module, matched: list | None = None) -> Iterator[None]:
        """SUN's processors in ``network``'s cross-attention layers for the block (their instances' forwards);
        ``matched`` gets an entry per layer call that ran them.

        Raises:
            ValueError: ``network`` lacks some of the layers the adapter was read for (another UNet, or one whose
                modules another patch renamed).
        """
        layers = {name: module for name, module in attention_modules(network) if name in self._processors}
        if len(layers) != len(self._processors):
            raise ValueError(f"SpeedUpNet was read for {len(self._processors)} cross-attention layers; this UNet has "
                             f"{len(layers)} of them under the same names")
        names = {module: name for name, module in layers.items()}
        matched = [] if matched is None else matched
        with forwards_replaced(list(layers.values()),
                               lambda module: self._forward(module, names[module], matched)):
            yield

    def _branches(self, name: str, hidden: torch.Tensor) -> dict[str, SunBranch]:
        """Layer ``name``'s branches on ``hidden``'s device and in its dtype (what the layer computes in, which
        inside ComfyUI may differ from where and how its weights are stored)."""
        placement = (hidden.device, hidden.dtype)
        if placement not in self._placed:
            self._placed = {placement: {layer: {branch: weights.to(*placement) for branch, weights in branches.items()}
                                        for layer, branches in self._processors.items()}}
        return self._placed[placement][name]

    def _forward(self, module: torch.nn.Module, name: str, matched: list) -> Callable:
        forward = module.forward

        def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            context = kwargs.get("encoder_hidden_states", kwargs.get("context", args[0] if args else None))
            if context is None or context.shape[1] < 2 * SUN_TOKENS or context.shape[1] % SUN_TOKENS:
                return forward(hidden, *args, **kwargs)
            matched.append(name)
            return sun_cross_attention(module, hidden, context.to(hidden), self._branches(name, hidden))

        return run


def with_negative_tokens(positive: list, negative: list) -> list:
    """CONDITIONING (either host's ``[[cond, options], …]``): each of ``positive``'s conds with the negative
    prompt's 77 tokens appended, as the authors' pipeline feeds the UNet.

    Raises:
        ValueError: a negative prompt of more than one chunk (SUN reads exactly its last 77 tokens).
    """
    if len(negative) != 1:
        raise ValueError(f"SpeedUpNet reads one negative prompt; this negative conditioning has {len(negative)} "
                         f"entries (combined or area conditioning)")
    cond = negative[0][0]
    if cond.shape[1] != SUN_TOKENS:
        raise ValueError(f"SpeedUpNet reads a negative prompt of one 77-token chunk; this one is {cond.shape[1]} "
                         f"tokens: shorten it to at most 75 tokens")
    return [[torch.cat([entry, cond.to(entry).expand(entry.shape[0], -1, -1)], dim=1), dict(options)]
            for entry, options in positive]
