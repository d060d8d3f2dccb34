"""APTP's trained router: which of its pruned SD2.1 experts a prompt goes to, as the authors' code decides.

APTP (rezashkv/diffusion_pruning, MIT) routes a prompt in four steps, all read from its code:

1. the prompt's all-mpnet-base-v2 embedding, mean-pooled over the real tokens and not normalised
   (``get_mpnet_embeddings``), goes through the ``HyperStructure``: one linear head per width gate group and one
   for the 14 depth gates, whose outputs are concatenated into logits;
2. ``StructureVectorQuantizer.gumbel_sigmoid_trick`` turns them into soft gates: width logits plus Gumbel noise
   plus an offset (``base``, 3), through a sigmoid at temperature 0.4, with at least one group kept per gate;
   depth logits through a softmax, a reversed cumulative sum and its inverse sigmoid first, then the same, and
   placed in ``depth_order``. At inference the Gumbel noise is drawn from a generator seeded 0, one draw per gate
   of the batch's shape, so it is the same for every call;
3. ``width_depth_normalize``: the gates made hard, each block's width gates times its (soft) depth gate, each
   entry scaled by √(1 / its gate's group count);
4. the cosine similarity with the experts' codes (``embedding_gs``, normalised the same way): the argmax is the
   expert (``get_cosine_sim_min_encoding_indices``; Sinkhorn balancing is for training only).

The published pruning folders (Hugging Face ``rezashkv/diffusion_pruning``, ``APTP-{Base,Small}-{CC3M,COCO}``)
hold ``hypernet/`` and ``quantizer/`` (diffusers ``ModelMixin`` folders: ``config.json`` and
``diffusion_pytorch_model.safetensors``) beside one ``arch<K>/…/unet/`` folder per expert.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import torch
from safetensors.torch import load_file

from ..common.paths import confine
from ..models.formats import check_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Source: pdm/utils/estimation_utils.py: sample_gumbel's eps and the fixed seed used when not training,
# importance_gumbel_softmax_sample's eps.
GUMBEL_EPS = 1e-20
GUMBEL_SEED = 0
DEPTH_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AptpRouter:
    """A loaded APTP router: the hypernetwork's heads as one linear map, the gates' layout and the experts' codes."""

    weight: torch.Tensor  # (G, 768): every width head's rows, then the depth head's
    bias: torch.Tensor | None  # (G,)
    widths: tuple[int, ...]  # groups of each width gate, in order
    block_widths: tuple[int, ...]  # how many width entries each block (ResNet, transformer, ...) has
    block_depth: tuple[bool, ...]  # whether each block has a depth gate
    depth_order: tuple[int, ...]  # where each depth gate's soft value goes
    codes: torch.Tensor  # (K, G) the experts' architecture vectors (the quantizer's embedding_gs)
    temperature: float
    offset: float
    non_zero_width: bool
    name: str

    def __post_init__(self) -> None:
        gates = sum(self.widths) + sum(self.block_depth)
        if self.weight.ndim != 2 or self.weight.shape[0] != gates or self.codes.shape[1:] != (gates,):
            raise ValueError(f"an APTP router needs {gates} gate logits per prompt (its structure's widths and "
                             f"depths); the hypernetwork gives {tuple(self.weight.shape)} and the codes are "
                             f"{tuple(self.codes.shape)}")
        if sorted(self.depth_order) != list(range(sum(self.block_depth))):
            raise ValueError(f"depth_order must order the {sum(self.block_depth)} depth gates; got "
                             f"{list(self.depth_order)}")

    @property
    def experts(self) -> int:
        return self.codes.shape[0]


def _gumbel(shape: tuple[int, ...]) -> torch.Tensor:
    """The Gumbel noise APTP draws at inference: the same seeded draw of ``shape`` every time."""
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(GUMBEL_SEED))
    return -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)


def soft_gates(logits: torch.Tensor, router: AptpRouter) -> torch.Tensor:
    """APTP's Gumbel-sigmoid of gate logits (``gumbel_sigmoid_trick`` at inference): (B, G) → (B, G) in (0, 1)."""
    width_count = sum(router.widths)
    width_logits, depth_logits = logits[:, :width_count], logits[:, width_count:]
    depth = torch.softmax(depth_logits, dim=1).cumsum(dim=1).flip(dims=[1])
    depth = torch.log(depth + DEPTH_EPS) - torch.log1p(-(depth - DEPTH_EPS))
    depth = torch.sigmoid((depth + _gumbel(tuple(depth.shape)) + router.offset) / router.temperature)
    placed = torch.zeros_like(depth)
    placed[:, list(router.depth_order)] = depth
    widths = []
    for group in width_logits.split(list(router.widths), dim=1):
        gate = torch.sigmoid((group + _gumbel(tuple(group.shape)) + router.offset) / router.temperature)
        if router.non_zero_width:  # a gate with nothing kept keeps its first group
            empty = (gate >= 0.5).sum(dim=1) == 0
            gate = gate.clone()
            gate[empty, 0] += 0.5
        widths.append(gate)
    return torch.cat([*widths, placed], dim=1)


def normalized_architecture(gates: torch.Tensor, router: AptpRouter) -> torch.Tensor:
    """APTP's ``width_depth_normalize`` of soft gates, made unit length: what routing compares."""
    hard = (gates >= 0.5).to(gates.dtype)
    width_count = sum(router.widths)
    start, depth_index = 0, width_count
    for count, has_depth in zip(router.block_widths, router.block_depth):
        if has_depth:
            hard[:, start:start + count] = gates[:, start:start + count] * gates[:, depth_index:depth_index + 1]
            depth_index += 1
        start += count
    group_counts = torch.tensor(list(router.widths) + [1] * sum(router.block_depth), dtype=gates.dtype)
    scale = (1.0 / group_counts).repeat_interleave(group_counts.long()).sqrt()
    normalized = hard * scale
    return normalized / normalized.norm(dim=-1, keepdim=True)


def route_experts(embeddings: torch.Tensor, router: AptpRouter) -> torch.Tensor:
    """The expert APTP picks for each prompt embedding.

    Args:
        embeddings: (B, 768) mean-pooled all-mpnet-base-v2 embeddings, as one batch (APTP's noise is one draw of
            the batch's shape, so a prompt's row in a larger batch sees other noise than alone).
    Returns:
        (B,) expert indices in [0, K).
    """
    if embeddings.ndim != 2 or embeddings.shape[1] != router.weight.shape[1]:
        raise ValueError(f"embeddings must be (B, {router.weight.shape[1]}), the router's sentence-encoder width; "
                         f"got {tuple(embeddings.shape)}")
    # head by head, as the authors' nn.Linear per gate: one product over all heads rounds differently, which could
    # flip a gate within float rounding of 0.5
    heads = [*router.widths, sum(router.block_depth)]
    biases = [None] * len(heads) if router.bias is None else router.bias.split(heads)
    logits = torch.cat([torch.nn.functional.linear(embeddings.float(), weight, bias)
                        for weight, bias in zip(router.weight.split(heads), biases)], dim=1)
    prompts = normalized_architecture(soft_gates(logits, router), router)
    codes = normalized_architecture(router.codes, router)
    return (prompts @ codes.T).argmax(dim=-1)


def _read_part(folder: str, part: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = os.path.join(folder, part, "config.json"), os.path.join(folder, part, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{os.path.basename(folder)!r} has no {part}/{WEIGHTS_NAME}: an APTP pruning folder "
                                f"holds hypernet/ and quantizer/ with config.json and .safetensors weights")
    check_safetensors(weights_path)
    with open(config_path, encoding="utf-8") as file:
        return json.load(file), load_file(weights_path)


def _head_weight(tensors: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """A hypernetwork head's weight, with or without torch's weight-norm parametrisation (``wn_flag``)."""
    plain = tensors.get(f"mh_fc.{index}.weight")
    if plain is not None:
        return plain
    magnitude = tensors[f"mh_fc.{index}.parametrizations.weight.original0"]
    direction = tensors[f"mh_fc.{index}.parametrizations.weight.original1"]
    return torch._weight_norm(direction, magnitude, 0)  # what torch's weight_norm parametrisation computes, bit for bit


def load_aptp_router(folder: str | os.PathLike) -> AptpRouter:
    """Read an APTP pruning folder's ``hypernet/`` and ``quantizer/``.

    Raises:
        FileNotFoundError: a part is missing.
        ValueError: a layout the authors' routing does not describe (a single shared architecture, resource-aware
            normalisation, which needs the training run's MAC counts), or heads that do not fit the structure.
    """
    folder = os.fspath(folder)
    hypernet_config, hypernet = _read_part(folder, "hypernet")
    quantizer_config, quantizer = _read_part(folder, "quantizer")
    if hypernet_config.get("single_arch_param"):
        raise ValueError("this hypernetwork is APTP's single-architecture baseline: it routes nothing")
    if quantizer_config.get("resource_aware_normalization", True) is not False:
        raise ValueError("this quantizer normalises by MAC counts from its training run (resource_aware_"
                         "normalization), which the folder does not hold; the published routers do not")
    structure = quantizer_config["structure"]
    if any(len(depth) != 1 for depth in structure["depth"]):
        raise ValueError("each block of an APTP structure has exactly one depth entry (0 or 1)")
    widths = tuple(width for block in structure["width"] for width in block)
    block_depth = tuple(bool(depth[0]) for depth in structure["depth"])
    try:
        weights = [_head_weight(hypernet, index) for index in range(len(widths) + 1)]
    except KeyError as error:
        raise ValueError(f"the hypernetwork has no head {error.args[0]!r}: it does not match the quantizer's "
                         f"structure of {len(widths)} width gates and one depth head") from None
    biases = [hypernet.get(f"mh_fc.{index}.bias") for index in range(len(widths) + 1)]
    depth_count = sum(block_depth)
    return AptpRouter(
        weight=torch.cat(weights).float(), bias=None if biases[0] is None else torch.cat(biases).float(),
        widths=widths, block_widths=tuple(sum(block) for block in structure["width"]), block_depth=block_depth,
        depth_order=tuple(index % depth_count for index in quantizer_config.get("depth_order")
                          or range(depth_count)),
        codes=quantizer["embedding_gs"].float(), temperature=float(quantizer_config.get("temperature", 0.4)),
        offset=float(quantizer_config.get("base", 2)), non_zero_width=bool(quantizer_config.get("non_zero_width",
                                                                                                True)),
        name=os.path.basename(folder.rstrip(os.sep)))


def expert_unet_file(folder: str | os.PathLike, expert: int) -> str:
    """The UNet file of expert ``expert`` in a pruning folder: ``arch<expert>/…/unet/diffusion_pytorch_model
    .safetensors``, the latest ``checkpoint-<step>`` when there are several.

    Raises:
        FileNotFoundError: no such expert; the message lists those there are.
        nodes.common.paths.PathOutsideFolderError: the file found is a link out of the folder.
    """
    folder = os.fspath(folder)
    found = glob.glob(os.path.join(glob.escape(folder), f"arch{int(expert)}", "**", "unet", WEIGHTS_NAME),
                      recursive=True)
    if not found:
        there = sorted(int(name[4:]) for name in os.listdir(folder) if re.fullmatch(r"arch\d+", name))
        raise FileNotFoundError(f"{os.path.basename(folder)!r} has no expert {expert} "
                                f"(arch{expert}/…/unet/{WEIGHTS_NAME}); experts there: {there or 'none'}")

    def step(path: str) -> int:
        match = re.search(r"checkpoint-(\d+)", os.path.relpath(path, folder))
        return int(match.group(1)) if match else -1

    return confine(folder, os.path.relpath(max(found, key=step), folder))  # no symlink out of the folder

