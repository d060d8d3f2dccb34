"""The result cache: node outputs kept across prompts in an LRU bounded by a memory budget."""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 << 30  # 4 GiB: a few SD latents, images and a model, on a 16-24 GB desktop


@dataclasses.dataclass
class CacheEntry:
    """One node's result: per-output lists of values (ComfyUI's list mechanism), and its UI output."""

    outputs: list[list[Any]]
    ui: dict[str, list] | None
    size: int = 0


class ResultCache:
    """Least-recently-used node results, keyed by input signature, within ``budget_bytes``.

    Example:
        >>> cache = ResultCache(budget_bytes=1000)
        >>> cache.put("a", CacheEntry([[torch.zeros(100)]], None))  # 400 bytes
        >>> cache.put("b", CacheEntry([[torch.zeros(200)]], None))  # 800 bytes: "a" is evicted
        >>> "a" in cache, "b" in cache
        (False, True)
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0; got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()
        self.used_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        entry.size = estimate_bytes([entry.outputs, entry.ui])
        if entry.size > self.budget_bytes:
            logger.debug("result of %d bytes is over the cache budget of %d bytes; not kept",
                         entry.size, self.budget_bytes)
            return
        self.discard(key)
        self._entries[key] = entry
        self.used_bytes += entry.size
        while self.used_bytes > self.budget_bytes:
            self.discard(next(iter(self._entries)))

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry.size

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0


def estimate_bytes(value: Any) -> int:
    """Memory held by ``value``: tensor storages, model weights, arrays and images, walked through containers.

    Example:
        >>> estimate_bytes({"samples": torch.zeros(1, 4, 8, 8)})
        1024
    """
    seen: set[int] = set()
    storages: set[int] = set()  # views share one storage; count it once
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, torch.nn.Module):
            todo.extend(item.parameters())
            todo.extend(item.buffers())
        elif isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, Image.Image):
            total += item.width * item.height * len(item.getbands())
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        else:
            total += sys.getsizeof(item)
    return total
