"""One memory manager for everything Atelier keeps resident, under a budget per device.

Models (by component: UNet, text encoders, VAE, with their LoRA adapters), DINOv2 and sentence encoders and
LinFusion layers are each a :class:`Resident`: named parts whose bytes are counted on the device they are on; the
correspondence feature cache is a :class:`Store`, counted beside them and emptied when room is needed. A node asks
for the parts it needs for the duration of a call (:meth:`MemoryManager.use`); the manager makes room first,
evicting the least recently used residents that no call is using: from an accelerator to the CPU, then out of
memory altogether. A resident that went out keeps its (empty) modules, so every object that holds them stays
valid; its weights are read back from their file when next used, bit for bit as first loaded.

Sequential offload falls out of this: a text encoder is on the GPU only while a prompt is encoded, and goes back
to the CPU when the UNet needs the room. A part that alone exceeds an accelerator's budget runs there block by
block from the CPU (module-level offload, :func:`streaming_blocks`). Bytes are known before anything is allocated
(from a file's safetensors header for a first load, from the resident's own count after), so the budget holds at
every step; the transient memory of reading a file is not counted (see ``bench/memory.py`` for what it costs).

Inside ComfyUI the manager stands aside (:attr:`MemoryManager.enabled` is false): ComfyUI's own model management
places its models, and a second accounting beside it would fight it.

Example:
    >>> manager = MemoryManager(budgets={"cpu": 3000})
    >>> first = manager.register(Resident("first", {"net": torch.nn.Linear(10, 50)}))  # 2200 bytes
    >>> second = Resident("second", {"net": torch.nn.Linear(10, 10)}, reload=lambda: {"net": torch.nn.Linear(10, 10)})
    >>> _ = manager.register(second)                                                      # 440 bytes
    >>> with manager.use(first):
    ...     manager.used("cpu")
    2640
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

CPU = "cpu"
CPU_RESERVE_BYTES = 4 << 30  # the OS, Python, torch, activations and the result cache live outside the budget
GPU_RESERVE_BYTES = 2 << 30  # activations of a 1024² SDXL step, the CUDA context


class MemoryBudgetError(MemoryError):
    """What is asked for cannot fit the budget, even with everything unused evicted."""


def _size(nbytes: int) -> str:
    """A byte count for messages: MB, or bytes below one MB (tests' tiny budgets).

    Example:
        >>> _size(3 << 20), _size(2200)
        ('3 MB', '2200 bytes')
    """
    return f"{nbytes / 2**20:.0f} MB" if nbytes >= 2**20 else f"{nbytes} bytes"


def device_key(device: torch.device | str) -> str:
    """``"cpu"``, or an accelerator with its index (``"cuda:0"``): the manager keeps one budget per key.

    Example:
        >>> device_key("cpu"), device_key(torch.device("cuda"))
        ('cpu', 'cuda:0')
    """
    device = torch.device(device)
    if device.type == CPU:
        return CPU
    return f"{device.type}:{device.index if device.index is not None else 0}"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each storage counted once (meta tensors count nothing).

    Example:
        >>> module_bytes(torch.nn.Linear(10, 50))  # 500 weights and 50 biases in float32
        2200
    """
    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def streaming_blocks(module: torch.nn.Module, limit: int) -> list[torch.nn.Module]:
    """The blocks ``module`` runs in for module-level offload: its children, each split into its own children
    while over ``limit`` bytes; a module with weights of its own stays whole (they move with it).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Sequential(torch.nn.Linear(10, 10)))
        >>> [type(block).__name__ for block in streaming_blocks(net, 400)]  # the inner Sequential (440 bytes) splits
        ['Linear', 'Linear']
    """
    if _has_own_weights(module) or not any(True for _ in module.children()):
        return [module]
    blocks = []
    for child in module.children():
        size = module_bytes(child)
        if size > limit:
            blocks += streaming_blocks(child, limit)
        elif size:
            blocks.append(child)
    return blocks


def _has_own_weights(module: torch.nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))


def runs_on(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its home if the memory manager keeps it (its weights may be elsewhere, or go
    there block by block), else where its first weight is. Callers put their inputs there."""
    home = MEMORY.home(module)
    if home is not None:
        return home
    return next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device


def adopt_tensors(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Put ``source``'s parameters and buffers (persistent or not) into ``target``, module by module: ``target``
    stays the same object, so whoever holds it sees the restored weights."""
    for name, module in target.named_modules():
        origin = source.get_submodule(name)
        for key in module._parameters:
            module._parameters[key] = origin._parameters[key]
        for key in module._buffers:
            module._buffers[key] = origin._buffers[key]


@dataclasses.dataclass(eq=False)
class _Part:
    module: torch.nn.Module
    nbytes: int
    device: str | None  # None: out of memory (the module's tensors are on the meta device)
    home: str  # where it runs: :meth:`MemoryManager.use` brings it there
    pins: int = 0
    # module-level offload: the accelerator it runs on block by block, its weights staying on the CPU; the hooks
    streamed: str | None = None
    hooks: list = dataclasses.field(default_factory=list)


class Resident:
    """Something kept in memory: named modules (``parts``) that move between devices one by one and leave memory
    together.

    Args:
        name: how the log and the errors name it.
        parts: its modules, as they are now (all on one device).
        reload: fresh copies of the parts, on the CPU, from where they came from (a file); None when they cannot
            come back, in which case going out of memory forgets them for good (:attr:`forgotten`).
        before_drop: called before the parts go out (for example to take LoRA adapter layers out, so that the
            modules have the shape ``reload`` gives).
        home: where the parts run, which :meth:`MemoryManager.use` brings them to; by default where they are.
    """

    def __init__(self, name: str, parts: dict[str, torch.nn.Module],
                 reload: Callable[[], dict[str, torch.nn.Module]] | None = None,
                 before_drop: Callable[[], None] | None = None, home: torch.device | str | None = None):
        if not parts:
            raise ValueError(f"{name}: a resident needs at least one part")
        self.name = name
        self.reload = reload
        self.before_drop = before_drop
        self.forgotten = False
        self._parts = {}
        for key, module in parts.items():
            device = _device_of(module)
            if device is None:
                raise ValueError(f"{name}: part {key!r} has no weights (meta tensors)")
            self._parts[key] = _Part(module, module_bytes(module), device,
                                     home=device_key(home) if home is not None else device)
        self.last_used = 0

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    @property
    def is_out(self) -> bool:
        return all(part.device is None for part in self._parts.values())

    @property
    def in_use(self) -> bool:
        return any(part.pins for part in self._parts.values())

    def nbytes(self, part: str | None = None) -> int:
        """Bytes of one part, or of all of them, wherever they are (also when out: what they take once back)."""
        return self._parts[part].nbytes if part else sum(part.nbytes for part in self._parts.values())

    def bytes_on(self, device: str) -> int:
        return sum(part.nbytes for part in self._parts.values() if part.device == device)

    def device_of(self, part: str) -> str | None:
        return self._parts[part].device

    def home_of(self, part: str) -> str:
        return self._parts[part].home

    def measure(self) -> None:
        """Count the parts' bytes again (after adapters were added to a module or taken out)."""
        for part in self._parts.values():
            if part.device is not None:
                part.nbytes = module_bytes(part.module)

    def _move(self, part: str, device: str) -> None:
        self._unstream(part)
        self._move_module(self._parts[part].module, device)
        self._parts[part].device = device

    @staticmethod
    def _move_module(module: torch.nn.Module, device: str) -> None:
        module.to(device)

    def _stream(self, part: str, device: str, blocks: list[torch.nn.Module]) -> None:
        """Run ``part`` on ``device`` one block at a time: each block's weights go there for its forward and back
        to the CPU after it (what diffusers calls sequential CPU offload, at the granularity of ``blocks``)."""
        held = self._parts[part]
        self._move(part, CPU)
        for block in blocks:
            held.hooks.append(block.register_forward_pre_hook(
                lambda module, args: self._move_module(module, device)))
            held.hooks.append(block.register_forward_hook(
                lambda module, args, output: self._move_module(module, CPU)))
        held.streamed = device

    def _unstream(self, part: str) -> None:
        held = self._parts[part]
        for hook in held.hooks:
            hook.remove()
        held.hooks.clear()
        held.streamed = None

    def streamed_on(self, part: str) -> str | None:
        """The accelerator ``part`` runs on block by block (module-level offload), or None."""
        return self._parts[part].streamed

    def pinned_bytes_on(self, device: str) -> int:
        """Bytes of the parts on ``device`` that a call holds now."""
        return sum(part.nbytes for part in self._parts.values() if part.device == device and part.pins)

    def to_home(self) -> None:
        """Move every part to where it runs, with no accounting (where no manager keeps it)."""
        for name in self.part_names:
            self._move(name, self.home_of(name))

    def _drop(self) -> None:
        for name in self.part_names:
            self._unstream(name)
        if self.before_drop is not None:
            self.before_drop()
            self.measure()  # what comes back is what is left (the adapters taken out are not read back)
        for part in self._parts.values():
            part.module.to("meta")
            part.device = None
        self.forgotten = self.reload is None

    def _restore(self) -> None:
        if self.forgotten:
            raise RuntimeError(f"{self.name} was freed and cannot be read back; load it again")
        fresh = self.reload()
        for key, part in self._parts.items():
            adopt_tensors(part.module, fresh[key])
            part.device = CPU
            part.nbytes = module_bytes(part.module)


class Store(Protocol):
    """A cache of computed tensors the manager counts beside the residents (the correspondence feature cache): it
    says its bytes per device and can be emptied; it calls :meth:`MemoryManager.touched` when used or grown."""

    name: str

    def bytes_on(self, device: str) -> int: ...

    def clear(self) -> None: ...


def _device_of(module: torch.nn.Module) -> str | None:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return None if tensor.is_meta else device_key(tensor.device)
    return CPU


def _announce(message: str) -> None:
    """An offload mode the budget chose, on the running node's progress text (the log has the details)."""
    from .progress import progress_text  # here: progress imports comfy_host, which imports the denoiser module

    progress_text(message)


def default_budget(device: str) -> int | None:
    """What ``device`` has, less a reserve; None (no bound) where the total cannot be read."""
    if device == CPU:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
        return max(total - CPU_RESERVE_BYTES, total // 2)
    if device.startswith("cuda") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return max(total - GPU_RESERVE_BYTES, total // 2)
    return None


class MemoryManager:
    """Residents under a byte budget per device, least recently used out first, never one in use.

    Args:
        budgets: bytes per device key (``"cpu"``, ``"cuda:0"``); a device not named gets :func:`default_budget`.
        enabled: False makes :meth:`use` and :meth:`register` pass through (ComfyUI manages its own memory); by
            default, whether this process is not ComfyUI.
    """

    def __init__(self, budgets: dict[str, int] | None = None, enabled: bool | None = None):
        self._enabled = enabled
        self._residents: list[Resident] = []
        self._owners: dict[int, tuple[Resident, str]] = {}  # id(module) → its resident and part
        self._kept: dict[Hashable, tuple[Any, Resident]] = {}  # what kept() loaded, by its key
        self._stores: dict[int, tuple[Store, int]] = {}  # id → the store and when it was last used
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._loading = threading.Lock()
        self.peak: dict[str, int] = {}  # the most ever counted per device
        self.evictions = 0
        self._budgets: dict[str, int | None] = {}
        for device, budget in (budgets or {}).items():
            self.set_budget(device, budget)

    @property
    def enabled(self) -> bool:
        from .comfy_host import inside_comfyui  # here: comfy_host imports the denoiser module, which imports this

        return not inside_comfyui() if self._enabled is None else self._enabled

    def set_budget(self, device: str, budget: int | None) -> None:
        """Bound ``device``'s residents to ``budget`` bytes (None: no bound), evicting what is over it now
        (what is in use stays, and goes as soon as it is not and room is needed)."""
        if budget is not None and budget < 0:
            raise ValueError(f"the memory budget of {device} must be >= 0 bytes; got {budget}")
        device = device_key(device)
        self._budgets[device] = budget
        if self.enabled:
            with self._lock, contextlib.suppress(MemoryBudgetError):
                self._make_room(device, 0, "the new budget", keep=None)

    def budget(self, device: str) -> int | None:
        device = device_key(device)
        if device not in self._budgets:
            self._budgets[device] = default_budget(device)
        return self._budgets[device]

    def used(self, device: str) -> int:
        """Bytes of residents and stores on ``device`` now, as counted."""
        device = device_key(device)
        with self._lock:
            return (sum(resident.bytes_on(device) for resident in self._residents) +
                    sum(store.bytes_on(device) for store, _ in self._stores.values()))

    def residents(self) -> list[Resident]:
        with self._lock:
            return list(self._residents)

    def owner(self, module: torch.nn.Module) -> tuple[Resident, str] | None:
        """The resident and part that ``module`` is, if it is one."""
        return self._owners.get(id(module))

    def register(self, resident: Resident) -> Resident:
        """Keep ``resident`` (already in memory, as loaded) from now on, evicting others if it does not fit."""
        if not self.enabled:
            return resident
        with self._lock:
            devices = {resident.device_of(name) for name in resident.part_names}
            for device in devices:  # before it counts: a refused resident leaves no trace
                self._make_room(device, resident.bytes_on(device), resident.name, keep=None)
            self._residents.append(resident)
            for name in resident.part_names:
                self._owners[id(resident._parts[name].module)] = (resident, name)
            resident.last_used = next(self._clock)
            for device in devices:
                self._record(device)
        return resident

    def kept(self, key: Hashable, load: Callable[[], tuple[Any, Resident]]) -> Any:
        """What ``load`` gives (a value and the resident holding its modules), loaded once per ``key`` and kept
        until freed; with the manager standing aside, loaded on every call, as the host keeps outputs itself.

        Example: ``MEMORY.kept(("dinov2", folder, signature), lambda: (model, Resident(...)))``.
        """
        if not self.enabled:
            value, resident = load()
            resident.to_home()
            return value
        with self._loading:  # one load at a time, outside the manager's lock: reading a file takes seconds
            with self._lock:
                if key in self._kept and not self._kept[key][1].forgotten:
                    return self._kept[key][0]
            value, resident = load()
            self.register(resident)
            with self._lock:
                self._kept[key] = value, resident
        with self.use(resident):  # to where it runs, room made there first
            pass
        return value

    def add_store(self, store: Store) -> None:
        """Count ``store`` from now on; it is emptied when it is the least recently used and room is needed."""
        if self.enabled:
            with self._lock:
                self._stores[id(store)] = store, next(self._clock)

    def remove_store(self, store: Store) -> None:
        """Stop counting ``store``."""
        with self._lock:
            self._stores.pop(id(store), None)

    def touched(self, store: Store) -> None:
        """``store`` was used or grew: it becomes the most recently used, and others are evicted if it is over."""
        if not self.enabled:
            return
        with self._lock:
            if id(store) not in self._stores:
                return
            self._stores[id(store)] = store, next(self._clock)
            for device in {*self._budgets, CPU}:
                if store.bytes_on(device):
                    try:
                        self._make_room(device, 0, store.name, keep=None, store=store)
                    except MemoryBudgetError:  # what is in use fills the budget: a cache gives way, never a node
                        logger.info("emptied %s: the running prompt's models fill the budget", store.name)
                        store.clear()
                    self._record(device)

    def make_room(self, device: str, nbytes: int, for_what: str) -> None:
        """Evict until ``nbytes`` more fit on ``device`` (before loading something of that size).

        Raises:
            MemoryBudgetError: it cannot fit, even with every resident not in use evicted.
        """
        if self.enabled:
            with self._lock:
                self._make_room(device_key(device), nbytes, for_what, keep=None)

    @contextlib.contextmanager
    def resizing(self, resident: Resident | None) -> Iterator[None]:
        """Around a change of ``resident``'s modules (adapters come or go): nothing moves them meanwhile; then
        they are counted again, and others evicted if they are over."""
        if not self.enabled or resident is None:
            yield
            return
        with self._lock:
            yield
            resident.measure()
            self._settle(resident)

    def home(self, module: torch.nn.Module) -> torch.device | None:
        """Where ``module`` runs, if the manager keeps it (it may be elsewhere, or out, until a call holds it)."""
        owner = self.owner(module) if self.enabled else None
        return None if owner is None else torch.device(owner[0].home_of(owner[1]))

    @contextlib.contextmanager
    def use(self, resident: Resident, parts: Iterable[str] | None = None,
            device: torch.device | str | None = None) -> Iterator[Resident]:
        """Hold ``parts`` (by default all) on ``device`` (by default where each runs: where it was when registered)
        for the duration of the block: read back if out, moved if elsewhere, never evicted until the block ends.

        Raises:
            MemoryBudgetError: they cannot fit, even with every resident not in use evicted.
        """
        names = tuple(parts) if parts is not None else resident.part_names
        if not self.enabled:
            yield resident
            return
        with self._lock:
            for name in names:  # pinned first: making room for one part must not evict the others
                resident._parts[name].pins += 1
            try:
                self._bring(resident, names, device)
            except BaseException:
                for name in names:
                    resident._parts[name].pins -= 1
                raise
        try:
            yield resident
        finally:
            with self._lock:
                for name in names:
                    resident._parts[name].pins -= 1
                resident.last_used = next(self._clock)

    @contextlib.contextmanager
    def use_module(self, module: torch.nn.Module, device: torch.device | str | None = None
                   ) -> Iterator[torch.nn.Module]:
        """:meth:`use` of the resident part that ``module`` is; a module the manager does not keep passes through."""
        owner = self.owner(module) if self.enabled else None
        if owner is None:
            yield module
            return
        resident, name = owner
        with self.use(resident, (name,), device):
            yield module

    def evict(self, resident: Resident) -> None:
        """Take ``resident`` out of memory now (it comes back when next used, if it can)."""
        with self._lock:
            if resident.in_use:
                raise RuntimeError(f"{resident.name} is in use and cannot be evicted")
            self._drop(resident)

    def free_all(self) -> int:
        """Forget every resident not in use (their memory goes once nothing else holds it); returns how many."""
        with self._lock:
            freed = [resident for resident in self._residents if not resident.in_use]
            for resident in freed:
                self._forget(resident)
            for store, _ in self._stores.values():
                store.clear()
        return len(freed)

    def forget(self, resident: Resident) -> None:
        """Stop counting ``resident`` (its owner let it go); its memory is not touched."""
        with self._lock:
            self._forget(resident)

    # --- under the lock ---

    def _forget(self, resident: Resident) -> None:
        if resident in self._residents:
            self._residents.remove(resident)
        for name in resident.part_names:
            self._owners.pop(id(resident._parts[name].module), None)
        for key in [key for key, (_, kept) in self._kept.items() if kept is resident]:
            del self._kept[key]

    def _bring(self, resident: Resident, names: tuple[str, ...], device: torch.device | str | None) -> None:
        if resident.is_out:
            self._make_room(CPU, resident.nbytes(), resident.name, keep=resident)
            logger.info("reading %s back (%s)", resident.name, _size(resident.nbytes()))
            resident._restore()
            self._record(CPU)
        for name in names:
            here = resident.device_of(name)
            target = device_key(device) if device is not None else resident.home_of(name)
            if here == target or resident.streamed_on(name) == target and not self._fits(resident, name, target):
                continue
            if target != CPU and not self._fits(resident, name, target):
                self._stream(resident, name, target)
                continue
            self._make_room(target, resident.nbytes(name), f"{resident.name} ({name})", keep=resident)
            resident._move(name, target)
            self._record(target)

    def _fits(self, resident: Resident, name: str, device: str) -> bool:
        """Whether part ``name`` fits ``device``'s budget beside the parts of its resident that calls hold there."""
        budget = self.budget(device)
        return budget is None or resident.pinned_bytes_on(device) + resident.nbytes(name) <= budget

    def _stream(self, resident: Resident, name: str, device: str) -> None:
        """Module-level offload of a part that alone exceeds ``device``'s budget: it runs there block by block,
        blocks small enough that the largest fits beside what calls hold there, its weights kept on the CPU."""
        room = self.budget(device) - resident.pinned_bytes_on(device)
        blocks = streaming_blocks(resident._parts[name].module, room // 2)
        largest = max(module_bytes(block) for block in blocks)
        what = f"{resident.name} ({name})"
        if largest > room:
            raise MemoryBudgetError(f"{what} has a block of {_size(largest)} that cannot run on {device} within its "
                                    f"budget of {_size(self.budget(device))}; raise --gpu-memory")
        self._make_room(device, largest, what, keep=resident)  # room for the block on its way through
        if resident.device_of(name) != CPU:
            self._make_room(CPU, resident.nbytes(name), what, keep=resident)
        logger.warning("%s (%s) alone exceeds the %s budget of %s: it runs there block by block from the CPU "
                       "(%d blocks, module-level offload; slower)", what, _size(resident.nbytes(name)), device,
                       _size(self.budget(device)), len(blocks))
        _announce(f"low memory: {what} runs on {device} block by block from the CPU (module-level offload)")
        resident._stream(name, device, blocks)
        self._record(CPU)

    def _settle(self, resident: Resident) -> None:
        """After ``resident`` came in or grew: evict others until every device is within its budget again."""
        for device in {resident.device_of(name) for name in resident.part_names} - {None}:
            self._make_room(device, 0, resident.name, keep=resident)
            self._record(device)

    def _make_room(self, device: str, nbytes: int, for_what: str, keep: Resident | None,
                   store: Store | None = None) -> None:
        """Evict until ``nbytes`` more fit on ``device``; never ``keep`` (the resident being brought in) out of the
        CPU, though its parts that no call holds may leave an accelerator (its components take turns there), nor
        ``store`` (the store that grew; it bounds itself)."""
        budget = self.budget(device)
        if budget is None:
            return
        held = keep.pinned_bytes_on(device) if keep is not None else 0
        if held + nbytes > budget:
            raise MemoryBudgetError(
                f"{for_what} needs {_size(held + nbytes)} on {device}, over its memory budget of {_size(budget)}; "
                f"raise the budget (--cpu-memory / --gpu-memory) or use a smaller model")
        while self.used(device) + nbytes > budget:
            victims: list[tuple[int, Any]] = [
                (resident.last_used, resident) for resident in self._residents
                if (resident is not keep or device != CPU) and self._evictable(resident, device)]
            victims += [(used, other) for other, used in self._stores.values()
                        if other is not store and other.bytes_on(device)]
            if not victims:
                busy = ", ".join(resident.name for resident in self._residents if resident.bytes_on(device))
                raise MemoryBudgetError(
                    f"{for_what} needs {_size(nbytes)} more on {device}, but its budget of {_size(budget)} is held "
                    f"by what the running prompt is using ({busy})")
            _, victim = min(victims, key=lambda entry: entry[0])
            if not isinstance(victim, Resident):
                victim.clear()
                self.evictions += 1
                logger.info("emptied %s to make room for %s", victim.name, for_what)
            elif device == CPU:
                self._drop(victim)
            else:
                self._offload(victim, device)

    @staticmethod
    def _evictable(resident: Resident, device: str) -> bool:
        if device == CPU:  # out of memory: all its parts together
            return resident.bytes_on(CPU) > 0 and not resident.in_use
        return any(part.device == device and not part.pins for part in resident._parts.values())

    def _offload(self, resident: Resident, device: str) -> None:
        """Move ``resident``'s unused parts from ``device`` to the CPU, or out when the CPU has no room."""
        moving = [name for name in resident.part_names
                  if resident.device_of(name) == device and not resident._parts[name].pins]
        try:
            self._make_room(CPU, sum(resident.nbytes(name) for name in moving), resident.name, keep=resident)
        except MemoryBudgetError:
            if resident.in_use:
                raise
            self._drop(resident)
            return
        for name in moving:
            resident._move(name, CPU)
        self.evictions += 1
        logger.info("offloaded %s (%s) from %s to the CPU", resident.name, ", ".join(moving), device)
        if resident.in_use:  # its own components make room for each other: the budget chose sequential offload
            _announce(f"low memory: {resident.name} runs its components in turn on {device} (sequential offload)")
        self._record(CPU)

    def _drop(self, resident: Resident) -> None:
        freed = resident.nbytes()
        resident._drop()
        self.evictions += 1
        logger.info("evicted %s (%s) from memory", resident.name, _size(freed))
        if resident.forgotten:
            self._forget(resident)

    def _record(self, device: str) -> None:
        self.peak[device] = max(self.peak.get(device, 0), self.used(device))


MEMORY = MemoryManager()  # the process's manager: the loaders register with it, the nodes use it
