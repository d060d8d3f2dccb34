"""A cache of extracted feature maps, keyed by the image's content, the model, t and the layers.

Extraction (a VAE encode and a UNet pass, or a ViT pass) is the dear part of a match; one image is often matched
against several others, so its features are kept. Like the model cache (``nodes.models.loading``), it is one shared
store per process, bounded in bytes, least recently used first out; the memory manager counts it with the models
and empties it when it is what was least recently used and room is needed (``nodes.common.memory``).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable, Hashable

import torch

from ..common.memory import MEMORY, device_key
from .features import FeatureMaps

DEFAULT_CACHE_BYTES = 2 << 30  # 2 GiB: SD1.5's three layers at 960² are 22 MB per image, DINOv2-B's 11 MB


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes: the same pixels give the same key on any device.

    Example:
        >>> zeros = tensor_digest(torch.zeros(2))
        >>> zeros == tensor_digest(torch.zeros(2)), zeros == tensor_digest(torch.zeros(3))
        (True, False)
    """
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)} {data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _size_of(maps: FeatureMaps) -> int:
    return sum(layer.numel() * layer.element_size() for layer in maps.layers)


class FeatureCache:
    """An LRU of :class:`FeatureMaps` bounded by their total size in bytes; safe to share between threads.

    Example:
        >>> cache = FeatureCache(max_bytes=1 << 20)
        >>> make = lambda: FeatureMaps((torch.zeros(1, 2, 2),), "demo", (4, 4))
        >>> cache.get_or_compute(("img", "demo"), make) is cache.get_or_compute(("img", "demo"), make)
        True
    """

    name = "correspondence feature cache"

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, FeatureMaps] = collections.OrderedDict()
        self._bytes = 0
        self._by_device: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        MEMORY.add_store(self)

    def bytes_on(self, device: str) -> int:
        """Bytes of the cached maps on ``device`` (``"cpu"``, ``"cuda:0"``): the memory manager counts them."""
        return self._by_device[device]

    def _count(self, maps: FeatureMaps, sign: int) -> None:
        size = _size_of(maps)
        self._bytes += sign * size
        if maps.layers:
            self._by_device[device_key(maps.layers[0].device)] += sign * size

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, key: Hashable, compute: Callable[[], FeatureMaps]) -> FeatureMaps:
        """The cached maps for ``key``, or ``compute()``'s, stored (unless larger than the whole budget)."""
        with self._lock:
            maps = self._entries.get(key)
            if maps is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if maps is not None:
            MEMORY.touched(self)
            return maps
        maps = compute()  # outside the lock: another node may use the cache meanwhile
        with self._lock:
            if key not in self._entries and _size_of(maps) <= self.max_bytes:
                self._entries[key] = maps
                self._count(maps, +1)
                while self._bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self._count(dropped, -1)
        MEMORY.touched(self)  # outside the lock: making room may call clear() of another store
        return maps

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._by_device.clear()


FEATURE_CACHE = FeatureCache()
