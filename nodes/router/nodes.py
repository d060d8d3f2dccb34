"""The router's nodes: fit a router from prompts, save and load it, route one prompt or a list of prompts, and
switch between graph branches lazily, so that only the chosen pipeline variant runs.

They are thin: each parses its widgets, calls :mod:`.routing` and returns a tuple. A router travels on the
``ATELIER_ROUTER`` socket as a :class:`~.routing.Router`. Router files live in the ``routers`` folder of the
models folder (``--models-dir`` standalone, ComfyUI's ``models/routers`` inside ComfyUI), as ``.safetensors``.

A graph builds its variants as parallel branches (for example three samplers with 4, 8 and 20 steps) and
feeds them to a Route Switch; the Prompt Router's branch index picks one, and the switch asks for that branch
alone (a lazy input), so the other samplers never run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..common.limits import MAX_SEED
from ..models.clip import Clip
from ..models.comfy_adapters import comfy_pooled_text_embeddings, comfy_token_lengths
from ..models.loading import (list_checkpoints, list_models, load_transformers_folder, resolve_checkpoint,
                              resolve_model_path)
from ..models.refs import ModelsFolder, SavedFilesFolder, SaveToFolder
from ..models.checkpoint_unet import load_checkpoint_with_unet
from .aptp import expert_unet_file, load_aptp_router, route_experts
from .embeddings import (SentenceEncoder, pooled_text_embeddings, sentence_embeddings, sentence_encoder_pooling,
                         token_lengths)
from .fitting import FIT_METHODS, fit_router
from .router_files import load_router, save_router
from .routing import Router, route_batch, route_single

CATEGORY = "atelier/router"
MAX_BRANCHES = 8  # Source: APTP's shipped configs use K = 8 architecture codes; Route Switch has 8 inputs
MAX_COST = 100.0  # costs are relative to a reference variant (1.0); 100× covers any sensible variant
ROUTERS_FOLDER = "routers"
DEFAULT_VARIANTS = "4 steps = 0.2\n8 steps = 0.4\n20 steps = 1.0"  # the example workflow's sampler branches
SENTENCE_ENCODER_PREFIX = "sentence encoder "  # how a router file names a sentence encoder it was fitted with
DEFAULT_BUDGET = 0.6  # Source: APTP's pruning_target 0.6 (configs/pruning/*.yaml)
APTP_FOLDER = "aptp"
MAX_APTP_EXPERT = 15  # Source: the largest published router, APTP-Base-CC3M's, has 16 experts (arch0 to arch15)


class _AnyType(str):
    """ComfyUI's usual wildcard type: equal to nothing, but never unequal either, so that a "*" socket links
    with any type in ComfyUI's validator (which compares with ``!=``) as in ours."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = _AnyType("*")


def parse_variants(text: str) -> tuple[list[str], list[float]]:
    """The variants of a router, one ``label = cost`` per line in branch order; blank lines are skipped.

    Args:
        text: for example "4 steps = 0.2" and "20 steps = 1.0" on two lines; costs in (0, 100].
    Returns:
        (labels, costs).
    Raises:
        ValueError: a line without "=", an empty or repeated label, a cost that is not a number in (0, 100], or
            a count outside [1, 8].
    Example:
        >>> parse_variants("4 steps = 0.2\\n\\n20 steps = 1")
        (['4 steps', '20 steps'], [0.2, 1.0])
    """
    labels, costs = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, equals, cost_text = (part.strip() for part in line.rpartition("="))
        try:
            cost = float(cost_text)
        except ValueError:
            cost = float("nan")
        if not equals or not label or not 0 < cost <= MAX_COST:
            raise ValueError(f"variants line {number} must read 'label = cost' with a cost in (0, {MAX_COST:g}]; "
                             f"got {line.strip()!r}")
        if label in labels:
            raise ValueError(f"variants line {number} repeats the label {label!r}; each variant needs its own")
        labels.append(label)
        costs.append(cost)
    if not 1 <= len(labels) <= MAX_BRANCHES:
        raise ValueError(f"give 1 to {MAX_BRANCHES} variants (Route Switch has {MAX_BRANCHES} branches); "
                         f"got {len(labels)}")
    return labels, costs


def prompt_lines(text: str) -> list[str]:
    """The prompts of a multiline widget, one per non-blank line.

    Example:
        >>> prompt_lines("a red circle\\n\\n  a blue star  ")
        ['a red circle', 'a blue star']
    """
    return [line.strip() for line in text.splitlines() if line.strip()]


# The CLIP socket carries Atelier's Clip standalone and ComfyUI's comfy.sd.CLIP inside ComfyUI (the adapters in
# nodes/models/comfy_adapters.py read the latter); a router is fitted and routed with one of them.
def _embedding_name(clip: Any, sentence_encoder: SentenceEncoder | None) -> str:
    if sentence_encoder is not None:
        return f"{SENTENCE_ENCODER_PREFIX}{sentence_encoder.name}"
    if isinstance(clip, Clip):
        return f"{clip.ref.model.family} text encoder of {os.path.basename(clip.ref.model.source)}"
    return f"ComfyUI's {type(clip.cond_stage_model).__name__} text encoder"  # ComfyUI's CLIP keeps no file name


def _embed(clip: Any, prompts: list[str], sentence_encoder: SentenceEncoder | None) -> torch.Tensor:
    if sentence_encoder is not None:
        return sentence_embeddings(sentence_encoder, prompts)
    if not isinstance(clip, Clip):
        return comfy_pooled_text_embeddings(clip, prompts)
    with clip.ref.in_use("text") as loaded:
        return pooled_text_embeddings(loaded.tokenizers, loaded.text_encoders, prompts)


def _token_lengths(clip: Any, prompts: list[str]) -> torch.Tensor:
    if isinstance(clip, Clip):
        return token_lengths(clip.ref.model.tokenizers[-1], prompts)
    return comfy_token_lengths(clip, prompts)


def _route_embeddings(clip: Any, router: Router, prompts: list[str],
                      sentence_encoder: SentenceEncoder | None) -> torch.Tensor:
    """The prompts' embeddings, after checking they come from the kind of encoder the router was fitted with: a
    text encoder and a sentence encoder of the same width would otherwise route silently at random."""
    fitted_with_sentences = router.embedding.startswith(SENTENCE_ENCODER_PREFIX)
    if fitted_with_sentences or sentence_encoder is not None:
        wanted, given = router.embedding, _embedding_name(clip, sentence_encoder)
        if wanted != given:
            raise ValueError(f"sentence_encoder: the router was fitted with the {wanted or 'checkpoint text encoder'}"
                             f" but prompts would be embedded with the {given}; route with the same encoder")
    return _embed(clip, prompts, sentence_encoder)


def _sentence_encoder_input() -> dict[str, tuple]:
    return {"sentence_encoder": ("ATELIER_SENTENCE_ENCODER", {
        "tooltip": "Optional: embed prompts with this sentence encoder instead of the checkpoint's text encoder. "
                   "Route with the same encoder the router was fitted with."})}


def _budget_input() -> tuple[str, dict]:
    return ("FLOAT", {"default": DEFAULT_BUDGET, "min": 0.0, "max": MAX_COST, "step": 0.01, "round": 0.001,
                      "tooltip": "The mean cost to spend per prompt, in the variants' cost units; it must lie "
                                 "between the cheapest and the dearest variant's cost."})


class _RoutersFolder(SavedFilesFolder):
    """Nodes that read or write router files: ``models_dir/routers``, or ComfyUI's ``models/routers``."""

    FOLDER, PURPOSE = ROUTERS_FOLDER, "router files"


class AtelierFitRouter:
    DESCRIPTION = ("Builds a prompt router without training: clusters calibration prompts (embedded by the "
                   "checkpoint's text encoder) into one group per variant, gives the groups of longer, more "
                   "detailed prompts to the dearer variants, and calibrates the cost bias for single prompts.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_ROUTER",)
    RETURN_NAMES = ("router",)
    OUTPUT_TOOLTIPS = ("The router: one prototype, cost and label per variant, in branch order.",)
    FUNCTION = "fit"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder that will embed the prompts to route."}),
            "prompts": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "Calibration prompts, one per line, like the ones you will route "
                                              "(paste a prompt file here); at least one per variant."}),
            "variants": ("STRING", {"multiline": True, "default": DEFAULT_VARIANTS,
                                    "tooltip": "One 'label = cost' line per variant, in the order of the Route "
                                               "Switch's branches; cost is relative, e.g. steps / 20."}),
            "method": (list(FIT_METHODS), {"tooltip": "kmeans: clusters follow the prompts; sinkhorn: clusters of "
                                                      "equal size (APTP's balanced codes); difficulty: one group per "
                                                      "variant by prompt length, shortest to the cheapest."}),
            "cluster_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                                     "tooltip": "Seeds the k-means++ start; the same seed gives the same router."}),
        }, "optional": _sentence_encoder_input()}

    @classmethod
    def VALIDATE_INPUTS(cls, prompts: str | None, variants: str | None) -> bool | str:
        if variants is None:
            return True  # a linked text: fit() checks it when it arrives
        try:
            labels, _ = parse_variants(variants)
        except ValueError as error:
            return str(error)
        if prompts is not None and len(prompt_lines(prompts)) < len(labels):
            return (f"give at least one calibration prompt per variant ({len(labels)}); got "
                    f"{len(prompt_lines(prompts))}")
        return True

    def fit(self, clip: Any, prompts: str, variants: str, method: str, cluster_seed: int,
            sentence_encoder: SentenceEncoder | None = None) -> tuple[Router]:
        labels, costs = parse_variants(variants)
        lines = prompt_lines(prompts)
        return (fit_router(_embed(clip, lines, sentence_encoder), _token_lengths(clip, lines),
                           torch.tensor(costs, dtype=torch.float64), labels, method,
                           torch.Generator().manual_seed(cluster_seed),
                           embedding=_embedding_name(clip, sentence_encoder)),)


class AtelierSaveRouter(SaveToFolder, _RoutersFolder):
    DESCRIPTION = "Saves a router as a .safetensors file in the models folder's routers/, for Load Router."
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "router": ("ATELIER_ROUTER", {"tooltip": "The router to save."}),
            "filename": ("STRING", {"default": "router", "tooltip": "The file name inside models/routers; "
                                                                      ".safetensors is added when missing."}),
        }}

    def save(self, router: Router, filename: str) -> dict:
        return self.saved(filename, lambda path: save_router(router, path))


class AtelierLoadRouter(_RoutersFolder):
    DESCRIPTION = "Loads a router file (.safetensors) from the models folder's routers/."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_ROUTER",)
    RETURN_NAMES = ("router",)
    OUTPUT_TOOLTIPS = ("The router, as it was saved.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "router_name": (cls.saved_names(), {"tooltip": "A router file in models/routers."}),
        }}

    @classmethod
    def IS_CHANGED(cls, router_name: str) -> str:
        return cls.saved_digest(router_name)

    def load(self, router_name: str) -> tuple[Router]:
        return (load_router(self.saved_path(router_name)),)


class AtelierLoadSentenceEncoder(ModelsFolder):
    DESCRIPTION = ("Loads a sentence-embedding model (a transformers folder with .safetensors weights, such as "
                   "APTP's all-mpnet-base-v2 saved by sentence-transformers) from models/sentence_encoders, for "
                   "the router nodes' optional sentence_encoder input.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_SENTENCE_ENCODER",)
    RETURN_NAMES = ("sentence_encoder",)
    OUTPUT_TOOLTIPS = ("The encoder; the router nodes embed prompts with it instead of the checkpoint's.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "encoder_name": (list_models("sentence_encoders", cls.models_dir), {
                "tooltip": "A folder in models/sentence_encoders holding config.json, the tokenizer files and "
                           "model.safetensors."}),
        }}

    def load(self, encoder_name: str) -> tuple[SentenceEncoder]:
        folder = resolve_model_path("sentence_encoders", encoder_name, self.models_dir)
        tokenizer, model = load_transformers_folder(folder)
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f"encoder_name {encoder_name!r} has no tokenizer files; a sentence encoder needs them")
        return (SentenceEncoder(tokenizer, model, sentence_encoder_pooling(folder), encoder_name),)


class AtelierRoutePrompt:
    DESCRIPTION = ("Prompt Router: picks the pipeline variant for one prompt, the nearest prototype after a cost "
                   "bias calibrated so that prompts like the router's own average the budget (APTP's router, "
                   "training-free). Feed the branch to a Route Switch.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INT", "STRING", "STRING")
    RETURN_NAMES = ("branch", "label", "prompt")
    OUTPUT_TOOLTIPS = ("The chosen variant's index, for Route Switch.", "The chosen variant's label.",
                       "The prompt, unchanged, so that one text box feeds the router and the prompt encoder.")
    FUNCTION = "route"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder the router was fitted with."}),
            "router": ("ATELIER_ROUTER", {"tooltip": "From Fit Router or Load Router."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "The prompt to route."}),
            "budget": _budget_input(),
        }, "optional": _sentence_encoder_input()}

    def route(self, clip: Any, router: Router, prompt: str, budget: float,
              sentence_encoder: SentenceEncoder | None = None) -> tuple[int, str, str]:
        branch = int(route_single(_route_embeddings(clip, router, [prompt], sentence_encoder), router, budget)[0])
        return branch, router.labels[branch], prompt


class AtelierRoutePrompts:
    DESCRIPTION = ("Prompt Router (batch): routes a list of prompts together with a budgeted Sinkhorn assignment "
                   "and a repair pass, so that the list's mean cost is within ±0.01 of the budget (for 40 prompts "
                   "or more over costs 0.2 to 1).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INT", "STRING", "STRING")
    RETURN_NAMES = ("branches", "labels", "prompts")
    OUTPUT_TOOLTIPS = ("Each prompt's variant index, as a list.", "Each prompt's variant label, as a list.",
                       "The prompts, as a list in the same order.")
    OUTPUT_IS_LIST = (True, True, True)
    FUNCTION = "route"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder the router was fitted with."}),
            "router": ("ATELIER_ROUTER", {"tooltip": "From Fit Router or Load Router."}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompts, one per line."}),
            "budget": _budget_input(),
        }, "optional": _sentence_encoder_input()}

    def route(self, clip: Any, router: Router, prompts: str, budget: float,
              sentence_encoder: SentenceEncoder | None = None) -> tuple[list[int], list[str], list[str]]:
        lines = prompt_lines(prompts)
        branches = route_batch(_route_embeddings(clip, router, lines, sentence_encoder), router, budget).tolist()
        return branches, [router.labels[branch] for branch in branches], lines


class AtelierRouteSwitch:
    DESCRIPTION = ("Route Switch: passes on the input of the chosen branch. Its inputs are lazy, so only the "
                   "chosen branch of the graph runs; the others are never computed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("output",)
    OUTPUT_TOOLTIPS = ("The chosen branch's value, of whatever type the branches carry.",)
    FUNCTION = "switch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {
            "required": {"branch": ("INT", {"default": 0, "min": 0, "max": MAX_BRANCHES - 1, "step": 1,
                                            "tooltip": "Which branch to pass on, from the Prompt Router."})},
            "optional": {f"branch_{index}": (ANY, {"lazy": True, "tooltip": f"Branch {index}; runs only when "
                                                                             f"chosen."})
                         for index in range(MAX_BRANCHES)},
        }

    def check_lazy_status(self, branch: int, **branches: Any) -> list[str]:
        name = f"branch_{branch}"
        return [name] if branches.get(name) is None else []

    def switch(self, branch: int, **branches: Any) -> tuple[Any]:
        name = f"branch_{branch}"
        if not 0 <= branch < MAX_BRANCHES:
            raise ValueError(f"branch must be in [0, {MAX_BRANCHES - 1}]; got {branch}")
        if branches.get(name) is None:
            raise ValueError(f"branch {branch} was chosen but its input {name} is not connected; connect it, or "
                             f"give the router only as many variants as there are connected branches")
        return (branches[name],)


def _aptp_folder_input(models_dir: str | None) -> tuple[list[str], dict]:
    return (list_models(APTP_FOLDER, models_dir), {
        "tooltip": "An APTP pruning folder in models/aptp, as published (e.g. APTP-Base-CC3M): hypernet/ and "
                   "quantizer/ (the router) beside arch0/, arch1/, … (the experts' UNets)."})


class AtelierAptpRoutePrompt(ModelsFolder):
    DESCRIPTION = ("APTP Expert Router: sends a prompt to the pruned SD2.1 expert APTP's trained router picks "
                   "(all-mpnet-base-v2 embedding → hypernetwork → Gumbel-sigmoid gates with the authors' fixed "
                   "noise → nearest architecture code by cosine). Feed the expert to Load APTP Expert.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INT", "STRING", "STRING")
    RETURN_NAMES = ("expert", "label", "prompt")
    OUTPUT_TOOLTIPS = ("The expert's index K (its folder is arch<K>), for Load APTP Expert.",
                       "The expert's folder name, arch<K>.",
                       "The prompt, unchanged, so that one text box feeds the router and the prompt encoder.")
    FUNCTION = "route"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "sentence_encoder": ("ATELIER_SENTENCE_ENCODER", {
                "tooltip": "all-mpnet-base-v2 (models/sentence_encoders), the encoder APTP's router was trained on."}),
            "aptp_name": _aptp_folder_input(cls.models_dir),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "The prompt to route."}),
        }}

    def route(self, sentence_encoder: SentenceEncoder, aptp_name: str, prompt: str) -> tuple[int, str, str]:
        router = load_aptp_router(resolve_model_path(APTP_FOLDER, aptp_name, self.models_dir))
        expert = int(route_experts(sentence_embeddings(sentence_encoder, [prompt]), router)[0])
        return expert, f"arch{expert}", prompt


class AtelierAptpExpert(ModelsFolder):
    DESCRIPTION = ("Load APTP Expert: SD2.1 768-v (the checkpoint: text encoder and VAE) with the UNet of one of "
                   "APTP's pruned experts, rebuilt at its pruned widths and depth from the file. The expert index "
                   "usually comes from APTP Expert Router. Sample as SD2.1: the authors use PNDM, 25 steps, CFG "
                   "7.5, 768².")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The expert's diffusion model.", "The checkpoint's text encoder.", "The checkpoint's VAE.")
    FUNCTION = "load_expert"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "ckpt_name": (list_checkpoints(cls.models_dir), {
                "tooltip": "Stable Diffusion 2.1 (768-v), the model APTP's experts were pruned from."}),
            "aptp_name": _aptp_folder_input(cls.models_dir),
            "expert": ("INT", {"default": 0, "min": 0, "max": MAX_APTP_EXPERT, "step": 1,
                               "tooltip": "Which expert: the K of its arch<K> folder."}),
        }}

    def load_expert(self, ckpt_name: str, aptp_name: str, expert: int) -> tuple[Any, Any, Any]:
        folder = resolve_model_path(APTP_FOLDER, aptp_name, self.models_dir)
        return load_checkpoint_with_unet(resolve_checkpoint(ckpt_name, self.models_dir),
                                         expert_unet_file(folder, expert), self.models_dir)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    AtelierFitRouter, AtelierSaveRouter, AtelierLoadRouter, AtelierLoadSentenceEncoder, AtelierRoutePrompt,
    AtelierRoutePrompts, AtelierRouteSwitch, AtelierAptpRoutePrompt, AtelierAptpExpert)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierFitRouter": "Fit Router (Atelier)", "AtelierSaveRouter": "Save Router (Atelier)",
    "AtelierLoadRouter": "Load Router (Atelier)", "AtelierLoadSentenceEncoder": "Load Sentence Encoder (Atelier)",
    "AtelierRoutePrompt": "Prompt Router (Atelier)",
    "AtelierRoutePrompts": "Prompt Router, batch (Atelier)", "AtelierRouteSwitch": "Route Switch (Atelier)",
    "AtelierAptpRoutePrompt": "APTP Expert Router (Atelier)", "AtelierAptpExpert": "Load APTP Expert (Atelier)",
}
