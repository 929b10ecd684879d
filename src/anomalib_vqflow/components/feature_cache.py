"""A store of frozen-backbone features, one entry per image, computed once and read in every later epoch.

Every model of this package keeps its backbone frozen and trains without augmentation, so
each epoch would decode, resize and run the backbone on the same images again for the same
features; on a CPU that is most of an epoch (``benchmarks/feature_cache.py``).
:class:`FrozenFeatureCache` keeps them instead. Entries are kept as computed (float32): a
cached run trains on exactly the values an uncached one computes, up to the rounding of
batched kernels, and a resumed run fills the cache in the same order and gets the same
values bit for bit.

Entries live in memory up to ``memory_bytes`` (by default a quarter of the machine's memory,
at most 8 GiB); the ones after that go to an unnamed temporary file on disk (deleted with the
cache), read back through the page cache. Sizes per 1,000 images at 256 px with the ``_cpu``
configs are in ``benchmarks/results/feature_cache.md``.

Example:
    >>> import torch
    >>> cache = FrozenFeatureCache(memory_bytes=800)
    >>> cache.put_batch(["a.png", "b.png"], [torch.ones(2, 4, 4, 4), torch.zeros(2, 8, 2, 2)])
    >>> cache.put_batch(["c.png"], [torch.full((1, 4, 4, 4), 2.0), torch.ones(1, 8, 2, 2)])  # over budget: disk
    >>> cache.bytes_in_memory, cache.bytes_on_disk
    (768, 384)
    >>> [tuple(level.shape) for level in cache.get_batch(["c.png", "a.png"])]
    [(2, 4, 4, 4), (2, 8, 2, 2)]
    >>> cache.get_batch(["c.png", "unknown.png"]) is None
    True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

__all__ = ["FrozenFeatureCache", "default_memory_budget"]

_MAX_DEFAULT_MEMORY = 8 * 2**30


def default_memory_budget() -> int:
    """Return a quarter of the machine's physical memory, at most 8 GiB (8 GiB where the size is unknown)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _MAX_DEFAULT_MEMORY
    return min(physical // 4, _MAX_DEFAULT_MEMORY)


# An entry on disk: (offset, shape) of every level.
_DiskEntry = list[tuple[int, tuple[int, ...]]]


class FrozenFeatureCache:
    """Feature maps per image key, in memory up to a budget and in a temporary file beyond it.

    Args:
        memory_bytes: Bytes of features kept in memory; ``None`` for :func:`default_memory_budget`.
        folder: Where the temporary file goes (``None``: the system's temporary folder).

    Example:
        >>> import torch
        >>> cache = FrozenFeatureCache()
        >>> cache.put_batch(["x.png"], [torch.arange(4.0).view(1, 1, 2, 2)])
        >>> "x.png" in cache, len(cache), cache.get_batch(["x.png"])[0].flatten().tolist()
        (True, 1, [0.0, 1.0, 2.0, 3.0])
    """

    def __init__(self, memory_bytes: int | None = None, folder: str | Path | None = None) -> None:
        self.memory_bytes = default_memory_budget() if memory_bytes is None else int(memory_bytes)
        self.folder = folder
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self._in_memory: dict[str, list[torch.Tensor]] = {}
        self._on_disk: dict[str, _DiskEntry] = {}
        self._file: IO[bytes] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._in_memory or key in self._on_disk

    def __len__(self) -> int:
        return len(self._in_memory) + len(self._on_disk)

    def put_batch(self, keys: Sequence[str], features: Sequence[torch.Tensor]) -> None:
        """Store the ``(N, ...)`` feature maps of a batch, image ``i`` under ``keys[i]`` (float32, on the CPU)."""
        levels = [level.detach().to("cpu", torch.float32) for level in features]
        for index, key in enumerate(keys):
            entry = [level[index].contiguous() for level in levels]
            size = sum(level.numel() * level.element_size() for level in entry)
            if self.bytes_in_memory + size <= self.memory_bytes:
                # A copy of its own: a view would keep the whole batch's storage alive.
                self._in_memory[key] = [level.clone() for level in entry]
                self.bytes_in_memory += size
            else:
                self._on_disk[key] = self._write(entry)
                self.bytes_on_disk += size

    def get_batch(self, keys: Sequence[str], device: torch.device | str = "cpu") -> list[torch.Tensor] | None:
        """Return the feature maps of ``keys``, stacked per level on ``device``; ``None`` if any key is missing."""
        if not keys or any(key not in self for key in keys):
            return None
        entries = [self._in_memory[key] if key in self._in_memory else self._read(self._on_disk[key]) for key in keys]
        return [torch.stack(level).to(device) for level in zip(*entries, strict=True)]

    def clear(self) -> None:
        """Drop every entry and the temporary file."""
        self._in_memory.clear()
        self._on_disk.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, entry: list[torch.Tensor]) -> _DiskEntry:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="anomalib_vqflow_features_", dir=self.folder)  # noqa: SIM115
        offsets = []
        for level in entry:
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(level.numpy().tobytes())
            offsets.append((offset, tuple(level.shape)))
        self._file.flush()
        return offsets

    def _read(self, entry: _DiskEntry) -> list[torch.Tensor]:
        levels = []
        descriptor = self._file.fileno()  # type: ignore[union-attr]  # an entry on disk means the file is open
        for offset, shape in entry:
            size = 4 * torch.Size(shape).numel()
            data = bytearray(os.pread(descriptor, size, offset))
            levels.append(torch.frombuffer(data, dtype=torch.float32).view(shape))
        return levels
