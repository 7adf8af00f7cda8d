"""A small bounded in-process cache of loaded models (least recently used goes first).

One group often needs the same file twice (a checkpoint's MODEL for the sampler and its VAE for decoding);
the loaders keep their last few results here, keyed by the file's identity (path, mtime, size) and how it was
loaded. :func:`clear_all` forgets every cache (the next load reads the files again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_ALL: list[ModelCache] = []


class ModelCache(Generic[V]):
    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.RLock()
        _ALL.append(self)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def find(self, match: Callable[[Hashable, V], bool]) -> V | None:
        """The most recently used entry that ``match(key, value)`` accepts."""
        with self._lock:
            for key, value in reversed(self._entries.items()):
                if match(key, value):
                    self._entries.move_to_end(key)
                    return value
            return None

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def clear_all() -> None:
    for cache in _ALL:
        cache.clear()
