"""Unified multi-class datamodules: one Anomalib datamodule over several categories.

Anomalib 2.7 trains one model per category (``MVTecAD(category="bottle")``). The unified
setting of UniAD, HGAD and VQ-Flow trains one model on the good images of *all*
categories together, without class labels, and reports metrics per category. This
module provides their base (``MultiClassDataModule``) and the datamodule for any folder in
MVTec AD layout (``MultiClassMVTecAD``); VisA, Real-IAD, MVTec AD 2 and your own folders have
theirs beside it.

Every item carries its ``category`` (see :mod:`.dataset`: the samples, the dataset, and
the clear errors on bad input). The datamodules default to a validation split taken from
the good *training* images (``ValSplitMode.FROM_TRAIN``), so thresholds and normalisation
never see test images (Anomalib's default, ``SAME_AS_TEST``, fits them on the test set).

Example:
    >>> import tempfile
    >>> from anomalib_vqflow.data.demo import generate_demo_dataset
    >>> root = generate_demo_dataset(tempfile.mkdtemp(), categories=["brick"], num_train=4,
    ...                              num_test_good=2, num_test_defect=2)
    >>> datamodule = MultiClassMVTecAD(root=root, num_workers=0)
    >>> datamodule.categories
    ['brick']
    >>> datamodule.setup()
    >>> item = datamodule.test_data[0]
    >>> item.category
    'brick'
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms.v2 import Transform

from .dataset import MultiClassDataset, discover_categories, make_category_samples

logger = logging.getLogger(__name__)


class EpochShuffleSampler(Sampler[int]):
    """Shuffle indices in an order that depends on the seed and the epoch only.

    Why: a ``DataLoader(shuffle=True)`` draws its order (and its workers' seeds) from the global
    random generator, whose state after a resume differs from the uninterrupted run's, so a
    resumed run would see other batches. Here epoch ``e`` always has the same order, and the
    loader's ``generator`` (its workers' seeds) is re-seeded with it. Lightning calls
    :meth:`set_epoch` at the start of every epoch; the first epoch of a fit, whose loader is
    created before that call, takes ``epoch`` from the constructor.

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> first = list(sampler)
        >>> sampler.set_epoch(1)
        >>> list(sampler) != first, list(EpochShuffleSampler(5, seed=0)) == first
        (True, True)
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, generator: torch.Generator | None = None) -> None:
        self.size = size
        self.seed = seed
        self.generator = generator
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` and re-seed the loader's generator with it."""
        self.epoch = epoch
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


class MultiClassDataModule(AnomalibDataModule):
    """Base of the unified datamodules: several categories, items that carry them, the per-category table.

    A subclass says where its categories are (:meth:`available_categories`) and how one category's
    samples are read (:meth:`category_samples`: Anomalib's sample table plus ``category``); this
    base checks the requested categories, builds the datasets, keeps the training order a resumed
    run repeats, validates on good training images, and attaches the per-category evaluator.

    Any Anomalib model trained or tested on a unified datamodule gets the per-category table
    (``metrics_per_category.{csv,json,md}``) with no extra argument: at ``setup`` the datamodule puts a
    :class:`~anomalib_vqflow.evaluation.UnifiedEvaluator` first among the trainer's callbacks, ahead of
    the model's post-processor (so it reads raw scores), unless the run already has one (the plugin's
    models bring their own). Anomalib's own evaluator keeps running next to it. ``per_category_table=False``
    turns this off.

    Args:
        root: Folder of the data set.
        categories: Categories to use; ``None`` uses every category found under ``root``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data loader workers.
        train_augmentations: Augmentations of training images.
        val_augmentations: Augmentations of validation images.
        test_augmentations: Augmentations of test images.
        augmentations: Augmentations of all subsets, where no subset-specific one is given.
        test_split_mode: How the test set is made (Anomalib's ``TestSplitMode``).
        test_split_ratio: Share of normal images moved to the test set when it is synthetic.
        val_split_mode: How the validation set is made. Defaults to ``FROM_TRAIN``: good
            training images only, so no threshold or normalisation is fitted on test images.
        val_split_ratio: Share of the training images used for validation.
        seed: Seed of the random splits.
        per_category_table: Attach the per-category evaluator to runs that have none.

    Example:
        >>> datamodule = MultiClassMVTecAD(root="./datasets/MVTecAD")  # a subclass; any Anomalib model may use it
        >>> isinstance(datamodule, MultiClassDataModule), datamodule.per_category_table
        (True, True)
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TRAIN,
        val_split_ratio: float = 0.1,
        seed: int | None = None,
        per_category_table: bool = True,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root)
        self._requested_categories = list(categories) if categories is not None else None
        self.per_category_table = per_category_table
        self.category = "unified"

    @property
    def data_root(self) -> Path:
        """Folder that holds the category folders."""
        return self.root

    @property
    def name(self) -> str:
        """Name of the data set folder, so run folders and pictures follow the data, not the class."""
        return self.data_root.name

    def available_categories(self) -> list[str]:
        """Every category of the data set found under :attr:`data_root`, sorted.

        Raises:
            FileNotFoundError: If the data set is missing or holds no category; the message names the path.
        """
        raise NotImplementedError

    def is_category(self, category: str) -> bool:
        """Whether ``category`` may be requested (its samples then say what is missing in it)."""
        return category in self.available_categories()

    def category_samples(self, category: str) -> pd.DataFrame:
        """One category's sample table (see :func:`~anomalib_vqflow.data.dataset.make_category_samples`)."""
        raise NotImplementedError

    @property
    def categories(self) -> list[str]:
        """The categories this datamodule loads, checked against the data set."""
        if self._requested_categories is None:
            return self.available_categories()
        unknown = [c for c in self._requested_categories if not self.is_category(c)]
        if unknown:
            msg = f"Unknown categories {unknown} under {self.data_root}; available: {self.available_categories()}."
            raise FileNotFoundError(msg)
        return self._requested_categories

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets and attach the per-category evaluator to the run."""
        super().setup(stage)
        validation = getattr(self, "val_data", None)
        if validation is not None and not (validation.samples.label_index == LabelName.ABNORMAL).any():
            announce_good_validation()
        if self.per_category_table and self.trainer is not None:
            attach_unified_evaluator(self.trainer)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches in an order that a resumed run repeats (see :class:`EpochShuffleSampler`)."""
        generator = torch.Generator()
        # The seed of the run (seed_everything) when the datamodule has none of its own.
        seed = self.seed if self.seed is not None else torch.initial_seed()
        # The epoch about to start: a resumed run makes its loader before it updates `current_epoch`.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        return DataLoader(
            dataset=self.train_data,
            sampler=EpochShuffleSampler(len(self.train_data), seed=seed, epoch=epoch, generator=generator),
            generator=generator,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def _setup(self, _stage: str | None = None) -> None:
        categories = self.categories
        self.train_data = MultiClassDataset(self.data_root, categories, Split.TRAIN, self.category_samples)
        self.test_data = MultiClassDataset(self.data_root, categories, Split.TEST, self.category_samples)
        logger.info(
            "Unified data over %d categories: %d training and %d test images.",
            len(categories),
            len(self.train_data),
            len(self.test_data),
        )


def attach_unified_evaluator(trainer: Trainer) -> None:
    """Put a :class:`~anomalib_vqflow.evaluation.UnifiedEvaluator` first among ``trainer``'s callbacks, if it has none.

    First, because Lightning calls callbacks in list order and the model's post-processor, which
    normalises and clamps the scores, is among them.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        >>> attach_unified_evaluator(trainer)
        >>> attach_unified_evaluator(trainer)  # once only
        >>> [type(callback).__name__ for callback in trainer.callbacks].count("UnifiedEvaluator")
        1
        >>> type(trainer.callbacks[0]).__name__
        'UnifiedEvaluator'
    """
    from anomalib_vqflow.evaluation import UnifiedEvaluator

    if not any(isinstance(callback, UnifiedEvaluator) for callback in trainer.callbacks):
        trainer.callbacks.insert(0, UnifiedEvaluator())


class MultiClassMVTecAD(MultiClassDataModule):
    """One datamodule over several categories of a folder in MVTec AD layout.

    Args:
        root: Folder with one sub-folder per category (``<root>/<category>/train/good`` ...).
        categories: Categories to use; ``None`` uses every folder under ``root`` that has
            ``train/good``.
        **kwargs: The arguments of :class:`MultiClassDataModule` (batch sizes, workers, splits, ``seed``).

    Example:
        >>> datamodule = MultiClassMVTecAD(root="./datasets/MVTecAD", categories=["bottle", "cable"])
        >>> datamodule.name, datamodule.category
        ('MVTecAD', 'unified')
    """

    def __init__(
        self, root: str | Path = "./datasets/MVTecAD", categories: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(root=root, categories=categories, **kwargs)

    def available_categories(self) -> list[str]:
        """List the folders under :attr:`data_root` that have ``train/good``."""
        return discover_categories(self.data_root)

    def is_category(self, category: str) -> bool:
        """Any folder: one without ``train/good`` is reported by the sample builder, which names that path."""
        return (self.data_root / category).is_dir()

    def category_samples(self, category: str) -> pd.DataFrame:
        """Read the category folder's samples in MVTec AD layout."""
        return make_category_samples(self.data_root, category)


_F1_THRESHOLD_LOGGER = "anomalib.metrics.threshold.f1_adaptive_threshold"
_NO_ANOMALOUS_VALIDATION = "The validation set does not contain any anomalous images"


class _GoodValidationFilter(logging.Filter):
    """Drops Anomalib's per-epoch warning that validation holds no anomalous image: here that is by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NO_ANOMALOUS_VALIDATION)


@functools.cache
def announce_good_validation() -> None:
    """Say once per process, in the plugin's words, what Anomalib would repeat at every validation epoch.

    Example:
        >>> announce_good_validation()  # logs once; Anomalib's repeats of it are filtered from now on
    """
    logging.getLogger(_F1_THRESHOLD_LOGGER).addFilter(_GoodValidationFilter())
    logger.warning(
        "Validation uses good images only (val_split_mode from_train, or a folder of good images), so that "
        "no test image chooses a threshold or an epoch. Anomalib's adaptive threshold therefore takes the highest "
        "validation score; its warning about this is not repeated every epoch."
    )
