"""MVTec AD 2 as one unified datamodule: the good training images of every category, the public test set.

MVTec AD 2 (Heckler-Kram et al., 2025; CC BY-NC-SA 4.0) has eight categories (can, fabric,
fruit_jelly, rice, sheet_metal, vial, wallplugs, walnuts) in this layout, which Anomalib's
``MVTecAD2`` datamodule reads one category at a time::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png              # good images, kept apart from training
    <root>/<category>/test_public/good/*.png
    <root>/<category>/test_public/bad/*.png
    <root>/<category>/test_public/ground_truth/bad/<stem>_mask.png
    <root>/<category>/test_private/*.png                 # no labels: scored by MVTec's server
    <root>/<category>/test_private_mixed/*.png           # no labels: scored by MVTec's server

:class:`MultiClassMVTecAD2` trains on ``train/good`` of all categories and tests on
``test_public``, the only test set with labels and masks. The private test sets are refused
rather than loaded: without labels every metric would be meaningless, and their scores are
computed by the MVTec benchmark server (https://benchmark.mvtec.com/).

Validation: by default (``val_split_mode="from_train"``, as every unified datamodule) a share of
``train/good`` is held out. ``val_split_mode="from_dir"`` validates on the data set's own
``validation/good`` images instead and trains on all of ``train/good``; both see good images only.

Example:
    >>> datamodule = MultiClassMVTecAD2(root="./datasets/MVTec_AD_2", categories=["can", "vial"])
    >>> datamodule.name, datamodule.category
    ('MVTec_AD_2', 'unified')
    >>> MultiClassMVTecAD2(test_type="private")
    Traceback (most recent call last):
    ...
    ValueError: MVTec AD 2's test_type='private' has no labels: its scores are computed by ...
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data.datasets.image.mvtecad2 import CATEGORIES, TestType
from anomalib.data.utils import LabelName, Split, ValSplitMode

from .dataset import (
    MultiClassDataset,
    discover_categories,
    require_images,
    require_mask,
    sample_table,
)
from .multiclass import MultiClassDataModule

__all__ = ["CATEGORIES", "MultiClassMVTecAD2"]


class MultiClassMVTecAD2(MultiClassDataModule):
    """One datamodule over several MVTec AD 2 categories, tested on the public test set.

    Args:
        root: Folder of MVTec AD 2, with one sub-folder per category.
        categories: Categories to use; ``None`` uses every folder under ``root`` that has ``train/good``.
        test_type: ``"public"``, the only test set with labels. ``"private"`` and ``"private_mixed"``
            are refused: they have no labels, their scores go to the MVTec benchmark server.
        **kwargs: The arguments of :class:`~anomalib_vqflow.data.multiclass.MultiClassDataModule`;
            ``val_split_mode="from_dir"`` validates on ``validation/good``.

    Raises:
        ValueError: For a ``test_type`` other than ``"public"``.

    Example:
        >>> MultiClassMVTecAD2(root="./datasets/MVTec_AD_2", categories=["can", "vial"]).name
        'MVTec_AD_2'
        >>> MultiClassMVTecAD2(test_type="private")
        Traceback (most recent call last):
        ...
        ValueError: MVTec AD 2's test_type='private' has no labels: ...
    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVTec_AD_2",
        categories: Sequence[str] | None = None,
        test_type: str = "public",
        **kwargs: Any,
    ) -> None:
        known = [member.value for member in TestType]
        if test_type not in known:
            msg = f"Unknown MVTec AD 2 test_type {test_type!r}; expected one of {known}."
            raise ValueError(msg)
        if test_type != TestType.PUBLIC.value:
            msg = (
                f"MVTec AD 2's test_type={test_type!r} has no labels: its scores are computed by the MVTec "
                "benchmark server (https://benchmark.mvtec.com/), not here. Use test_type='public'."
            )
            raise ValueError(msg)
        super().__init__(root=root, categories=categories, **kwargs)
        self.test_type = test_type

    def available_categories(self) -> list[str]:
        """List the folders under :attr:`data_root` that have ``train/good``."""
        return discover_categories(self.data_root)

    def is_category(self, category: str) -> bool:
        """Any folder: :meth:`category_samples` names what is missing in it."""
        return (self.data_root / category).is_dir()

    def category_samples(self, category: str) -> pd.DataFrame:
        """Read one category's ``train/good`` and ``test_public`` (and ``validation/good`` if validated from it).

        ``validation/good`` is read with ``val_split_mode="from_dir"`` only; its images get the split ``"val"``.

        Raises:
            FileNotFoundError: If the category, ``test_public``, or one of the image folders it needs is
                missing or empty; the message names the folder.
            ValueError: If a ``test_public/bad`` image has no mask in ``test_public/ground_truth/bad``.
        """
        category_root = self.data_root / category
        if not category_root.is_dir():
            msg = f"Unknown category {category!r}: folder {category_root} does not exist."
            raise FileNotFoundError(msg)
        test_root = category_root / "test_public"
        if not test_root.is_dir():
            msg = f"Category {category!r} has no public test set: folder {test_root} does not exist."
            raise FileNotFoundError(msg)
        train = require_images(category_root / "train" / "good", f"Category {category!r} has no training images")
        validation: list[Path] = []
        if self.val_split_mode == ValSplitMode.FROM_DIR:
            problem = f"Category {category!r} has no validation images (val_split_mode='from_dir')"
            validation = require_images(category_root / "validation" / "good", problem)
        good = require_images(test_root / "good", f"Category {category!r} has no public good test images")
        bad = require_images(test_root / "bad", f"Category {category!r} has no public defect images")
        mask_folder = test_root / "ground_truth" / "bad"
        rows = [
            *(("train", "good", str(path), "", LabelName.NORMAL) for path in train),
            *(("val", "good", str(path), "", LabelName.NORMAL) for path in validation),
            *(("test", "good", str(path), "", LabelName.NORMAL) for path in good),
            *(("test", "bad", str(path), str(require_mask(mask_folder, path)), LabelName.ABNORMAL) for path in bad),
        ]
        return sample_table(rows, category, category_root)

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        if self.val_split_mode == ValSplitMode.FROM_DIR:
            # Anomalib's base makes no validation set in this mode: the data set's own good validation images are it.
            self.val_data = MultiClassDataset(self.data_root, self.categories, Split.VAL, self.category_samples)
