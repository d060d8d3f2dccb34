"""Structurally pruned UNets, such as APTP's experts: a UNet rebuilt in place at the narrower widths, and without the
blocks, that a weights file holds.

APTP (rezashkv/diffusion_pruning, ``UNet2DConditionModelPruned``) prunes SD2.1 physically: attention heads (rows of
``to_q``, ``to_k``, ``to_v``, columns of ``to_out.0``), GEGLU feed-forward channels in groups (rows of the GEGLU
projection, columns of the output projection), ResNet channels in GroupNorm groups (``conv1``'s outputs, the time
projection, ``norm2``, ``conv2``'s inputs), and whole blocks: the last ResNet and the last transformer of each down
and up level may be dropped. A dropped ResNet returns its input, without the skip connection's channels in an up
level; a dropped transformer returns its input. The published files hold only what is left, in diffusers' names,
while the folder's ``config.json`` keeps the full widths. So the architecture is read from the file alone: every
linear, convolution and group norm is rebuilt at the shape the file gives it, each attention keeps its head width
(64 in SD2.1) and counts its heads again, and a ResNet or transformer none of whose tensors the file holds is
replaced by :class:`SkippedBlock`.

The functions work on any module tree whose names are the file's: diffusers' UNet standalone, ComfyUI's
``openaimodel.UNetModel`` (after the names are mapped) inside ComfyUI. They rebuild modules with their own classes,
so ComfyUI's casting operations stay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class SkippedBlock(torch.nn.Module):
    """A dropped ResNet or transformer: its input, cut to its ``channels`` (a ResNet of an up level receives the
    skip connection's channels after its own and drops them). Called as the block it replaces: extra arguments are
    ignored, and ``return_dict=False`` (how diffusers calls a transformer) gives a one-element tuple."""

    def __init__(self, channels: int | None) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object
                ) -> torch.Tensor | tuple[torch.Tensor]:
        if self.channels is not None:
            hidden_states = hidden_states[:, :self.channels]
        return (hidden_states,) if kwargs.get("return_dict") is False else hidden_states


def _narrowed(module: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module | None:
    """``module`` rebuilt (same class and options, uninitialised weights on its device) with a weight of ``shape``;
    None where ``shape`` is not a narrowing of it (larger, another kernel, a group norm cut inside a group)."""
    weight = module.weight
    if len(shape) != weight.ndim or any(new > old for new, old in zip(shape, weight.shape)):
        return None
    options = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, torch.nn.Linear):
        return type(module)(shape[1], shape[0], bias=module.bias is not None, **options)
    if isinstance(module, torch.nn.Conv2d):
        if shape[2:] != tuple(weight.shape[2:]) or module.groups != 1:
            return None
        return type(module)(shape[1], shape[0], module.kernel_size, stride=module.stride, padding=module.padding,
                            dilation=module.dilation, bias=module.bias is not None, **options)
    if isinstance(module, torch.nn.GroupNorm):
        group_width = module.num_channels // module.num_groups
        if shape[0] % group_width:
            return None
        return type(module)(shape[0] // group_width, shape[0], eps=module.eps, affine=module.affine, **options)
    return None


def _replace(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def prune_to_shapes(root: torch.nn.Module, shapes: Mapping[str, Sequence[int]],
                    droppable: tuple[type, ...]) -> int:
    """Rebuild ``root`` in place at the widths and depth of a pruned weights file.

    Args:
        root: the full model, its parameter names the file's (build it on the meta device: nothing is allocated).
        shapes: the file's tensor shapes by name (from its header).
        droppable: the block classes a file may leave out whole (ResNets and transformers); each one of them of
            which the file holds no tensor becomes a :class:`SkippedBlock` cut to its ``out_channels``.
    Returns:
        How many modules were rebuilt or dropped (0: the file is not a pruning of ``root``'s widths). Whether the
        file then fits is for the caller to check, tensor by tensor: a file that is no pruning keeps its
        differences.
    Example:
        >>> layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16))
        >>> prune_to_shapes(layers, {"0.weight": (12, 8), "0.bias": (12,), "1.weight": (12,), "1.bias": (12,)}, ())
        2
        >>> layers[1].num_groups, layers[0].out_features
        (3, 12)
    """
    changed = 0
    for name, module in list(root.named_modules()):
        if not name or not isinstance(module, droppable):
            continue
        if not any(f"{name}.{key}" in shapes for key, _ in module.named_parameters()):
            _replace(root, name, SkippedBlock(getattr(module, "out_channels", None)))
            changed += 1
    head_widths = {name: module.to_q.out_features // module.heads for name, module in root.named_modules()
                   if isinstance(getattr(module, "heads", None), int) and hasattr(module, "to_q")}
    for name, module in list(root.named_modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm)):
            continue
        shape = tuple(shapes.get(f"{name}.weight", ()))
        if not shape or module.weight is None or shape == tuple(module.weight.shape):
            continue
        narrowed = _narrowed(module, shape)
        if narrowed is not None:
            _replace(root, name, narrowed)
            changed += 1
    for name, head_width in head_widths.items():
        attention = root.get_submodule(name)
        attention.heads = attention.to_q.out_features // head_width
    return changed
