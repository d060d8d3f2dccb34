"""MagicFace (Wang et al. 2024, "MagicFace: Training-free Universal-Style Human Image Customized Synthesis",
arXiv 2408.07433; ``techniques.md`` §4.10): multi-concept personalization without training, read from the official
code (CodeGoat24/MagicFace: ``magicface/reference_attention.py``, ``magicface/hack_attention.py``,
``pipelines/pipeline_stable_diffusion_magicface.py``, ``configs/config_stable_diffusion.yaml``).

One UNet call per step runs the target and its K references in one batch, the unguided halves first:
[target, ref_1 … ref_K] with the negative prompt, then the same with the prompts. Every reference is its clean
latent re-noised to the step's timestep with fresh noise. In the chosen transformer blocks' self-attention
(:class:`MagicFaceAttention`):

- **Reference-based self-attention (RSA)**, steps 0 … inject_step: the guided target's queries attend to its own
  keys and to every reference's, with +w_k on the logits toward reference k's masked pixels and −∞ elsewhere
  (:func:`reference_bias`); the unguided target and the references attend to themselves.
- **Region-bound attention (RBA)**, later steps: the guided target's pixels inside concept k's region attend to
  their own keys and reference k's (the same bias); the others attend to themselves. The regions come from the
  previous step's attention (:func:`concept_masks`): cross-attention maps of the prompt's tokens sharpened by the
  self-attention maps, smoothed, and assigned per pixel to the strongest token, the other tokens' maps weakened by
  ``ca_scale``.
- **Adaptive guidance** (:func:`guidance_rate`): each pixel's CFG scale multiplied by the foreground's mean
  guidance norm over its token region's, clamped to [0.8, 3] and to 15 / cfg, smoothed.

Departures from the official code:

- The self-attention sharpening is the code's (A + 3A²)/4 (its loop adds A·A three times), not the design note's
  mean of A … A⁴.
- The attention maps are kept at 2, 4 and 8 times below the latent's own size (the code measures against the
  model's training size, so it fails on any other); non-square latents are supported.
- The smoothing is kornia's Gaussian with σ = 0.5·√2, the kernel exp(−x²/(4·0.5²)) of the Attend-and-Excite
  ``GaussianSmoothing`` the code imports (its file is not in the published repository; that class is the one its
  call signature matches), with the code's reflect padding.
- "auto" picks the decoder's transformer blocks at its two highest resolutions with attention: blocks 10–15 on
  SD 1.x/2.x, the code's ``layer_idx``, and a meaningful choice on other UNets (the embedded model's last four).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from ..common.unet_split import DECODER, feature_level, forwards_replaced, transformer_blocks

# Source: configs/config_stable_diffusion.yaml and magicface_stable_diffusion.py (DDIM, 50 steps, guidance 7.5)
DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_INJECT_STEP, DEFAULT_MASK_WEIGHT = 50, 7.5, 20, 3.0
# Source: the config's comment: 0.9 for one concept, 0.6 for several; below 0.9 the regions stay in the foreground
CA_SCALE_ONE, CA_SCALE_SEVERAL = 0.9, 0.6
# Source: hack_attention.get_mask, called with r=R=2: maps stored and merged from 2 to 8 times below the latent
RECORDED_LEVELS = (1, 2, 3)
# Source: the pipeline's rate: clamp(0.8, 3.0), then at most 15 / guidance_scale
RATE_MIN, RATE_MAX, RATE_CFG_CAP = 0.8, 3.0, 15.0
# Source: GaussianSmoothing(kernel_size=3, sigma=0.5) in get_mask and the pipeline; its kernel exp(−((x−μ)/(2σ))²)
# is a Gaussian of standard deviation σ·√2
SMOOTHING_KERNEL, SMOOTHING_SIGMA = 3, 0.5 * math.sqrt(2)
SHARPENING_TERMS = 4  # get_mask's ssgc_n
# The maps 2 times below the latent are (N, N) for N of their pixels: 64 × 64 (SD at 1024 px) at most
MAX_RECORDED_TOKENS = 64 * 64


def parse_layers(text: str) -> frozenset[int] | None:
    """The transformer blocks (in the order they run, from 0) named by ``text``: "auto" (None: the decoder's two
    highest resolutions), or numbers and ranges such as "10-15" or "3, 7-9".

    Example:
        >>> sorted(parse_layers("10-12, 15")), parse_layers(" auto ")
        ([10, 11, 12, 15], None)
    """
    text = text.strip().lower()
    if text == "auto":
        return None
    layers = set()
    try:
        for part in filter(None, (part.strip() for part in text.split(","))):
            first, _, last = part.partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"layers must be 'auto' or numbers and ranges such as '10-15'; got {text!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"layers must name blocks from 0 on; got {text!r}")
    return frozenset(layers)


def map_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """A UNet feature map's (h, w) ``level`` halvings below the latent's (H, W) (the convolutions round up)."""
    return tuple(math.ceil(side / 2 ** level) for side in latent_size)


def reference_bias(mask: torch.Tensor, weight: float, size: tuple[int, int]) -> torch.Tensor:
    """The logit bias (h·w,) toward a reference's keys: ``weight`` × the mask resized (nearest, as the code's
    ``F.interpolate``) to the map's ``size``, −∞ where it is 0. ``mask`` is (H, W).

    Example:
        >>> reference_bias(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 3.0, (2, 2)).tolist()
        [3.0, -inf, -inf, -inf]
    """
    resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest").flatten() * weight
    return resized.masked_fill(resized == 0, float("-inf"))


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of (heads, N, d) queries over (heads, M, d) keys and values, with a (M,) logit bias."""
    return F.scaled_dot_product_attention(query[None], keys[None], values[None],
                                          attn_mask=bias.to(query.dtype)[None, None, None])[0]


def _attention_probabilities(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) averaged over heads: (B, heads, N, d), (B, heads, M, d) → (B, N, M), in float32."""
    logits = query.float() @ keys.float().transpose(-1, -2) / math.sqrt(query.shape[-1])
    return logits.softmax(-1).mean(1)


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, channels = tensor.shape
    return tensor.reshape(batch, length, heads, channels // heads).transpose(1, 2)


def _smoothed(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of (B, C, h, w) Gaussian-smoothed (3×3, reflect padding)."""
    batch, channels, height, width = maps.shape
    smoothed = gaussian_blur2d(maps.reshape(batch * channels, 1, height, width), SMOOTHING_KERNEL,
                               (SMOOTHING_SIGMA, SMOOTHING_SIGMA), border_type="reflect")
    return smoothed.reshape(batch, channels, height, width)


def concept_masks(self_maps: dict[int, list[torch.Tensor]], cross_maps: dict[int, list[torch.Tensor]],
                  latent_size: tuple[int, int], token_indices: Sequence[int], ca_scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt token's region and the foreground, at the latent's size halved (``get_mask``).

    Per recorded level, per layer: the cross-attention maps (N, L) of the unguided and guided target, sharpened by
    the layer's self-attention A (N, N) as ((A + 3A²)/4)·maps, resized (bilinear) to the size halved, smoothed and
    divided by their spatial means; averaged over all layers. The guided maps, those of tokens other than
    ``token_indices`` times ``ca_scale``, give each pixel to its strongest token; the unguided start-token map
    against the sum of the others gives the background, the rest is foreground. Below 0.9, regions stay inside
    the foreground.

    Args:
        self_maps, cross_maps: per level, per layer, (2, N, N) and (2, N, L) attention maps averaged over heads,
            rows [unguided target, guided target].
    Returns:
        token masks (L, h, w) of 0/1 (one token per pixel, ties aside) and the foreground (1, h, w) of 0/1.
    """
    size = map_size(latent_size, 1)
    token_sum, foreground_sum, count = 0.0, 0.0, 0
    for level in sorted(cross_maps):
        if len(self_maps.get(level, ())) != len(cross_maps[level]):
            raise ValueError("MagicFace saw the cross-attention of a block but not its self-attention (another "
                             "attention patch replaces it?): remove that patch to use MagicFace")
        sharpening = torch.stack(self_maps[level], dim=1).flatten(0, 1)  # (2n, N, N), the rows target-major
        maps = torch.stack(cross_maps[level], dim=1).flatten(0, 1)  # (2n, N, L)
        sharpening = (sharpening + (SHARPENING_TERMS - 1) * sharpening @ sharpening) / SHARPENING_TERMS
        height, width = map_size(latent_size, level)
        maps = (sharpening @ maps).transpose(1, 2).reshape(maps.shape[0], maps.shape[-1], height, width)
        if (height, width) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear")
        maps = _smoothed(maps)
        layers = maps.shape[0] // 2
        token_sum = token_sum + (maps / (maps.mean(dim=(2, 3), keepdim=True) + 1e-8)).unflatten(0, (2, layers)).sum(1)
        start_and_rest = torch.stack([maps[:, 0], maps[:, 1:].sum(1)], dim=1)
        foreground_sum = foreground_sum + (start_and_rest / start_and_rest.mean(dim=(2, 3), keepdim=True)
                                           ).unflatten(0, (2, layers)).sum(1)
        count += layers
    if not count:
        raise ValueError("MagicFace found no attention 2 to 8 times below the latent's size to segment concepts with")
    guided = (token_sum / count)[1]
    weights = torch.full((guided.shape[0],), float(ca_scale), device=guided.device)
    weights[list(token_indices)] = 1.0
    guided = guided * weights[:, None, None]
    tokens = (guided == guided.max(dim=0, keepdim=True).values).float()
    unguided_start = (foreground_sum / count)[0]
    foreground = 1.0 - (unguided_start == unguided_start.max(dim=0, keepdim=True).values).float()[:1]
    if ca_scale < CA_SCALE_ONE:
        tokens = tokens * foreground
    return tokens, foreground


def guidance_rate(eps_unguided: torch.Tensor, eps_guided: torch.Tensor, tokens: torch.Tensor,
                  foreground: torch.Tensor, cfg: float) -> torch.Tensor:
    """The per-pixel factor (1, 1, H, W) on the CFG scale of one latent (1, C, H, W) (the pipeline's ``rate``).

    Each token's region (``tokens`` (L, h, w), resized nearest to (H, W)) gets the foreground's mean guidance-delta
    norm ‖ε_c − ε_u‖ over its own, clamped to [0.8, 3] and to 15 / cfg; the map is smoothed.
    """
    size = eps_guided.shape[-2:]
    regions = F.interpolate(tokens[None], size=size, mode="nearest")
    foreground = F.interpolate(foreground[None], size=size, mode="nearest")
    norm = (eps_guided - eps_unguided).float().norm(dim=1, keepdim=True)
    region_norms = (norm * regions).sum(dim=(2, 3)) / (regions.sum(dim=(2, 3)) + 1e-8)
    foreground_norm = (norm * foreground).sum(dim=(2, 3)) / (foreground.sum(dim=(2, 3)) + 1e-8)
    present = (regions.sum(dim=(2, 3)) > 0).float()
    rate = foreground_norm * present / (region_norms + 1e-8)
    rate = (rate[..., None, None] * regions).sum(dim=1, keepdim=True)
    rate = rate.clamp(RATE_MIN, RATE_MAX).clamp_max(RATE_CFG_CAP / cfg)
    return _smoothed(rate).to(eps_guided.dtype)


class MagicFaceAttention:
    """MagicFace's attention for one target and K references, installed on a UNet for a sampling run.

    Args:
        masks: (K, H, W) the references' masks, 0/1, at any size (resized to each map, nearest).
        mask_weights: w_k, the logit bonus toward reference k's masked pixels.
        token_indices: the prompt position of each reference's concept word (0 is the start token).
        layers: transformer blocks (in the order they run) that MagicFace changes; None: "auto"; empty: none (the
            references then only ride along).
        inject_step: RSA up to and including this step, RBA after it.
        ca_scale: the weakening of the other tokens' maps in the segmentation.
    """

    def __init__(self, masks: torch.Tensor, mask_weights: Sequence[float], token_indices: Sequence[int],
                 layers: frozenset[int] | None = None, inject_step: int = DEFAULT_INJECT_STEP,
                 ca_scale: float = CA_SCALE_ONE):
        if masks.ndim != 3 or not len(masks) == len(mask_weights) == len(token_indices):
            raise ValueError(f"masks must be (K, H, W) with one weight and token index each; got shape "
                             f"{tuple(masks.shape)}, {len(mask_weights)} weights, {len(token_indices)} indices")
        if inject_step < 0:
            raise ValueError(f"inject_step must be >= 0; got {inject_step}")
        if not 0 <= ca_scale <= 1:
            raise ValueError(f"ca_scale must be in [0, 1]; got {ca_scale}")
        self.masks, self.mask_weights = (masks > 0.5).float(), [float(weight) for weight in mask_weights]
        self.token_indices, self.layers = [int(index) for index in token_indices], layers
        self.inject_step, self.ca_scale = inject_step, ca_scale
        self.regions: torch.Tensor | None = None  # (K, h, w): each reference's concept region, from the last step
        self.modes: list[str] = []  # per UNet call: "rsa", "rba" or "plain" (no block changed)
        self.borrowed: list[int] = []  # per UNet call: target pixels, summed over blocks, that saw a reference
        self._step, self._latent_size = 0, (0, 0)
        self._self_maps: dict[int, list[torch.Tensor]] = {}
        self._cross_maps: dict[int, list[torch.Tensor]] = {}
        self._top_level, self._changed, self._borrowed = 0, False, 0
        self._biases: dict[tuple, list[torch.Tensor]] = {}

    @property
    def group(self) -> int:
        """1 + K: one guidance half of the batch."""
        return 1 + len(self.token_indices)

    @contextlib.contextmanager
    def installed(self, network: torch.nn.Module) -> Iterator[None]:
        """Every transformer block's self- and cross-attention of ``network`` wrapped for the block (its own
        forward, on the instance: other networks and the class untouched)."""
        blocks = transformer_blocks(network)
        if self.layers and max(self.layers) >= len(blocks):
            raise ValueError(f"layers name block {max(self.layers)}, but this UNet has {len(blocks)} transformer "
                             f"blocks (0 to {len(blocks) - 1})")
        positions = {block.attn1: (index, part) for index, (part, block) in enumerate(blocks)}
        self.regions, self._biases = None, {}  # a new run
        with forwards_replaced(list(positions), lambda module: self._self_attention(module, *positions[module])), \
                forwards_replaced([block.attn2 for _, block in blocks],
                                  lambda module: self._cross_attention(module, module.forward)):
            yield

    def begin_call(self, step: int, latent_size: tuple[int, int]) -> None:
        """Before the UNet call of ``step`` on latents of ``latent_size`` (h, w)."""
        tokens = math.prod(map_size(latent_size, 1))
        if tokens > MAX_RECORDED_TOKENS:
            raise ValueError(f"MagicFace keeps attention maps of {tokens}² values per layer for a {latent_size[0]}x"
                             f"{latent_size[1]} latent; at most {MAX_RECORDED_TOKENS}² (a 128x128 latent)")
        self._step, self._latent_size = step, latent_size
        self._self_maps, self._cross_maps = {}, {}
        self._top_level, self._changed, self._borrowed = 99, False, 0

    def end_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        """After the call: the prompt tokens' regions (L, h, w) and the foreground (1, h, w) from its attention;
        each reference's region (its concept token's) is kept for the next step's RBA."""
        self.modes.append(("rsa" if self._stage_is_rsa() else "rba") if self._changed else "plain")
        self.borrowed.append(self._borrowed)
        tokens, foreground = concept_masks(self._self_maps, self._cross_maps, self._latent_size, self.token_indices,
                                           self.ca_scale)
        self.regions = tokens[self.token_indices]
        return tokens, foreground

    def _stage_is_rsa(self) -> bool:
        return self._step <= self.inject_step or self.regions is None

    def _changes(self, index: int, part: int, level: int) -> bool:
        if self.layers is not None:
            return index in self.layers
        # auto: the decoder's blocks at the two highest resolutions with attention (the encoder ran first and
        # met the highest)
        return part == DECODER and level <= self._top_level + 1

    def _self_attention(self, module: torch.nn.Module, index: int, part: int):
        forward = module.forward

        def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            context = kwargs.get("encoder_hidden_states", kwargs.get("context"))
            if context is not None or args or hidden.ndim != 3 or hidden.shape[0] != 2 * self.group:
                return forward(hidden, *args, **kwargs)  # not the self-attention of a MagicFace batch
            level = feature_level(hidden, self._latent_size)
            self._top_level = min(self._top_level, level)
            query, keys, values = (_split_heads(projection(hidden), module.heads)
                                   for projection in (module.to_q, module.to_k, module.to_v))
            target, references = self.group, range(self.group + 1, 2 * self.group)  # the guided half's rows
            if level in RECORDED_LEVELS:
                self._self_maps.setdefault(level, []).append(_attention_probabilities(query[[0, target]],
                                                                                      keys[[0, target]]))
            out = F.scaled_dot_product_attention(query, keys, values)
            if self._changes(index, part, level):
                self._changed = True
                out[target] = self._reference_attention(query[target], keys, values, out[target], references, level)
            out = out.transpose(1, 2).flatten(2)
            for layer in module.to_out:  # the output projection and its dropout, in either host
                out = layer(out)
            return out

        return run

    def _reference_attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             plain: torch.Tensor, references: range, level: int) -> torch.Tensor:
        """The guided target's attention output (heads, N, d) with RSA or RBA; ``plain`` is its self-attention."""
        target, size = self.group, map_size(self._latent_size, level)
        biases = self._bias_for(size, query.device)
        own = torch.zeros(query.shape[1], device=query.device)
        if self._stage_is_rsa():
            self._borrowed += query.shape[1]
            return _attend(query, torch.cat([keys[row] for row in (target, *references)], dim=1),
                           torch.cat([values[row] for row in (target, *references)], dim=1), torch.cat([own, *biases]))
        out = plain.clone()
        regions = F.interpolate(self.regions[None], size=size, mode="nearest")[0].flatten(1) > 0
        for region, row, bias in zip(regions.to(query.device), references, biases):
            if region.any():
                self._borrowed += int(region.sum())
                out[:, region] = _attend(query[:, region], torch.cat([keys[target], keys[row]], dim=1),
                                         torch.cat([values[target], values[row]], dim=1), torch.cat([own, bias]))
        return out

    def _bias_for(self, size: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        """Each reference's logit bias at a map size, made once per run."""
        key = (size, device)
        if key not in self._biases:
            self._biases[key] = [reference_bias(mask, weight, size).to(device)
                                 for mask, weight in zip(self.masks, self.mask_weights)]
        return self._biases[key]

    def _cross_attention(self, module: torch.nn.Module, forward):
        def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            context = kwargs.get("encoder_hidden_states", kwargs.get("context", args[0] if args else None))
            if context is not None and hidden.ndim == 3 and hidden.shape[0] == 2 * self.group:
                level = feature_level(hidden, self._latent_size)
                if level in RECORDED_LEVELS:
                    rows = [0, self.group]
                    query = _split_heads(module.to_q(hidden[rows]), module.heads)
                    keys = _split_heads(module.to_k(context[rows].to(hidden.dtype)), module.heads)
                    self._cross_maps.setdefault(level, []).append(_attention_probabilities(query, keys))
            return forward(hidden, *args, **kwargs)

        return run
