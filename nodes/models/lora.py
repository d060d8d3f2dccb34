"""Apply and remove LoRAs on a loaded model without reloading it and without touching its base weights.

Each LoRA is kept as a separate low-rank branch beside the layer it adapts, y = W·x + s·B(A·x), as a named
adapter (diffusers' PEFT integration: ``load_lora_weights``, ``set_adapters``, ``disable_lora``,
``unload_lora_weights``). Switching LoRAs or strengths is then a change of which branches run, not a reload
or a weight patch, and removing every LoRA gives the base model back bit for bit. This is SwiftDiffusion's
"no weight patching" hot-swap (techniques.md §4.14 (c)).

Adapters stay resident on the :class:`~nodes.models.loaded.LoadedModel` once loaded; :func:`set_loras` chooses
which run, with what strengths. Because one loaded model is shared by every node that loads the same file, a
caller activates its own LoRA list right before it runs the model (``set_loras(model, specs)``; an empty list
runs the base weights).

LoRA files are read on a background thread (:data:`LORA_READS`, SwiftDiffusion's asynchronous loading): the
LoRA nodes start the read, the graph goes on (prompts are encoded, latents made) and the sampler takes the
tensors when it needs them, waiting only for what is left. A LoRA marked ``when_ready`` does not even make it wait:
sampling starts on the base weights and the LoRA comes in at the first step boundary after its read finished
(``nodes.sampling.guiders``). At most :data:`MAX_RESIDENT_LORAS` adapters stay resident per model.

Requires the ``peft`` package (diffusers' LoRA backend).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

from .formats import check_safetensors
from .loaded import MAX_LORA_STRENGTH as MAX_STRENGTH  # noqa: F401  (nodes read the bound as lora.MAX_STRENGTH)
from .loaded import LoadedModel, LoraAdapter, LoraSpec
from .offline import quiet_loading

logger = logging.getLogger(__name__)

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MAX_RESIDENT_LORAS = 8  # adapters per model; the least recently run go first (each is a few to a few hundred MB)
MAX_READS_AHEAD = MAX_RESIDENT_LORAS  # LoRA files read and not yet taken; older ones are dropped (read again if asked)
MESSAGE_LINES = 3  # of a diffusers loading error, quoted in ours


def _require_peft() -> None:
    try:
        import peft  # noqa: F401  (only whether it imports)
    except ImportError as error:
        raise ImportError("LoRAs need the 'peft' package (diffusers' LoRA backend): pip install peft") from error


def _signature(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _adapter_name(path: str, signature: tuple[int, int]) -> str:
    # PEFT keeps adapters in ModuleDicts keyed by name: no dots. A hash of the file's identity is stable and unique.
    digest = hashlib.sha1(f"{path}|{signature}".encode()).hexdigest()[:12]
    return f"lora_{digest}"


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA's tensors into CPU memory without touching any model.

    Safe to call on a background thread while the model runs; :func:`load_lora` then only injects them.

    Raises:
        FileNotFoundError: no such file.
        nodes.models.formats.UnsafeModelFormatError: not a ``.safetensors`` file.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    check_safetensors(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {path!r}")
    return load_file(path)


class LoraReads:
    """LoRA files read into CPU memory on one background thread, a bounded few ahead of their use.

    Args:
        read: reads a file's tensors (:func:`read_lora_file`; tests slow it down).
        ahead: at most this many reads kept untaken; the oldest is dropped beyond it.
    """

    def __init__(self, read: Callable[[str], dict[str, torch.Tensor]] = read_lora_file, ahead: int = MAX_READS_AHEAD):
        self._read = read
        self._ahead = ahead
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-read")
        self._reads: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str) -> tuple:
        path = os.path.realpath(os.fspath(path))
        return path, _signature(path) if os.path.isfile(path) else None

    def start(self, path: str | os.PathLike) -> concurrent.futures.Future:
        """Start reading ``path`` (once: a read under way or done and untaken is reused)."""
        key = self._key(path)
        with self._lock:
            if key not in self._reads:
                self._reads[key] = self._pool.submit(self._read, key[0])
                while len(self._reads) > self._ahead:
                    _, dropped = self._reads.popitem(last=False)
                    dropped.cancel()
            return self._reads[key]

    def ready(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` has been read (or failed to be: taking it raises the error)."""
        with self._lock:
            read = self._reads.get(self._key(path))
        return read is not None and read.done()

    def take(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """``path``'s tensors: from the read under way (waiting for what is left of it), or read now."""
        with self._lock:
            read = self._reads.pop(self._key(path), None)
        if read is None or read.cancelled():
            return self._read(os.path.realpath(os.fspath(path)))
        return read.result()


LORA_READS = LoraReads()


def find_adapter(model: LoadedModel, path: str | os.PathLike) -> LoraAdapter | None:
    """The resident adapter of LoRA file ``path`` on ``model``, if it is loaded and unchanged on disk."""
    path = os.path.realpath(os.fspath(path))
    signature = _signature(path) if os.path.isfile(path) else None
    for adapter in list(model.lora_adapters.values()):  # a copy: a node may ask while a run switches LoRAs
        if adapter.path == path and adapter.signature == signature:
            return adapter
    return None


def load_lora(model: LoadedModel, path: str | os.PathLike,
              tensors: dict[str, torch.Tensor] | None = None) -> LoraAdapter:
    """Make LoRA file ``path`` resident on ``model`` as a named adapter; what runs is left as it was.

    Accepts the formats diffusers reads: kohya/A1111 (``lora_unet_…``, ``lora_te_…``), diffusers and PEFT.

    Args:
        model: the loaded model to add it to.
        path: a ``.safetensors`` LoRA file.
        tensors: its tensors, if already read by :func:`read_lora_file` (for example on a background thread);
            by default the file is read here.
    Returns:
        The adapter; the same one if the file is already resident and unchanged.
    Raises:
        nodes.models.formats.UnsafeModelFormatError: not a ``.safetensors`` file.
        ValueError: the LoRA does not fit this model (another family, or no layer of it matched).
        ImportError: ``peft`` is not installed.
    """
    _require_peft()
    path = os.path.realpath(os.fspath(path))
    check_safetensors(path)
    existing = find_adapter(model, path)
    if existing is not None:
        return existing
    stale = [adapter for adapter in model.lora_adapters.values() if adapter.path == path]
    if stale:  # the file changed on disk since it was loaded: drop the old contents first
        logger.info("LoRA %s changed on disk; reloading it", os.path.basename(path))
        _drop_adapters(model, [adapter.name for adapter in stale])
        model.active_loras = tuple(spec for spec in model.active_loras if os.path.realpath(spec.path) != path)
    if tensors is None:
        tensors = LORA_READS.take(path)
    signature = _signature(path)
    name = _adapter_name(path, signature)
    pipeline = model.pipeline
    try:
        with warnings.catch_warnings(), quiet_loading():
            # PEFT warns whenever a second adapter joins a model; several resident adapters are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # load_lora_weights pops entries from the dict it is given: hand it a shallow copy.
            pipeline.load_lora_weights(dict(tensors), adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as error:
        _delete_partial(model, name)
        lines = str(error).splitlines()  # a shape mismatch lists every layer: keep the first ones
        detail = " ".join(line.strip() for line in lines[:MESSAGE_LINES])
        if len(lines) > MESSAGE_LINES:
            detail += f" … and {len(lines) - MESSAGE_LINES} more lines"
        raise ValueError(f"LoRA {os.path.basename(path)!r} does not fit this {model.family} model: {detail}") from error
    components = tuple(component for component, names in pipeline.get_list_adapters().items() if name in names)
    if not components:
        _delete_partial(model, name)
        raise ValueError(f"LoRA {os.path.basename(path)!r} matched no layer of this {model.family} model; "
                         f"is it a LoRA for another family?")
    adapter = LoraAdapter(name, path, signature, components)
    model.lora_adapters[name] = adapter
    _activate(model, model.active_loras)  # loading switched the new adapter on; restore what was running
    logger.info("LoRA %s resident on %s (%s)", os.path.basename(path), model.label,
                ", ".join(components))
    return adapter


def _delete_partial(model: LoadedModel, name: str) -> None:
    """Remove whatever part of a failed load was injected, so the model is as it was."""
    present = {adapter for names in model.pipeline.get_list_adapters().values() for adapter in names}
    if name in present:
        model.pipeline.delete_adapters(name)
    if not model.lora_adapters:
        model.pipeline.unload_lora_weights()


def _merge(specs: Sequence[LoraSpec]) -> list[LoraSpec]:
    """One entry per file; the same file twice adds its strengths (the branches are linear in s, so this is exact)."""
    merged: dict[str, LoraSpec] = {}
    for spec in specs:
        path = os.path.realpath(spec.path)
        if path in merged:
            first = merged[path]
            spec = LoraSpec(path, first.strength_model + spec.strength_model, first.strength_clip + spec.strength_clip,
                            first.when_ready and spec.when_ready)
        merged[path] = dataclasses.replace(spec, path=path)
    return list(merged.values())


def _activate(model: LoadedModel, specs: Sequence[LoraSpec]) -> None:
    """Switch exactly ``specs``' adapters on, each component with its strength; everything else off."""
    from diffusers.loaders.lora_base import (disable_lora_for_text_encoder, enable_lora_for_text_encoder,
                                             set_adapters_for_text_encoder)

    if not model.lora_adapters:
        return  # no adapter layers exist: the model is its base
    by_path = {adapter.path: adapter for adapter in model.lora_adapters.values()}
    adapters = [(by_path[os.path.realpath(spec.path)], spec) for spec in specs]
    pipeline = model.pipeline
    for component in LORA_COMPONENTS:
        module = getattr(pipeline, component, None)
        if module is None or not any(component in adapter.components for adapter in model.lora_adapters.values()):
            continue
        chosen = [(adapter.name, spec.strength_model if component == "unet" else spec.strength_clip)
                  for adapter, spec in adapters if component in adapter.components]
        names, weights = [name for name, _ in chosen], [weight for _, weight in chosen]
        if component == "unet":
            if names:
                module.enable_lora()
                module.set_adapters(names, weights)
            else:
                module.disable_lora()
        elif names:
            enable_lora_for_text_encoder(module)
            set_adapters_for_text_encoder(names, module, weights)
        else:
            disable_lora_for_text_encoder(module)


def set_loras(model: LoadedModel, specs: Sequence[LoraSpec]) -> None:
    """Run exactly these LoRAs on ``model`` from now on, loading any that are not resident yet.

    An empty list runs the base weights (the adapters stay resident, switched off). The same file listed twice
    acts once with the summed strengths.

    Raises:
        see :func:`load_lora`.
    """
    specs = _merge(specs)
    for spec in specs:
        adapter = load_lora(model, spec.path)
        model.lora_adapters[adapter.name] = model.lora_adapters.pop(adapter.name)  # most recently run last
    running = {os.path.realpath(spec.path) for spec in specs}
    idle = [adapter.name for adapter in model.lora_adapters.values() if adapter.path not in running]
    excess = len(model.lora_adapters) - MAX_RESIDENT_LORAS
    if excess > 0 and idle:
        logger.info("%d LoRA adapters resident on %s; unloading the %d least recently run",
                    len(model.lora_adapters), model.label, min(excess, len(idle)))
        _drop_adapters(model, idle[:excess])
    _activate(model, specs)
    model.active_loras = tuple(specs)


def prefetch_lora(model: LoadedModel, path: str | os.PathLike) -> None:
    """Start reading LoRA file ``path`` on the background thread, unless it is resident on ``model``: the LoRA
    nodes call this, so that the graph goes on while the file is read and the sampler takes what was read."""
    if find_adapter(model, path) is None:
        LORA_READS.start(path)


def ready_loras(model: LoadedModel, specs: Sequence[LoraSpec]) -> tuple[LoraSpec, ...]:
    """``specs`` less the ``when_ready`` ones that are neither resident on ``model`` nor read yet (whose reads
    this starts): what a run sets with :func:`set_loras` now, the rest coming in at a later step boundary."""
    ready = []
    for spec in specs:
        if spec.when_ready and find_adapter(model, spec.path) is None and not LORA_READS.ready(spec.path):
            LORA_READS.start(spec.path)
        else:
            ready.append(spec)
    return tuple(ready)


def remove_lora(model: LoadedModel, path: str | os.PathLike) -> None:
    """Unload one LoRA from ``model`` (and stop running it); removing the last restores the original layers.

    Raises:
        ValueError: that LoRA is not resident on ``model``.
    """
    path = os.path.realpath(os.fspath(path))
    names = [adapter.name for adapter in model.lora_adapters.values() if adapter.path == path]
    if not names:
        resident = sorted(os.path.basename(adapter.path) for adapter in model.lora_adapters.values())
        raise ValueError(f"LoRA {os.path.basename(path)!r} is not loaded on this model; loaded: {resident or 'none'}")
    model.active_loras = tuple(spec for spec in model.active_loras if os.path.realpath(spec.path) != path)
    _drop_adapters(model, names)
    _activate(model, model.active_loras)


def _drop_adapters(model: LoadedModel, names: list[str]) -> None:
    """Delete adapters; when none remain, take the adapter layers out so the original modules are back."""
    for name in names:
        del model.lora_adapters[name]
    if model.lora_adapters:
        model.pipeline.delete_adapters(names)
    else:
        model.pipeline.unload_lora_weights()
