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

Memory and distributed runs: :mod:`.collected` (maps and masks off the C heap; rank 0 gathers
every rank's share, drops the images ``DistributedSampler`` padded in, and puts the images in one
order by category and path, so the table does not depend on how the test set was split).

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
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from anomalib.metrics.evaluator import Evaluator
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_vqflow.evaluation.collected import (
    CollectedOutputs,
    is_distributed,
    merge_collected_outputs,
    off_heap_array,
    off_heap_copy,
    to_numpy,
)
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
        scores = to_numpy(scores, torch.float64).reshape(-1)
        size = scores.size
        outputs.scores.append(scores)
        outputs.labels.append(to_numpy(labels, torch.bool).reshape(size))
        outputs.categories.extend(self._batch_categories(batch, size))
        paths = getattr(batch, "image_path", None)
        outputs.paths.extend([None] * size if paths is None else [str(path) for path in paths])

        anomaly_map = getattr(batch, "anomaly_map", None)
        if anomaly_map is None:
            outputs.images_without_maps += size
            return
        maps = off_heap_copy(anomaly_map, torch.float32)
        maps = maps.reshape(size, *maps.shape[-2:])  # (B, H, W) or (B, 1, H, W)
        gt_mask = getattr(batch, "gt_mask", None)
        if gt_mask is None:
            # No annotation is an all-normal mask; a category with only such masks gets NaN pixel metrics.
            masks = off_heap_array(maps.shape, np.dtype(bool))
        else:
            masks = off_heap_copy(gt_mask, torch.bool)
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
        if not is_distributed():
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
