"""Test-time evaluator that reports the per-category table from RAW model outputs.

Why: Anomalib's default evaluator sees the scores after the ``PostProcessor`` has normalised
them and clamped them to ``[0, 1]`` (creating ties), and it computes one pooled number per
metric. For unified multi-class models we want the per-category table of
:mod:`anomalib_vqflow.evaluation.per_category`, computed from the raw scores.

:class:`UnifiedEvaluator` is an ``anomalib.metrics.Evaluator`` (with no torchmetrics of its
own), so it can be a model's ``evaluator`` component (our models list it BEFORE the
post-processor in ``configure_callbacks``), and it is a Lightning callback, so it also works
for any Anomalib model as ``Engine(callbacks=[UnifiedEvaluator()])``: trainer callbacks run
before the model's callbacks in every hook. It warns when a ``PostProcessor`` would run
first. Validation is left alone (no metrics are computed during validation).

At ``on_test_batch_end`` it copies ``pred_score``, ``gt_label``, ``anomaly_map`` and
``gt_mask`` to CPU (maps as float32, masks as bool, nothing else) together with the
category of every image: the batch's ``category`` field when it has one, otherwise the
folder two above the defect folder of an MVTec-layout path
``<root>/<category>/test/<defect>/<file>``. At ``on_test_epoch_end`` it prints the table,
writes ``metrics_per_category.{csv,json,md}`` into ``trainer.default_root_dir`` (the
versioned run folder under Anomalib's ``Engine``), logs ``<column>`` (mean over
categories), ``pooled_<column>`` and ``<category>/<column>`` with ``pl_module.log_dict``,
keeps the table on ``self.table`` and frees the collected outputs. When another
``Evaluator`` in the run (e.g. a stock model's default one) logs a metric of the same name,
such as ``image_AUROC`` computed on post-processed scores, Lightning refuses the second
``log`` call; this evaluator then logs all its values under ``unified/`` instead and warns.

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
    >>> import torch
    >>> from anomalib.data import ImageBatch
    >>> from anomalib_vqflow.evaluation.callback import UnifiedEvaluator
    >>> evaluator = UnifiedEvaluator()
    >>> batch = ImageBatch(
    ...     image=torch.zeros(4, 3, 8, 8),
    ...     gt_label=torch.tensor([0, 1, 0, 1]),
    ...     pred_score=torch.tensor([31.0, 45.0, 50.0, 52.0]),  # raw scores
    ...     image_path=["d/bottle/test/good/0.png", "d/bottle/test/broken/1.png",
    ...                 "d/screw/test/good/0.png", "d/screw/test/scratch/1.png"],
    ... )
    >>> evaluator.on_test_batch_end(None, None, batch, batch, 0)
    >>> table = evaluator.compute()
    >>> table.categories, table["mean"]["image_AUROC"], table["pooled"]["image_AUROC"]
    (['bottle', 'screw'], 1.0, 0.75)

"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from anomalib.metrics.evaluator import Evaluator
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_vqflow.evaluation.per_category import MetricsTable, compute_metrics_table

logger = logging.getLogger(__name__)

UNKNOWN_CATEGORY = "unknown"
COLLISION_PREFIX = "unified/"


def category_from_path(path: str | PurePath) -> str:
    """Category of an MVTec-layout image path ``<root>/<category>/test/<defect>/<file>``.

    Example:
        >>> category_from_path("/data/MVTecAD/screw/test/thread_top/003.png")
        'screw'

    """
    parts = PurePath(path).parts
    return parts[-4] if len(parts) >= 4 else UNKNOWN_CATEGORY


def _to_numpy(value: Any, dtype: torch.dtype) -> np.ndarray:
    # A fresh CPU copy: the post-processor and visualizer may later change the batch in place.
    return torch.as_tensor(value).detach().to(device="cpu", dtype=dtype, copy=True).numpy()


def _off_heap_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Return a zero array in an anonymous memory map of its own, released with the array.

    Why: kept between the freed temporaries of every test step, megabyte-sized blocks on the
    C heap pin the heap's freed space, so a test run's resident memory grew by twice what the
    evaluator holds (measured: 0.72 instead of 0.31 MiB per 256 px image).
    """
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(count, 1) * dtype.itemsize)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def _off_heap_copy(value: Any, dtype: torch.dtype) -> np.ndarray:
    """Copy ``value`` to the CPU as ``dtype``, into an array of :func:`_off_heap_array`."""
    tensor = torch.as_tensor(value).detach()
    array = _off_heap_array(tuple(tensor.shape), torch.empty(0, dtype=dtype).numpy().dtype)
    torch.from_numpy(array).copy_(tensor)
    return array


def _distributed() -> bool:
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


class UnifiedEvaluator(Evaluator):
    """Collect raw test outputs and report per-category, mean and pooled metrics.

    Args:
        fpr_limit: FPR integration limit of AUPRO.
        output_dir: Folder for ``metrics_per_category.{csv,json,md}``; defaults to
            ``trainer.default_root_dir`` at the end of the test epoch.

    Attributes:
        table: The last computed :class:`MetricsTable`, or ``None``.

    Example:
        >>> from anomalib.engine import Engine
        >>> engine = Engine(callbacks=[UnifiedEvaluator(fpr_limit=0.05)])  # the table for any Anomalib model
    """

    def __init__(self, fpr_limit: float = 0.3, output_dir: str | Path | None = None) -> None:
        super().__init__(val_metrics=None, test_metrics=None)
        self.fpr_limit = fpr_limit
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.table: MetricsTable | None = None
        self._reset()

    def _reset(self) -> None:
        self._outputs = CollectedOutputs()

    def update(self, batch: Any) -> None:
        """Store the raw outputs of one batch (an Anomalib ``Batch`` or any object with its fields)."""
        scores = getattr(batch, "pred_score", None)
        labels = getattr(batch, "gt_label", None)
        if scores is None or labels is None:
            msg = "UnifiedEvaluator needs `pred_score` and `gt_label` in every test batch"
            raise ValueError(msg)
        outputs = self._outputs
        scores = _to_numpy(scores, torch.float64).reshape(-1)
        size = scores.size
        outputs.scores.append(scores)
        outputs.labels.append(_to_numpy(labels, torch.bool).reshape(size))
        outputs.categories.extend(self._batch_categories(batch, size))
        paths = getattr(batch, "image_path", None)
        outputs.paths.extend([None] * size if paths is None else [str(path) for path in paths])

        anomaly_map = getattr(batch, "anomaly_map", None)
        if anomaly_map is None:
            outputs.images_without_maps += size
            return
        maps = _off_heap_copy(anomaly_map, torch.float32)
        maps = maps.reshape(size, *maps.shape[-2:])  # (B, H, W) or (B, 1, H, W)
        gt_mask = getattr(batch, "gt_mask", None)
        if gt_mask is None:
            # No annotation is an all-normal mask; a category with only such masks gets NaN pixel metrics.
            masks = _off_heap_array(maps.shape, np.dtype(bool))
        else:
            masks = _off_heap_copy(gt_mask, torch.bool)
            if masks.size != maps.size or masks.shape[-2:] != maps.shape[-2:]:
                msg = f"anomaly_map {tuple(anomaly_map.shape)} and gt_mask {tuple(gt_mask.shape)} differ in size"
                raise ValueError(msg)
            masks = masks.reshape(maps.shape)
        outputs.maps.append(maps)
        outputs.masks.append(masks)

    @staticmethod
    def _batch_categories(batch: Any, size: int) -> list[str]:
        categories = getattr(batch, "category", None)
        if categories is not None:
            return [str(categories)] * size if isinstance(categories, str) else [str(c) for c in categories]
        paths = getattr(batch, "image_path", None)
        if paths is None:
            logger.warning("Test batch has neither `category` nor `image_path`; using category %r", UNKNOWN_CATEGORY)
            return [UNKNOWN_CATEGORY] * size
        return [category_from_path(path) for path in paths]

    def compute(self) -> MetricsTable:
        """Compute the table from everything collected so far and keep it on ``self.table``.

        In a distributed run every rank must call it (it gathers the outputs of all ranks on
        rank 0); every rank gets the same table.

        Raises:
            RuntimeError: no test outputs were collected (on any rank).
        """
        if self._compute() is None:
            msg = "no test outputs collected"
            raise RuntimeError(msg)
        return self.table

    def _compute(self) -> MetricsTable | None:
        if not _distributed():
            self._outputs = merge_collected_outputs([self._outputs])
            self.table = self._table(self._outputs)
            return self.table
        parts: list[CollectedOutputs] | None = None
        if dist.get_rank() == 0:
            parts = [CollectedOutputs()] * dist.get_world_size()
        dist.gather_object(self._outputs, parts, dst=0)
        table: list[MetricsTable | None] = [None]
        if parts is not None:
            # Rank 0's own outputs arrived in `parts` too: its collected copy goes before the merge.
            self._outputs = CollectedOutputs()
            self._outputs = merge_collected_outputs(parts)
            del parts
            table[0] = self._table(self._outputs)
        dist.broadcast_object_list(table, src=0)
        self.table = table[0]
        return self.table

    def _table(self, outputs: CollectedOutputs) -> MetricsTable | None:
        if not outputs.categories:
            return None
        if outputs.images_without_maps and len(outputs.categories) > outputs.images_without_maps:
            logger.warning(
                "%d test images have no anomaly map; reporting image metrics only", outputs.images_without_maps
            )
        return compute_metrics_table(
            outputs.scores[0],
            outputs.labels[0],
            outputs.categories,
            outputs.maps[0] if outputs.maps else None,
            outputs.masks[0] if outputs.masks else None,
            fpr_limit=self.fpr_limit,
        )

    @staticmethod
    def loggable_metrics(table: MetricsTable) -> dict[str, float]:
        """Metric names and values for the logger: mean, ``pooled_`` and ``<category>/``; NaN left out."""
        names = {"mean": "{column}", "pooled": "pooled_{column}"}
        values = {
            names.get(row, f"{row}/{{column}}").format(column=column): value
            for row, row_values in table.rows.items()
            for column, value in row_values.items()
        }
        # NaN marks "not defined" (e.g. no pixel annotations); loggers would plot it as a value.
        return {name: value for name, value in values.items() if not np.isnan(value)}

    def _names_logged_by_other_evaluators(self, trainer: Trainer) -> set[str]:
        return {
            metric.name
            for callback in trainer.callbacks
            if isinstance(callback, Evaluator) and callback is not self
            for metric in callback.test_metrics
        }

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when a post-processor would change the scores before this evaluator sees them."""
        del pl_module
        callbacks = list(trainer.callbacks)
        position = next((i for i, callback in enumerate(callbacks) if callback is self), None)
        if position is not None and any(isinstance(cb, PostProcessor) for cb in callbacks[:position]):
            logger.warning(
                "UnifiedEvaluator runs after a PostProcessor, so it sees normalised scores clamped to [0, 1] "
                "(ties). Place it before the post-processor, e.g. pass it in Engine(callbacks=[...])."
            )

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forget the outputs and the table of a previous test run."""
        del trainer, pl_module
        self.table = None
        self._reset()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Store the raw outputs of the batch (the step output when it carries the predictions)."""
        del trainer, pl_module, batch_idx, dataloader_idx
        self.update(outputs if getattr(outputs, "pred_score", None) is not None else batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute, print, write and log the table, then free the collected outputs."""
        table = self._compute()
        self._reset()
        if table is None:
            logger.warning("UnifiedEvaluator collected no test outputs; nothing to report")
            return
        if trainer.is_global_zero:
            print(f"\n{table}\n")
            folder = self.output_dir if self.output_dir is not None else Path(trainer.default_root_dir)
            for path in table.write(folder):
                logger.info("Wrote %s", path)
        metrics = self.loggable_metrics(table)
        if clash := self._names_logged_by_other_evaluators(trainer) & metrics.keys():
            logger.warning(
                "Another Evaluator also logs %s; logging the UnifiedEvaluator values under %r",
                sorted(clash),
                COLLISION_PREFIX,
            )
            metrics = {f"{COLLISION_PREFIX}{name}": value for name, value in metrics.items()}
        if trainer.barebones:
            # Lightning disables logging in barebones mode; mirror Evaluator and fill the results directly.
            tensors = {name: torch.tensor(value) for name, value in metrics.items()}
            trainer.callback_metrics.update(tensors)
            trainer.logged_metrics.update(tensors)
        else:
            # Every rank holds the same values: "max" over ranks keeps them exact (a mean might round).
            pl_module.log_dict(metrics, sync_dist=True, reduce_fx="max")
