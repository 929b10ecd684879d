"""The evaluator's collected test outputs: off the C heap while collecting, one order after merging.

Memory: per test image it keeps the score, the label, the category, the path and, for pixel
metrics, the map as float32 and the mask as bool (5 bytes per pixel), nothing more, the maps
and masks in memory maps of their own (outside the C heap, which they would otherwise keep
from shrinking). The batches are merged into one array per field at the end, batch by batch,
so the merge adds one batch to the peak. The exact pixel metrics then sort every pixel of a
category, and of all categories for the pooled row: ``benchmarks/evaluation_memory.py``
measures the peak.

Distributed runs (Lightning's DDP): every process collects its own share; at the end of the
test epoch rank 0 gathers all of them, drops the images that ``DistributedSampler`` padded in
to give every rank the same number (a second copy of an image path already seen), computes
the table and sends it to the other ranks, so every rank logs and returns the same values.
The images are put in one order before the metrics, by category and path, so the table does
not depend on how the test set was split over processes or batches.

Example:
    >>> import numpy as np
    >>> part = CollectedOutputs(scores=[np.array([0.5, 0.1])], labels=[np.array([True, False])],
    ...                         categories=["screw", "bottle"], paths=["s/1.png", "b/0.png"])
    >>> merge_collected_outputs([part]).categories
    ['bottle', 'screw']
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def to_numpy(value: Any, dtype: torch.dtype) -> np.ndarray:
    """Return a fresh CPU copy of ``value`` as ``dtype`` (the post-processor may later change the batch in place)."""
    return torch.as_tensor(value).detach().to(device="cpu", dtype=dtype, copy=True).numpy()


def off_heap_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Return a zero array in an anonymous memory map of its own, released with the array.

    Why: kept between the freed temporaries of every test step, megabyte-sized blocks on the
    C heap pin the heap's freed space, so a test run's resident memory grew by twice what the
    evaluator holds (measured: 0.72 instead of 0.31 MiB per 256 px image).
    """
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(count, 1) * dtype.itemsize)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def off_heap_copy(value: Any, dtype: torch.dtype) -> np.ndarray:
    """Copy ``value`` to the CPU as ``dtype``, into an array of :func:`off_heap_array`."""
    tensor = torch.as_tensor(value).detach()
    array = off_heap_array(tuple(tensor.shape), torch.empty(0, dtype=dtype).numpy().dtype)
    torch.from_numpy(array).copy_(tensor)
    return array


def is_distributed() -> bool:
    """Whether this process is one of several of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class CollectedOutputs:
    """The raw test outputs that one process collected: arrays per batch, identity per image.

    Example:
        >>> import numpy as np
        >>> part = CollectedOutputs(scores=[np.array([0.5, 0.1])], labels=[np.array([True, False])],
        ...                         categories=["b", "a"], paths=["d/b/test/bad/0.png", "d/a/test/good/0.png"])
        >>> merge_collected_outputs([part]).categories  # one order, by category and path
        ['a', 'b']
    """

    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    images_without_maps: int = 0


def _scatter(chunks: list[np.ndarray], rows: np.ndarray, count: int, what: str) -> np.ndarray:
    """Write the batches ``chunks`` into one array, image ``i`` to row ``rows[i]`` (dropped where -1).

    The chunks (at least one) are released one by one, so the merge holds at most one batch more
    than the result.
    """
    merged = np.empty((count, *chunks[0].shape[1:]), dtype=chunks[0].dtype)
    start = 0
    while chunks:
        chunk = chunks.pop(0)
        if chunk.shape[1:] != merged.shape[1:]:
            msg = f"{what} differ in size between batches: {chunk.shape[1:]} and {merged.shape[1:]}; resize them"
            raise ValueError(msg)
        target = rows[start : start + len(chunk)]
        start += len(chunk)
        kept = target >= 0
        merged[target[kept]] = chunk[kept]
    return merged


def merge_collected_outputs(parts: list[CollectedOutputs]) -> CollectedOutputs:
    """One set of outputs from the parts of several processes (or one): one array per field.

    An image path seen before is a copy that ``DistributedSampler`` padded in and is dropped.
    The images are ordered by category and path, so the result does not depend on how the test
    set was split over processes and batches. Without paths nothing can be matched: the images
    stay in collection order and none is dropped. The parts' arrays are released while merging.
    """
    categories = [category for part in parts for category in part.categories]
    paths = [path for part in parts for path in part.paths]
    if not paths:
        return CollectedOutputs()
    if all(path is not None for path in paths):
        first_of_path = {path: index for index, path in reversed(list(enumerate(paths)))}
        order = sorted(first_of_path.values(), key=lambda index: (categories[index], paths[index]))
    else:
        if len(parts) > 1:
            logger.warning(
                "Test batches without `image_path`: images that DistributedSampler repeats to even out the "
                "ranks cannot be recognised and count twice."
            )
        order = list(range(len(paths)))
    rows = np.full(len(paths), -1, dtype=np.int64)
    rows[order] = np.arange(len(order))
    without_maps = sum(part.images_without_maps for part in parts)
    merged = CollectedOutputs(
        scores=[_scatter(_take(parts, "scores"), rows, len(order), "scores")],
        labels=[_scatter(_take(parts, "labels"), rows, len(order), "labels")],
        categories=[categories[index] for index in order],
        paths=[paths[index] for index in order],
        images_without_maps=without_maps,
    )
    if without_maps == 0 and any(part.maps for part in parts):
        merged.maps = [_scatter(_take(parts, "maps"), rows, len(order), "anomaly maps")]
        merged.masks = [_scatter(_take(parts, "masks"), rows, len(order), "masks")]
    return merged


def _take(parts: list[CollectedOutputs], name: str) -> list[np.ndarray]:
    """Remove the batches of field ``name`` from every part and return them, so that merging can free them."""
    chunks = [chunk for part in parts for chunk in getattr(part, name)]
    for part in parts:
        getattr(part, name).clear()
    return chunks
