r"""The unified data's samples and dataset: every category's images, labels and masks, each item with its category.

:func:`discover_categories` lists the categories of a folder in MVTec AD layout,
:func:`make_category_samples` builds one category's samples (Anomalib's sample table, plus the
category), and :class:`MultiClassDataset` reads them into :class:`CategoryImageItem`\ s. Compared
with Anomalib's ``MVTecAD`` loader, the sample builder also accepts categories whose defect
images have no masks (image-level labels only: their defect images get empty masks and the
evaluator gives them image metrics only, also when only some defect folders are annotated), and
fails with one clear error naming the path for an empty root, an unknown category, a category
without ``train/good``, a defect image without its mask, or an unreadable file.

Every item carries its ``category``, so metrics and pictures can be grouped by category. Models
must not read it: the plugin's models never do, and their tests check it.

Example:
    >>> import tempfile
    >>> from anomalib_vqflow.data.demo import generate_demo_dataset
    >>> root = generate_demo_dataset(tempfile.mkdtemp(), categories=["brick"], num_train=2,
    ...                              num_test_good=1, num_test_defect=1)
    >>> discover_categories(root)
    ['brick']
    >>> MultiClassDataset(root, ["brick"], split="test")[0].category
    'brick'
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, read_image, read_mask
from anomalib.data.utils.image import IMG_EXTENSIONS
from PIL import UnidentifiedImageError
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Mask

logger = logging.getLogger(__name__)

_MASK_SUFFIXES = ("_mask", "")


@dataclass
class CategoryImageItem(ImageItem):
    """Anomalib ``ImageItem`` that also carries the name of its category.

    Example:
        >>> import torch
        >>> CategoryImageItem(image=torch.zeros(3, 4, 4), category="screw").category
        'screw'
    """

    category: str | None = None


@dataclass
class CategoryImageBatch(ImageBatch):
    """Anomalib ``ImageBatch`` whose items carry their category (``batch.category`` is a list).

    Example:
        >>> import torch
        >>> batch = CategoryImageBatch(image=torch.zeros(2, 3, 4, 4), category=["screw", "cable"])
        >>> [item.category for item in batch.items]
        ['screw', 'cable']
    """

    item_class: ClassVar[type[ImageItem]] = CategoryImageItem
    category: list[str] | None = None


def image_files(folder: Path, extensions: Sequence[str] = IMG_EXTENSIONS, recursive: bool = False) -> list[Path]:
    """List the image files in ``folder`` (and its sub-folders if ``recursive``), sorted; extensions in any case."""
    suffixes = {extension.lower() for extension in extensions}
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in paths if path.is_file() and path.suffix.lower() in suffixes)


def require_images(
    folder: Path, problem: str, extensions: Sequence[str] = IMG_EXTENSIONS, recursive: bool = False
) -> list[Path]:
    """List :func:`image_files` of ``folder``; raise a ``FileNotFoundError`` saying ``problem`` if there is none."""
    if not folder.is_dir() or not (files := image_files(folder, extensions, recursive)):
        msg = f"{problem}: expected image files in {folder}."
        raise FileNotFoundError(msg)
    return files


def find_mask(mask_folder: Path, image_path: Path) -> Path | None:
    """Return the mask of ``image_path`` in ``mask_folder``: the image named ``<stem>_mask.*``, else ``<stem>.*``."""
    for suffix in _MASK_SUFFIXES:
        for candidate in sorted(mask_folder.glob(f"{image_path.stem}{suffix}.*")):
            if candidate.suffix.lower() in IMG_EXTENSIONS:
                return candidate
    return None


def require_mask(mask_folder: Path, image_path: Path) -> Path:
    """Return :func:`find_mask`'s mask; if there is none, raise a ``ValueError`` naming the image and mask."""
    mask = find_mask(mask_folder, image_path)
    if mask is None:
        msg = f"Defect image {image_path} has no mask in {mask_folder} (expected {image_path.stem}_mask.png)."
        raise ValueError(msg)
    return mask


def discover_categories(root: str | Path) -> list[str]:
    """Return the sorted names of the folders under ``root`` that have ``train/good``.

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no such category.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"Dataset root {root} does not exist or is not a folder."
        raise FileNotFoundError(msg)
    categories = sorted(path.name for path in root.iterdir() if (path / "train" / "good").is_dir())
    if not categories:
        msg = f"Dataset root {root} holds no category: expected folders <category>/train/good (MVTec AD layout)."
        raise FileNotFoundError(msg)
    return categories


def make_category_samples(root: str | Path, category: str) -> pd.DataFrame:
    """Build the sample table of one category folder in MVTec AD layout.

    The table has Anomalib's columns (``path, split, label, image_path, mask_path,
    label_index``) plus ``category``. Defect folders without a ``ground_truth`` folder
    are image-level only (``mask_path`` is empty).

    Raises:
        FileNotFoundError: If the category or its ``train/good`` folder is missing or empty.
        ValueError: If a defect folder has masks but one of its images has none.
    """
    category_root = Path(root) / category
    if not category_root.is_dir():
        msg = f"Unknown category {category!r}: folder {category_root} does not exist."
        raise FileNotFoundError(msg)
    train_good = require_images(category_root / "train" / "good", f"Category {category!r} has no training images")
    rows: list[tuple[str, str, str, str, int]] = [
        ("train", "good", str(path), "", LabelName.NORMAL) for path in train_good
    ]
    test_root = category_root / "test"
    defect_folders = sorted(path for path in test_root.iterdir() if path.is_dir()) if test_root.is_dir() else []
    for folder in defect_folders:
        label_index = LabelName.NORMAL if folder.name == "good" else LabelName.ABNORMAL
        mask_folder = category_root / "ground_truth" / folder.name
        for image_path in image_files(folder):
            mask_path = ""
            if label_index == LabelName.ABNORMAL and mask_folder.is_dir():
                mask_path = str(require_mask(mask_folder, image_path))
            rows.append(("test", folder.name, str(image_path), mask_path, label_index))

    samples = sample_table(rows, category, category_root)
    defects = samples[samples.label_index == LabelName.ABNORMAL]
    unannotated = sorted(set(defects.label[defects.mask_path == ""]))
    if unannotated and (defects.mask_path != "").any():
        # Unannotated defect pixels would count as normal ones and bias the category's pixel metrics.
        logger.warning(
            "Category %r: defect folders %s have no masks in %s; the category gets image metrics only.",
            category,
            unannotated,
            category_root / "ground_truth",
        )
        samples["mask_path"] = ""
    return samples


def sample_table(rows: Sequence[tuple[str, str, str, str, int]], category: str, path: str | Path) -> pd.DataFrame:
    """Build a category's sample table from ``(split, label, image_path, mask_path, label_index)`` rows.

    Anomalib's columns (``path, split, label, image_path, mask_path, label_index``) plus ``category``;
    ``path`` is the category's folder, ``mask_path`` is ``""`` where there is no mask.

    Example:
        >>> sample_table([("train", "good", "a/train/good/0.png", "", 0)], "a", "a").columns.tolist()
        ['path', 'split', 'label', 'image_path', 'mask_path', 'label_index', 'category']
    """
    samples = pd.DataFrame(rows, columns=["split", "label", "image_path", "mask_path", "label_index"])
    samples.insert(0, "path", str(path))
    samples["category"] = category
    samples["label_index"] = samples["label_index"].astype(int)
    return samples


class MultiClassDataset(AnomalibDataset):
    """Dataset over several categories of a folder in MVTec AD layout; items carry their category.

    Args:
        root: Folder that holds one sub-folder per category.
        categories: Category names to load.
        augmentations: Augmentations applied to every image (and mask).
        split: ``"train"``, ``"test"`` or ``None`` for both.
        make_samples: Builds one category's sample table from ``category``; defaults to the MVTec AD
            layout under ``root`` (:func:`make_category_samples`). The unified datamodules pass their own.

    Example:
        >>> import tempfile
        >>> from anomalib_vqflow.data.demo import generate_demo_dataset
        >>> root = generate_demo_dataset(tempfile.mkdtemp(), categories=["brick", "coins"], image_size=32, num_train=2,
        ...                              num_test_good=1, num_test_defect=2)
        >>> dataset = MultiClassDataset(root, ["brick", "coins"], split="test")
        >>> len(dataset), sorted(set(dataset.samples.label)), dataset[0].category
        (6, ['good', 'hole', 'scratch'], 'brick')
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str],
        split: str | Split | None = None,
        make_samples: Callable[[str], pd.DataFrame] | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.root = Path(root)
        self.categories = list(categories)
        if make_samples is None:
            make_samples = functools.partial(make_category_samples, self.root)
        samples = pd.concat([make_samples(category) for category in self.categories], ignore_index=True)
        if split is not None:
            split_value = split.value if isinstance(split, Split) else split
            samples = samples[samples.split == split_value].reset_index(drop=True)
        has_masks = (samples.mask_path != "").any()
        samples.attrs["task"] = "segmentation" if has_masks else "classification"
        self.samples = samples
        # A model training on cached features (anomalib_vqflow.models.feature_cache) turns this off:
        # items then carry a 1 x 1 placeholder image, and the loader no longer decodes every file.
        self.read_images = True

    @property
    def category(self) -> str:
        """Name used by Anomalib for run folders: every category of a unified model at once."""
        return "unified"

    @property
    def collate_fn(self) -> type[CategoryImageBatch]:
        """Collate items into a :class:`CategoryImageBatch`."""
        return CategoryImageBatch.collate

    def __getitem__(self, index: int) -> CategoryImageItem:
        """Load one image (RGB, float in [0, 1]), its mask and its category."""
        sample = self.samples.iloc[index]
        image = _read(read_image, sample.image_path) if self.read_images else torch.zeros(3, 1, 1)
        gt_mask = None
        if self.task == "segmentation":
            if sample.mask_path:
                gt_mask = Mask(_read(read_mask, sample.mask_path))
            else:
                # Good images and defect images without annotation: no annotated pixel.
                gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
            if gt_mask.shape[-2:] != image.shape[-2:]:
                msg = f"Mask {sample.mask_path} has size {tuple(gt_mask.shape[-2:])}, its image {sample.image_path} "
                msg += f"has size {tuple(image.shape[-2:])}."
                raise ValueError(msg)
        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)
        return CategoryImageItem(
            image=image,
            gt_label=torch.tensor(int(sample.label_index)),
            gt_mask=gt_mask,
            image_path=sample.image_path,
            mask_path=sample.mask_path or None,
            category=sample.category,
        )


def _read(reader: object, path: str) -> torch.Tensor:
    """Read an image or mask as a tensor; an unreadable file raises an error that names it."""
    try:
        return reader(path, as_tensor=True)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        msg = f"Cannot read image file {path}: {error}"
        raise ValueError(msg) from error
