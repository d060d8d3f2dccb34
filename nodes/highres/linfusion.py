"""LinFusion: generalised linear attention in place of a UNet's self-attention, and its staged 16K recipe.

Notation (paper → code): φ(z) = ELU(z) + 1 → :func:`feature_map`; the non-linear pre-projections P_q, P_k →
``to_q_``, ``to_k_``; N tokens → ``tokens``. Per layer (highres.md §1.1)::

    q = W_q (x + P_q(x)),  k = W_k (x + P_k(x)),  v = W_v x
    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ / N) / (φ(q_i)ᵀ mean_j φ(k_j) + 1e-4)

Cost O(N·d²) and memory O(N·d) instead of softmax attention's O(N²).

Source: Liu et al. 2024, "LinFusion: 1 GPU, 1 Minute, 16K Image", arXiv 2409.02097; official code
Huage001/LinFusion (Apache-2.0) ``src/linfusion/attention.py`` (GeneralizedLinearAttention) and ``linfusion.py``
(LinFusion, get_default_config), snapshot 62ef289.

Published weights and their names. ``Yuanshi/LinFusion-1-5``, ``LinFusion-2-1`` and ``LinFusion-XL`` hold one
``diffusion_pytorch_model.safetensors`` whose keys are ``"{i}.{parameter}"``: ``i`` numbers the UNet's
self-attention layers in diffusers' ``named_modules()`` order (every ``Attention`` whose name contains
``attn1``), and ``parameter`` is one of ``to_q.weight``, ``to_k.weight``, ``to_v.weight``, ``to_out.0.weight``,
``to_out.0.bias``, and for the pre-projections ``to_q_.{0,1,3}.{weight,bias}`` / ``to_k_.{0,1,3}.{weight,bias}``
(Linear, LayerNorm, LeakyReLU without weights, Linear). Our UNets are diffusers modules, so index ``i`` maps to the
diffusers name directly; for SD1.5 (16 layers):

- 0, 1: ``down_blocks.0.attentions.{0,1}.transformer_blocks.0.attn1`` (LDM ``input_blocks.{1,2}.1.…``)
- 2, 3: ``down_blocks.1.attentions.{0,1}.…`` (``input_blocks.{4,5}.1.…``)
- 4, 5: ``down_blocks.2.attentions.{0,1}.…`` (``input_blocks.{7,8}.1.…``)
- 6-8: ``up_blocks.1.attentions.{0,1,2}.…`` (``output_blocks.{3,4,5}.1.…``)
- 9-11: ``up_blocks.2.attentions.{0,1,2}.…`` (``output_blocks.{6,7,8}.1.…``)
- 12-14: ``up_blocks.3.attentions.{0,1,2}.…`` (``output_blocks.{9,10,11}.1.…``)
- 15: ``mid_block.attentions.0.transformer_blocks.0.attn1`` (``middle_block.1.transformer_blocks.0.attn1``)

(diffusers lists ``up_blocks`` before ``mid_block`` because the UNet registers them in that order.) SD2.1 has the
same names; SDXL's 70 follow the same rule with ``transformer_blocks.0..9``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from ..common.memory import MEMORY, Resident
from ..models.formats import layout_difference, tensor_shapes

FAMILIES = ("sd1", "sd2", "sdxl")
# Source: LinFusion train script, --mid_dim_scale: 1 (m = d) for SD1.5/SD2.1, 16 (m = d/16) for SDXL.
MID_DIM_SCALE = {"sd1": 1, "sd2": 1, "sdxl": 16}
NORMALISER_EPS = 1e-4  # Source: official attention.py, "+ 1e-4" on the normaliser z
# Source: LinFusion notebooks: SD1.5 ultra_text2image_w_sdedit (0.4, 0.3, 0.2, 0.1); SDXL HighRes pipeline
# linspace(0.32, 0, num_scales + 1) (0.32, 0.24, 0.16, 0.08 for 16K). Both are linspace(first, 0, stages + 1).
FIRST_STRENGTH = {"sd1": 0.4, "sd2": 0.4, "sdxl": 0.32}
BASE_LONG_SIDE_PX = 1024  # Source: both notebooks start at 1024×512 (SDXL HighRes: long side 1024)
BASE_STEPS = 50  # Source: the notebooks' default 50-step schedule; a stage runs int(50 × strength) steps
RECIPES = ("sdedit", "highres")  # highres: SDXL HighRes, two UNet passes per upscaled step (highres.md §1.5)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(z) = ELU(z) + 1, positive everywhere. Example: ``feature_map(torch.zeros(1))`` is ``tensor([1.])``."""
    return F.elu(x) + 1.0


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """LinFusion's normalisation-aware, non-causal linear attention over all N tokens.

    Args:
        query, key: projected q and k (before φ), shape (B, heads, N, d_head).
        value: v, shape (B, heads, N, d_head_v).
    Returns:
        (B, heads, N, d_head_v).
    Example:
        >>> q, k, v = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.arange(6.).reshape(1, 1, 3, 2)
        >>> [round(x, 3) for x in linear_attention(q, k, v)[0, 0, 0].tolist()]  # equal scores: mean(v)
        [2.0, 3.0]

    Source: official ``GeneralizedLinearAttention.forward``: kv = (φ(K)ᵀ/√N)(V/√N), z = φ(Q)·mean φ(K) + 1e-4.
    """
    query, key = feature_map(query), feature_map(key)
    tokens = key.shape[-2]
    normaliser = query @ key.mean(dim=-2, keepdim=True).transpose(-2, -1) + NORMALISER_EPS
    summary = (key.transpose(-2, -1) * tokens ** -0.5) @ (value * tokens ** -0.5)
    return query @ summary / normaliser


def _pre_projection(dim: int, mid_dim: int) -> torch.nn.Sequential:
    """P(x) = Linear(d→m) → LayerNorm(m) → LeakyReLU → Linear(m→d); indices 0, 1, 3 carry the published weights."""
    return torch.nn.Sequential(torch.nn.Linear(dim, mid_dim), torch.nn.LayerNorm(mid_dim), torch.nn.LeakyReLU(),
                               torch.nn.Linear(mid_dim, dim))


class GeneralizedLinearAttention(Attention):
    """A diffusers ``Attention`` (same ``to_q``/``to_k``/``to_v``/``to_out`` names) computing LinFusion's linear
    attention, with the non-linear pre-projections ``to_q_`` and ``to_k_``. Self-attention only."""

    def __init__(self, dim: int, heads: int, mid_dim: int):
        super().__init__(query_dim=dim, out_dim=dim, heads=heads, dim_head=dim // heads)
        self.to_q_ = _pre_projection(dim, mid_dim)
        self.to_k_ = _pre_projection(dim, mid_dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LinFusion replaces self-attention only: it takes no encoder_hidden_states and no "
                             "attention_mask")
        batch, tokens, _ = hidden_states.shape
        query = self.to_q(hidden_states + self.to_q_(hidden_states))
        key = self.to_k(hidden_states + self.to_k_(hidden_states))
        value = self.to_v(hidden_states)
        split = lambda x: x.reshape(batch, tokens, self.heads, -1).transpose(1, 2)  # noqa: E731
        out = linear_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.to_out[1](self.to_out[0](out))


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One replaced layer: its diffusers module name, width d, heads, and the pre-projections' width m."""

    module_name: str
    dim: int
    heads: int
    mid_dim: int


def _layer_config(name: str, module: torch.nn.Module, family: str) -> LayerConfig:
    dim = module.to_q.weight.shape[0]
    return LayerConfig(name, dim, module.heads, dim // MID_DIM_SCALE[family])


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def linfusion_config(unet: torch.nn.Module, family: str) -> list[LayerConfig]:
    """The self-attention layers LinFusion replaces, in the order that numbers the published weights.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any device, ``meta`` included).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (sets m = d or d/16).
    Returns:
        One :class:`LayerConfig` per ``attn1``.
    Source: official ``LinFusion.get_default_config``.
    """
    _check_family(family)
    return [_layer_config(name, module, family) for name, module in unet.named_modules()
            if isinstance(module, Attention) and "attn1" in name]


# diffusers registers down_blocks, up_blocks, then mid_block; the published index follows that order, so the LDM
# blocks that hold the same layers sort the same way (within a block both layouts count alike).
LDM_BLOCK_ORDER = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}


def ldm_linfusion_config(diffusion_model: torch.nn.Module, family: str) -> list[LayerConfig]:
    """:func:`linfusion_config` for a UNet in the original LDM layout (ComfyUI's ``diffusion_model``): its
    ``input_blocks.N.1.transformer_blocks.M.attn1`` … named, in the published order (see the module docstring's
    table: ``down_blocks`` ↔ ``input_blocks``, ``up_blocks`` ↔ ``output_blocks``, ``mid_block`` ↔ ``middle_block``).
    """
    _check_family(family)
    layers = [(name, module) for name, module in diffusion_model.named_modules() if name.endswith(".attn1")]
    layers.sort(key=lambda item: LDM_BLOCK_ORDER[item[0].split(".")[0]])  # stable: keeps the order inside a block
    return [_layer_config(name, module, family) for name, module in layers]


def build_linfusion(config: list[LayerConfig]) -> torch.nn.ModuleList:
    """Freshly initialised LinFusion layers for ``config``; its ``state_dict`` keys are the published ones.

    Build it under ``torch.device("meta")`` to count parameters without allocating them.
    """
    return torch.nn.ModuleList(GeneralizedLinearAttention(layer.dim, layer.heads, layer.mid_dim) for layer in config)


def read_linfusion(path: str, config: list[LayerConfig], family: str) -> torch.nn.ModuleList:
    """A published LinFusion ``.safetensors`` as layers for ``config`` (float32, on the CPU).

    Args:
        path: a confined path to a ``.safetensors`` file (keys ``"{i}.{parameter}"``, see the module docstring).
        config: the layers it replaces, in the published order.
        family: the UNet's family, for the error message.
    Raises:
        ValueError: a key missing, unexpected or of the wrong shape: the file is not LinFusion for this UNet.
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LinFusion weights must be a .safetensors file; got {path!r}")
    layers = build_linfusion(config)
    state = load_file(str(path))
    count, detail = layout_difference(tensor_shapes(layers.state_dict()), tensor_shapes(state))
    if count:
        raise ValueError(f"{path} is not a LinFusion file for this {family} UNet ({len(config)} self-attention "
                         f"layers): {detail}")
    layers.load_state_dict(state)
    return layers.eval()


def load_linfusion(path: str, unet: torch.nn.Module, family: str) -> torch.nn.ModuleList:
    """:func:`read_linfusion` for a diffusers ``unet``, on its device and in its dtype; one copy per file and
    UNet layout, kept by the memory manager (a caller that runs the layers holds them with
    ``MEMORY.use_module(layers)``, which reads them back if they were evicted)."""
    config = linfusion_config(unet, family)
    parameter = next(unet.parameters())
    stat = os.stat(path)

    def load() -> tuple[torch.nn.ModuleList, Resident]:
        layers = read_linfusion(path, config, family).to(parameter.dtype)
        return layers, Resident(f"LinFusion {os.path.basename(path)}", {"layers": layers}, home=parameter.device,
                                reload=lambda: {"layers": read_linfusion(path, config, family).to(parameter.dtype)})

    key = ("linfusion", os.path.realpath(path), stat.st_size, stat.st_mtime_ns, family, tuple(config),
           parameter.device, parameter.dtype)
    return MEMORY.kept(key, load)


class LdmSelfAttention(torch.nn.Module):
    """A LinFusion layer called the way ComfyUI's ``BasicTransformerBlock`` calls ``attn1``:
    ``attn1(n, context=..., value=..., transformer_options=...)``, so it can replace that submodule.

    It computes in its own weights' dtype (ComfyUI may store the UNet in float16 and compute in float32).
    """

    def __init__(self, layer: GeneralizedLinearAttention):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
        # An attn1_patch hands n itself as context and value; anything else is cross-attention LinFusion lacks.
        if any(other is not None and other is not x for other in (context, value)) or mask is not None:
            raise ValueError("LinFusion replaces self-attention only: this attn1 was called with another context, "
                             "value or a mask (a patch that changes attn1's keys, or disable_self_attn)")
        return self.layer(x.to(self.layer.to_q.weight.dtype)).to(x.dtype)


@contextlib.contextmanager
def mounted(unet: torch.nn.Module, layers: torch.nn.ModuleList, config: list[LayerConfig]) -> Iterator[None]:
    """Inside the block, ``unet``'s self-attention layers are ``layers``; the originals come back after.

    Hold the model's lock around it: the UNet is shared by every node that loaded the same checkpoint.
    """
    if len(layers) != len(config):
        raise ValueError(f"{len(layers)} LinFusion layers for {len(config)} self-attention layers")
    originals = []
    try:
        for layer, module in zip(config, layers):
            parent_name, _, child = layer.module_name.rpartition(".")
            parent = functools.reduce(getattr, parent_name.split("."), unet)
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, module)
        yield
    finally:
        for parent, child, original in originals:
            setattr(parent, child, original)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the staged recipe: output size, re-noise strength, UNet steps, passes per step, and tokens."""

    width: int
    height: int
    strength: float  # 1.0 for the text-to-image base stage
    steps: int
    passes_per_step: int
    tokens: int  # latent pixels the UNet sees in one pass: (height / 8) × (width / 8)

    @property
    def unet_passes(self) -> int:
        """UNet evaluations of the stage (each doubled by classifier-free guidance)."""
        return self.steps * self.passes_per_step


def staged_recipe(family: str, width: int, height: int, recipe: str = "sdedit",
                  base_long_side: int = BASE_LONG_SIDE_PX, base_steps: int = BASE_STEPS,
                  downscale: int = 8) -> list[Stage]:
    """LinFusion's high-resolution schedule: a base text-to-image stage, then ×2 per stage with falling strengths.

    Args:
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (first strength 0.4, 0.4, 0.32).
        width, height: final size in pixels; the base stage is it halved until the long side is at most
            ``base_long_side``, so each side must stay a multiple of ``downscale`` at every stage.
        recipe: ``"sdedit"`` (one UNet pass per step: the SD1.5 notebook) or ``"highres"`` (SDXL HighRes: a second,
            dilated pass per upscaled step).
        base_long_side: the base stage's long side at most, in pixels (1024 in the notebooks).
        base_steps: the full schedule's steps; a stage of strength s runs int(base_steps·s) of them.
    Returns:
        The stages, base first.
    Raises:
        ValueError: a size that does not halve to multiples of ``downscale``, or an unknown family or recipe.
    Example:
        >>> stages = staged_recipe("sdxl", 16384, 8192, recipe="highres")
        >>> [(s.width, s.strength, s.steps, s.unet_passes) for s in stages]  # doctest: +NORMALIZE_WHITESPACE
        [(1024, 1.0, 50, 50), (2048, 0.32, 16, 32), (4096, 0.24, 12, 24), (8192, 0.16, 8, 16),
         (16384, 0.08, 4, 8)]
        >>> stages[-1].tokens
        2097152

    Source: LinFusion notebooks (highres.md §1.5). Strengths are linspace(first, 0, stages + 1) without its 0.
    """
    _check_family(family)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {recipe!r}")
    if base_long_side < downscale or base_steps < 1:
        raise ValueError(f"base_long_side must be >= {downscale} and base_steps >= 1; got {base_long_side}, "
                         f"{base_steps}")
    upscales = 0
    while max(width, height) > base_long_side * 2 ** upscales:
        upscales += 1
    sizes = [(width // 2 ** k, height // 2 ** k) for k in range(upscales, -1, -1)]
    if any(w * 2 ** k != width or h * 2 ** k != height or w % downscale or h % downscale
           for k, (w, h) in zip(range(upscales, -1, -1), sizes)):
        raise ValueError(f"width and height must halve {upscales} times to multiples of {downscale}; got "
                         f"{width}×{height}")
    strengths = torch.linspace(FIRST_STRENGTH[family], 0, upscales + 1, dtype=torch.float64).tolist()[:upscales]
    stages = [Stage(sizes[0][0], sizes[0][1], 1.0, base_steps, 1, (sizes[0][0] // downscale) *
                    (sizes[0][1] // downscale))]
    for (w, h), strength in zip(sizes[1:], strengths):
        strength = round(strength, 6)
        stages.append(Stage(w, h, strength, int(base_steps * strength + 1e-9), 2 if recipe == "highres" else 1,
                            (w // downscale) * (h // downscale)))
    return stages
