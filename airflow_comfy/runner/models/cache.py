"""A small bounded in-process cache of loaded models (least recently used goes first).

One group often needs the same file twice (a checkpoint's MODEL for the sampler and its VAE for decoding);
the loaders keep their last few results here, keyed by the file's content (its SHA-256, see
:func:`~airflow_comfy.runner.models.files.file_key`: one entry for one file under two names, a new load for a
file changed in place) and how it was loaded (components, device, dtype). :func:`clear_all` forgets every
cache (the next load reads the files again).

A runner subprocess bounds each cache by its number of entries (``size``). A runner service
(:mod:`airflow_comfy.runner.service`) keeps models across jobs and bounds them by memory instead:
:func:`set_memory_budget` makes every cache of the process share one budget of bytes (the tensors of the
modules an entry holds), and the least recently used entry of any cache goes first when a new one does not fit.
An entry larger than the whole budget is not kept. :func:`stats` counts hits and misses, for the service's log.
"""

from __future__ import annotations

import gc
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")
_ALL: list[ModelCache] = []
_GLOBAL_LOCK = threading.RLock()
_TICKS = itertools.count()
_budget: int | None = None


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    nbytes: int
    budget: int | None


class ModelCache(Generic[V]):
    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._nbytes: dict[Hashable, int] = {}
        self._used: dict[Hashable, int] = {}
        self._lock = _GLOBAL_LOCK  # one lock: eviction under a budget looks at every cache
        self.hits = 0
        self.misses = 0
        with _GLOBAL_LOCK:
            _ALL.append(self)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._entries:
                self.misses += 1
                return None
            self._touch(key)
            self.hits += 1
            return self._entries[key]

    def find(self, match: Callable[[Hashable, V], bool]) -> V | None:
        """The most recently used entry that ``match(key, value)`` accepts."""
        with self._lock:
            for key, value in reversed(self._entries.items()):
                if match(key, value):
                    self._touch(key)
                    self.hits += 1
                    return value
            self.misses += 1
            return None

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._touch(key)
            if _budget is None:
                while len(self._entries) > self.size:
                    self._drop(next(iter(self._entries)))
                return
            self._nbytes[key] = tensor_bytes(value)
            if self._nbytes[key] > _budget:
                self._drop(key)
                return
            _evict_to(_budget)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def nbytes(self) -> int:
        """Bytes of the entries, as measured when they were put under a budget (0 without one)."""
        with self._lock:
            return sum(self._nbytes.get(key, 0) for key in self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes.clear()
            self._used.clear()
        forget()

    def _touch(self, key: Hashable) -> None:
        self._entries.move_to_end(key)
        self._used[key] = next(_TICKS)

    def _drop(self, key: Hashable) -> None:
        del self._entries[key]
        self._nbytes.pop(key, None)
        self._used.pop(key, None)
        forget()

    def _oldest(self) -> tuple[int, Hashable] | None:
        if not self._entries:
            return None
        key = next(iter(self._entries))
        return self._used.get(key, -1), key


def forget() -> None:
    """Let the garbage collector see the objects a runner service froze (``gc.freeze`` after each job, see
    :func:`airflow_comfy.runner.service._free_memory`) again: a model just dropped from a cache may sit in
    reference cycles that only a collection frees."""
    gc.unfreeze()


def _evict_to(budget: int) -> None:
    """Drop the least recently used entries of all caches until they fit in ``budget`` bytes."""
    with _GLOBAL_LOCK:
        while sum(cache.nbytes() for cache in _ALL) > budget:
            candidates = [(oldest, cache) for cache in _ALL if (oldest := cache._oldest()) is not None]
            if not candidates:
                return
            (_, key), cache = min(candidates, key=lambda item: item[0][0])
            cache._drop(key)


def set_memory_budget(nbytes: int | None) -> None:
    """Bound every cache of this process by one budget of ``nbytes`` (the least recently used entry of any
    cache goes first), instead of by its number of entries; None: back to the per-cache sizes. Entries already
    cached are measured now."""
    global _budget
    with _GLOBAL_LOCK:
        _budget = None if nbytes is None else max(0, int(nbytes))
        for cache in _ALL:
            if _budget is None:
                cache._nbytes.clear()
                while len(cache._entries) > cache.size:
                    cache._drop(next(iter(cache._entries)))
            else:
                for key, value in cache._entries.items():
                    cache._nbytes.setdefault(key, tensor_bytes(value))
        if _budget is not None:
            _evict_to(_budget)


def memory_budget() -> int | None:
    return _budget


def stats() -> CacheStats:
    """Hits, misses (since the process started), entries and their bytes, over every cache."""
    with _GLOBAL_LOCK:
        return CacheStats(hits=sum(c.hits for c in _ALL), misses=sum(c.misses for c in _ALL),
                          entries=sum(len(c._entries) for c in _ALL), nbytes=sum(c.nbytes() for c in _ALL),
                          budget=_budget)


def clear_all() -> None:
    for cache in _ALL:
        cache.clear()


# --- how many bytes an entry holds -------------------------------------------------------------------------------


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``value`` through dataclass fields, lists, tuples,
    dicts and ``torch.nn.Module`` parameters and buffers (a module shared twice counts once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _tensors(value, set(), depth=0):
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # meta or sparse tensors: count their elements
            key, size = ("id", id(tensor)), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def _tensors(value: Any, visited: set[int], depth: int) -> Iterator[Any]:
    if depth > 8 or id(value) in visited or value is None or isinstance(value, str | bytes | int | float | bool):
        return
    visited.add(id(value))
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
        yield from value.buffers()
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _tensors(getattr(value, f.name, None), visited, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item, visited, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, visited, depth + 1)
