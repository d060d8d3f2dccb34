"""DiffEditor (Mou et al., CVPR 2024, "DiffEditor: Boosting Accuracy and Flexibility on Diffusion-based Image
Editing", arXiv 2402.02583; ``techniques.md`` row 33): drag editing with the training-free parts of the method, on
any SD1.x model. Read from the official code, MC-E/DragonDiffusion at f9b5bdf (Apache-2.0): ``Sampler.edit`` with
``alg='D+'`` and ``guidance_drag`` (``src/models/Sampler.py``), ``process_drag`` (``src/utils/utils.py``), the
inversion (``src/utils/inversion.py``) and the demo's drag defaults (``src/demo/demo.py``, ``model.py``).

The picture is inverted with 50 DDIM steps on the prompt, each inverted latent and each step's decoder
self-attention keys and values kept. Sampling back from the last one, with classifier-free guidance:

- **Memory-bank self-attention**: from step 5 on, every decoder self-attention also attends to the keys and values
  the inversion saw at that step (:class:`MemoryBankAttention`), which keeps the picture's content.
- **Score-based guidance**: on steps 0–9 and the even steps to 28, an energy on UNet decoder features
  (:func:`drag_energy`) pulls the handle's features to the target, pushes the vacated place away from its old
  content and keeps the rest of the picture; its gradient enters ε (:func:`drag_guidance`): the edit energy's
  inside the edit mask, the content energy's outside it.
- **Regional ODE–SDE mix** (DiffEditor): on steps 11–19 the edit mask region takes a DDIM step with η-noise of
  strength 0.4, the rest stays deterministic.
- **Time travel** (DiffEditor): on steps 22, 24, 26 and 28 the step is taken, re-inverted one DDIM step and taken
  again, three times in all.

"DragonDiffusion" (the authors' earlier method, ``alg='D'``) guides every step up to 29 and uses neither the SDE
mix nor time travel.

The image-prompt encoder (trained; :mod:`.image_prompt`) adds the picture's CLIP tokens to the cross-attention of
the sampling calls of steps 10–19, where it is given; without it the training-free parts run alone.

Departures from the official code:

- Step counts other than 50 map each step to the official one at the same fraction of the run (exact at 50).
- Handle and target patches are clipped into the feature map on both axes (the code clips x by the height) and
  the latent patches copied at the start into the latent (the code's slice is empty at the top and left rows).
- Time travel's third re-inversion, computed and thrown away by the code, is not computed.
- The features are taken from the sampling UNet itself with the memory bank switched off, not from a second copy
  (the same weights: the code loads the same checkpoint twice).
- Step 0's reference is the inverted latent: the code's patch copy writes through a view into it as well.
- A target patch covering its handle's adds no inpainting term (the code's mean of nothing is NaN).
- Without the image prompt connected, its branch is off (the demo always loads it, at scale 0.1).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..common.denoiser import Conditioning, Denoiser
from ..common.progress import check_interrupt
from ..common.unet_split import DECODER, forwards_replaced, module_outputs, transformer_blocks
from ..sampling.ddim import ddim_alpha_bars, ddim_step, ldm_ddim_timesteps
from .image_prompt import IP_FIRST_STEP, IP_LAST_STEP, ImagePromptAttention

# Source: demo.py create_demo_drag's slider defaults, and the code's NUM_DDIM_STEPS = 50 (SD1.5's DDIM grid with
# steps_offset 1: 981, 961, ..., 1); the energy slider's 2 is multiplied by 1e3 in run_drag.
DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_ENERGY = 50, 4.0, 2000.0
DEFAULT_W_EDIT, DEFAULT_W_CONTENT, DEFAULT_W_INPAINT, DEFAULT_SDE_STRENGTH = 4.0, 6.0, 0.2, 0.4
DEFAULT_RESOLUTION = 768  # max_resolution: the picture is resized to about this side squared, sides /64
SIDE_MULTIPLE = 64
# Source: Sampler.edit: the guidance is 0.04 times the energies' gradients (drag mode)
GUIDANCE_COEFFICIENT = 0.04
# Source: Sampler.edit, in official steps (of 50): the memory bank from step 5; guidance before step 10 and on even
# steps before 30 (every step before 30 for DragonDiffusion); the SDE mix on steps 11-19; time travel on the even
# steps 22-28, three passes each.
OFFICIAL_STEPS = 50
BANK_FROM, GUIDED_BEFORE, GUIDED_EVEN_BEFORE = 5, 10, 30
SDE_AFTER, SDE_BEFORE, TRAVEL_AFTER, TRAVEL_BEFORE, TRAVEL_PASSES = 10, 20, 20, 30, 3
METHODS = ("DiffEditor", "DragonDiffusion")
# Source: up_ft_index = [1, 2], up_scale = 2: the outputs of the second and third decoder levels, resized (nearest) to
# twice the latent's size, a quarter of the picture's for SD.
FEATURE_LEVELS, FEATURE_UPSCALE = (1, 2), 2
PATCH_RADIUS = 1  # 3×3 feature (and latent) cells around each point
MAX_BANK_BYTES = 16 << 30  # the memory bank is kept on the CPU, as the code keeps it
_POINT = r"\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*"
_DRAG = re.compile(_POINT + r"->" + _POINT)

Point = tuple[float, float]


def parse_drag_points(text: str) -> list[tuple[Point, Point]]:
    """The drags in ``text``: one ``x,y -> x,y`` (handle, then target, in the picture's pixels) per line or
    separated by ``;``.

    Example:
        >>> parse_drag_points("10,20 -> 30,20; 5.5, 6 -> 7, 8")
        [((10.0, 20.0), (30.0, 20.0)), ((5.5, 6.0), (7.0, 8.0))]
    """
    drags = []
    for part in filter(None, (part.strip() for part in re.split(r"[;\n]", text))):
        match = _DRAG.fullmatch(part)
        if match is None:
            raise ValueError(f"a drag must read 'x,y -> x,y' (handle, then target, in pixels); got {part!r}")
        hx, hy, tx, ty = map(float, match.groups())
        drags.append(((hx, hy), (tx, ty)))
    if not drags:
        raise ValueError("no drag given: write one 'x,y -> x,y' (handle, then target, in pixels) per line")
    return drags


def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The size the picture is edited at: its area scaled to ``resolution``², each side rounded to a multiple of 64
    (``resize_numpy_image``), at least 64.

    Example:
        >>> working_size(480, 640, 768)
        (640, 896)
    """
    scale = math.sqrt(resolution * resolution / (height * width))
    return tuple(max(SIDE_MULTIPLE, round(side * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE) for side in (height, width))


def official_step(step: int, steps: int) -> int:
    """The official step (of 50) at the same fraction of a ``steps``-step run.

    Example:
        >>> official_step(7, 50), official_step(7, 25), official_step(24, 25)
        (7, 14, 48)
    """
    return step * OFFICIAL_STEPS // steps


def _cell(point: Point, size: tuple[int, int], stride: float) -> tuple[int, int]:
    """The (row, column) of a map of ``size`` with ``stride`` picture pixels per cell under a picture point (x, y),
    clipped so that its 3×3 patch lies inside."""
    row, column = int(point[1] // stride), int(point[0] // stride)
    return (min(max(row, PATCH_RADIUS), size[0] - 1 - PATCH_RADIUS),
            min(max(column, PATCH_RADIUS), size[1] - 1 - PATCH_RADIUS))


def _patch(cell: tuple[int, int]) -> tuple[slice, slice]:
    return (slice(cell[0] - PATCH_RADIUS, cell[0] + PATCH_RADIUS + 1),
            slice(cell[1] - PATCH_RADIUS, cell[1] + PATCH_RADIUS + 1))


def point_patches(drags: Sequence[tuple[Point, Point]], feature_size: tuple[int, int], stride: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The handles' and targets' 3×3 patches on the feature map, (n, h, w) bool each (``process_drag``'s
    ``mask_tar``/``mask_cur``); ``stride`` is picture pixels per feature cell.

    Example:
        >>> handles, targets = point_patches([((4, 4), (40, 20))], (16, 16), 4)
        >>> handles[0].nonzero()[0].tolist(), targets[0].nonzero()[0].tolist(), int(targets.sum())
        ([0, 0], [4, 9], 9)
    """
    if min(feature_size) < 2 * PATCH_RADIUS + 1:
        raise ValueError(f"the feature map {feature_size} is too small for a {2 * PATCH_RADIUS + 1}-cell patch")
    masks = torch.zeros(2, len(drags), *feature_size, dtype=torch.bool)
    for index, drag in enumerate(drags):
        for kind, point in enumerate(drag):
            masks[(kind, index, *_patch(_cell(point, feature_size, stride)))] = True
    return masks[0], masks[1]


def seed_latent_patches(latent: torch.Tensor, drags: Sequence[tuple[Point, Point]], stride: float) -> torch.Tensor:
    """The inverted latent (1, C, h, w) with each handle's 3×3 latent patch copied onto its target, drag after drag
    on the same latent as ``process_drag`` copies them (a later drag reads what an earlier one wrote); ``stride`` is
    picture pixels per latent cell."""
    seeded = latent.clone()
    size = tuple(latent.shape[-2:])
    for handle, target in drags:
        source = seeded[(..., *_patch(_cell(handle, size, stride)))].clone()  # the two patches may overlap
        seeded[(..., *_patch(_cell(target, size, stride)))] = source
    return seeded


def _similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between the columns of two (C, n) feature sets."""
    return (F.cosine_similarity(a, b, dim=0) + 1) / 2


def drag_energy(current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], handles: torch.Tensor,
                targets: torch.Tensor, keep: torch.Tensor, w_edit: float = DEFAULT_W_EDIT,
                w_content: float = DEFAULT_W_CONTENT, w_inpaint: float = DEFAULT_W_INPAINT
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit and content energies of ``guidance_drag``, on feature maps (C, h, w) of the current latent and of the
    inverted one, one per decoder level.

    With s = (cos + 1) / 2 over channels, per level: for each drag, w_edit / (1 + 4·mean s(current at the target,
    reference at the handle)) plus w_inpaint·mean s(current, reference) where the handle's patch leaves the target's;
    and w_content / (1 + 4·mean s(current, reference)) over ``keep``. The edit energy is averaged over levels and
    drags, the content energy over levels. Patches pair cell by cell in raster order.

    Args:
        handles, targets: (n, h, w) bool patches (:func:`point_patches`); keep: (h, w) bool, outside the edit mask.
    Example:
        >>> maps = [torch.randn(8, 6, 6)]
        >>> handles, targets = point_patches([((4, 4), (12, 12))], (6, 6), 2)
        >>> edit, content = drag_energy(maps, maps, handles, handles, torch.ones(6, 6, dtype=torch.bool))
        >>> round(float(edit), 4), round(float(content), 4)  # no drag, nothing changed: 4/5 and 6/5
        (0.8, 1.2)
    """
    edit, content = current[0].new_zeros(()), current[0].new_zeros(())
    for now, before in zip(current, reference):
        for handle, target in zip(handles, targets):
            edit = edit + w_edit / (1 + 4 * _similarity(now[:, target], before[:, handle]).mean())
            vacated = handle & ~target
            if vacated.any():  # the code takes the mean of nothing (NaN) when the target covers the handle
                edit = edit + w_inpaint * _similarity(now[:, vacated], before[:, vacated]).mean()
        if keep.any():
            content = content + w_content / (1 + 4 * _similarity(now[:, keep], before[:, keep]).mean())
    return edit / (len(current) * len(handles)), content / len(current)


class MemoryBankAttention:
    """The decoder's self-attention with a memory bank: while recording, each layer's keys and values (batch 1) are
    kept per step; while injecting, the layer attends to its own keys and values followed by the kept ones of the
    step, for every row of the batch (``AttnProcessor`` in drag mode: the keys are concatenated, not replaced).
    Kept on the CPU in the network's dtype."""

    def __init__(self, max_bytes: int = MAX_BANK_BYTES):
        self.mode, self.step, self.max_bytes = "off", 0, max_bytes
        self._bank: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers: dict[torch.nn.Module, int] = {}

    @contextlib.contextmanager
    def installed(self, network: torch.nn.Module) -> Iterator[None]:
        """The decoder's transformer blocks' self-attention of ``network`` wrapped for the block (on the instances)."""
        modules = [block.attn1 for part, block in transformer_blocks(network) if part == DECODER]
        if not modules:
            raise ValueError("DiffEditor needs a UNet with self-attention in its decoder (SD1.x)")
        self._layers, self._bank = {module: index for index, module in enumerate(modules)}, {}
        try:
            with forwards_replaced(modules, self._attention):
                yield
        finally:
            self._bank = {}

    @contextlib.contextmanager
    def recording(self, step: int, steps_to_keep: int) -> Iterator[None]:
        """Keep the keys and values of the calls in the block as ``step``'s; after the first step kept, refuse a bank
        of ``steps_to_keep`` such steps larger than ``max_bytes``."""
        first = not self._bank
        with self._mode("record", step):
            yield
        if first:
            size = sum(tensor.numel() * tensor.element_size() for pair in self._bank.values() for tensor in pair)
            if size * steps_to_keep > self.max_bytes:
                raise ValueError(f"DiffEditor's memory bank would take {size * steps_to_keep / 2 ** 30:.1f} GiB for "
                                 f"this picture (at most {self.max_bytes / 2 ** 30:.0f}): lower the resolution")

    def injecting(self, step: int) -> contextlib.AbstractContextManager:
        """Attend to ``step``'s kept keys and values as well, in the calls in the block."""
        return self._mode("inject", step)

    @contextlib.contextmanager
    def _mode(self, mode: str, step: int) -> Iterator[None]:
        self.mode, self.step = mode, step
        try:
            yield
        finally:
            self.mode = "off"

    @property
    def steps_kept(self) -> int:
        return len({step for _, step in self._bank})

    def _attention(self, module: torch.nn.Module) -> Callable:
        forward, layer = module.forward, self._layers[module]

        def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            context = kwargs.get("encoder_hidden_states", kwargs.get("context"))
            if self.mode == "off" or context is not None or args or hidden.ndim != 3:
                return forward(hidden, *args, **kwargs)
            if self.mode == "record":
                if hidden.shape[0] != 1:
                    raise ValueError(f"the memory bank records one picture at a time; got a batch of {hidden.shape[0]}")
                with torch.no_grad():
                    self._bank[layer, self.step] = (module.to_k(hidden).cpu(), module.to_v(hidden).cpu())
                return forward(hidden, *args, **kwargs)
            kept = self._bank.get((layer, self.step))
            if kept is None:
                return forward(hidden, *args, **kwargs)
            batch = hidden.shape[0]
            keys, values = (torch.cat([projection(hidden), stored.to(hidden).expand(batch, -1, -1)], dim=1)
                            for projection, stored in ((module.to_k, kept[0]), (module.to_v, kept[1])))
            query, keys, values = (tensor.unflatten(-1, (module.heads, -1)).transpose(1, 2)
                                   for tensor in (module.to_q(hidden), keys, values))
            out = F.scaled_dot_product_attention(query, keys, values).transpose(1, 2).flatten(2)
            for layer_out in module.to_out:  # the output projection and its dropout, in either host
                out = layer_out(out)
            return out

        return run


def decoder_level_outputs(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs are the outputs of the decoder levels ``FEATURE_LEVELS`` (their upsamplers, the last
    layer of each level but the last): diffusers' ``up_blocks[k].upsamplers[0]``, ldm's (ComfyUI's) last layer of
    each level's last ``output_blocks`` entry. SD1.5: 1280 channels at half the latent's size, 640 at its size."""
    if hasattr(network, "output_blocks"):
        upsamplers = [block[-1] for block in network.output_blocks if type(block[-1]).__name__ == "Upsample"]
    elif hasattr(network, "up_blocks"):
        upsamplers = [block.upsamplers[0] for block in network.up_blocks if getattr(block, "upsamplers", None)]
    else:
        raise ValueError(f"network must be a diffusers UNet2DConditionModel or an ldm UNetModel; got "
                         f"{type(network).__name__}")
    if len(upsamplers) <= max(FEATURE_LEVELS):
        raise ValueError(f"DiffEditor reads decoder levels {FEATURE_LEVELS}; this UNet upsamples {len(upsamplers)} "
                         "times (SD1.x: 3)")
    return [upsamplers[level] for level in FEATURE_LEVELS]


def decoder_features(denoiser: Denoiser, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                     conditioning: Conditioning) -> list[torch.Tensor]:
    """The decoder levels' outputs for latents x (1, C, h, w) at timestep ``t``, each resized (nearest) to twice the
    latent's size: (C_k, 2h, 2w) float32, differentiable in x where gradients are enabled. The UNet stops after them
    (the code's estimator does)."""
    taken = module_outputs(decoder_level_outputs(network), lambda: denoiser(x, t, conditioning))
    size = (FEATURE_UPSCALE * x.shape[-2], FEATURE_UPSCALE * x.shape[-1])
    return [F.interpolate(level.float().to(x.device), size=size, mode="nearest")[0] for level in taken]


def _eps(denoiser: Denoiser, x: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
    t = torch.full((x.shape[0],), timestep, device=x.device)
    return denoiser.schedule.eps_from_prediction(x, t, denoiser(x, t, conditioning))


def drag_guidance(denoiser: Denoiser, network: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor,
                  timestep: float, prompt: Conditioning, handles: torch.Tensor, targets: torch.Tensor,
                  keep: torch.Tensor, edit_region: torch.Tensor, energy_scale: float, w_edit: float, w_content: float,
                  w_inpaint: float) -> torch.Tensor:
    """The guidance added to ε at one step (``Sampler.edit``): 0.04·(M·∇(E·edit) + (1 − M)·∇(E·content)), the
    gradients in the latent x (1, C, h, w) of :func:`drag_energy` between its features and those of ``reference``
    (the inverted latent at the same step); ``keep`` (2h, 2w) bool is where the content energy looks, M the edit
    region (1, 1, h, w) at the latent's size."""
    t = torch.full((1,), timestep, device=x.device)
    with torch.no_grad():
        before = decoder_features(denoiser, network, reference, t, prompt)
    with torch.enable_grad():
        current_x = x.detach().requires_grad_(True)
        now = decoder_features(denoiser, network, current_x, t, prompt)
        edit, content = drag_energy(now, before, handles.to(x.device), targets.to(x.device), keep.to(x.device),
                                    w_edit, w_content, w_inpaint)
        # an energy without terms (no cell outside the edit region) has no gradient
        grad_edit, grad_content = (
            torch.autograd.grad(energy * energy_scale, current_x, retain_graph=True)[0] if energy.requires_grad
            else torch.zeros_like(x) for energy in (edit, content))
    region = edit_region.to(x)
    return GUIDANCE_COEFFICIENT * (grad_edit * region + grad_content * (1 - region))


def _guided(step: int, method: str) -> bool:
    if method == "DragonDiffusion":
        return step < GUIDED_EVEN_BEFORE
    return step < GUIDED_BEFORE or (step < GUIDED_EVEN_BEFORE and step % 2 == 0)


def _travels(step: int) -> bool:
    return TRAVEL_AFTER < step < TRAVEL_BEFORE and step % 2 == 0


def diffeditor_drag(denoiser: Denoiser, network: torch.nn.Module, latent: torch.Tensor, positive: Conditioning,
                    negative: Conditioning, drags: Sequence[tuple[Point, Point]], edit_region: torch.Tensor,
                    generator: torch.Generator, pixels_per_latent: float, steps: int = DEFAULT_STEPS,
                    cfg: float = DEFAULT_CFG, energy_scale: float = DEFAULT_ENERGY, w_edit: float = DEFAULT_W_EDIT,
                    w_content: float = DEFAULT_W_CONTENT, w_inpaint: float = DEFAULT_W_INPAINT,
                    sde_strength: float = DEFAULT_SDE_STRENGTH, method: str = "DiffEditor",
                    image_prompt: ImagePromptAttention | None = None,
                    on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """A clean latent (1, C, h, w), as the denoiser sees it, edited by ``drags`` (picture pixels).

    Args:
        denoiser: differentiable where gradients are enabled; ``network`` is its UNet (hooked for the memory bank
            and the features).
        positive, negative: the prompt (inversion, features, guided half) and the unguided half's (the code's "").
        edit_region: (1, 1, H, W) 0/1 at the picture's size: where the picture may change (resized nearest to the
            feature map's size for the content energy, to the latent's for the rest, as ``process_drag`` does).
        generator: the SDE mix's noise.
        image_prompt: the image-prompt branch (:mod:`.image_prompt`), on the CFG calls of steps 10-19; None: off.
        pixels_per_latent: the VAE's downscale (8 for SD).
        on_step: progress (done, total, x̂₀) over the inversion's and the sampling's steps.
    Returns:
        The edited latent (1, C, h, w), float32.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise ValueError(f"latent must be one latent (1, C, h, w); got {tuple(latent.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if cfg < 1 or energy_scale < 0 or not 0 <= sde_strength <= 1:
        raise ValueError(f"cfg must be >= 1, energy_scale >= 0 and sde_strength in [0, 1]; got {cfg}, "
                         f"{energy_scale}, {sde_strength}")
    timesteps = ldm_ddim_timesteps(steps, denoiser.schedule.num_train_timesteps)
    alphas, previous = ddim_alpha_bars(denoiser, timesteps)
    size = tuple(latent.shape[-2:])
    region = (F.interpolate(edit_region.float(), size=size, mode="nearest") > 0).float().to(latent.device)
    feature_size = (FEATURE_UPSCALE * size[0], FEATURE_UPSCALE * size[1])
    keep = (F.interpolate(edit_region.float(), size=feature_size, mode="nearest")[0, 0] < 0.5).to(latent.device)
    handles, targets = point_patches(drags, feature_size, pixels_per_latent / FEATURE_UPSCALE)
    bank = MemoryBankAttention()
    total, done = 2 * steps, 0
    banked = [i for i in range(steps) if official_step(i, steps) >= BANK_FROM]

    def report(x0: torch.Tensor) -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total, x0)

    prompt_branch = image_prompt.installed(network) if image_prompt is not None else contextlib.nullcontext()
    with bank.installed(network), prompt_branch, torch.no_grad():
        # Inversion up the grid (j ascending); sampling step i = steps - 1 - j runs at the same timestep
        inverted, x = [latent.float()], latent.float()
        for j, timestep in enumerate(timesteps.tolist()):
            check_interrupt()
            step = steps - 1 - j
            with bank.recording(step, len(banked)) if step in banked else contextlib.nullcontext():
                eps = _eps(denoiser, x, float(timestep), positive)
            x = ddim_step(x, eps, previous[j], alphas[j])
            inverted.append(x)
            report((x - (1 - alphas[j]) ** 0.5 * eps) / alphas[j] ** 0.5)

        x = seed_latent_patches(inverted[-1], drags, pixels_per_latent)
        for i in range(steps):
            check_interrupt()
            j, official = steps - 1 - i, official_step(i, steps)
            timestep, alpha, alpha_prev = float(timesteps[j]), alphas[j], previous[j]
            guided = energy_scale > 0 and _guided(official, method)
            passes = TRAVEL_PASSES if method == "DiffEditor" and guided and _travels(official) else 1
            sde = method == "DiffEditor" and SDE_AFTER < official < SDE_BEFORE and sde_strength > 0
            for travel in range(passes):
                t = torch.full((2,), timestep, device=x.device)
                both = torch.cat([x, x])
                attends = image_prompt is not None and IP_FIRST_STEP <= official <= IP_LAST_STEP
                with bank.injecting(i) if i in banked else contextlib.nullcontext(), \
                        image_prompt.attending() if attends else contextlib.nullcontext():
                    prediction = denoiser(both, t, Conditioning.cat([positive, negative]))
                eps_positive, eps_negative = denoiser.schedule.eps_from_prediction(both, t, prediction).chunk(2)
                eps = eps_negative + cfg * (eps_positive - eps_negative)
                guidance = 0.0
                if guided:
                    guidance = drag_guidance(denoiser, network, x, inverted[j + 1], timestep, positive, handles,
                                             targets, keep, region, energy_scale, w_edit, w_content, w_inpaint)
                # The guidance moves x̂₀ only: the direction toward x_{t-1} keeps the unguided ε (as the code does)
                x0 = (x - (1 - alpha) ** 0.5 * (eps + guidance)) / alpha ** 0.5
                x_next = alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
                if sde:
                    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
                    sigma = sde_strength * variance ** 0.5
                    noise = torch.randn(x.shape, generator=generator).to(x)
                    stochastic = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - sigma ** 2) ** 0.5 * eps + sigma * noise
                    x_next = region * stochastic + (1 - region) * x_next
                if travel < passes - 1:  # back up one step (deterministic DDIM inversion) and take it again
                    back = _eps(denoiser, x_next, float(timesteps[j - 1]), positive)
                    x = ddim_step(x_next, back, alpha_prev, alpha)
            x = x_next
            report(x0)
    return x
