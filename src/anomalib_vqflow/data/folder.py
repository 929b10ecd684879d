"""Your own categories, each in any layout Anomalib's ``Folder`` reads, as one unified datamodule.

Anomalib's ``Folder`` datamodule loads one category from a few folders (``normal_dir``,
``abnormal_dir``, ``normal_test_dir``, ``mask_dir``, ``extensions``). :class:`MultiClassFolder`
takes the same folders per category, as a mapping from category name to folders, so data that is
not in MVTec AD layout trains one unified model without being copied into it::

    categories:
      screw: {normal_dir: screw/good, abnormal_dir: screw/bad, mask_dir: screw/masks}
      cable: {normal_dir: [cable/good_a, cable/good_b], abnormal_dir: cable/defects}

The rules, close to Anomalib's ``Folder``:

- A folder is a path or a list of paths, relative to ``root`` (or to the working folder when
  ``root`` is ``None``) unless absolute; images are found in its sub-folders too.
- Normal test images come from ``normal_test_dir``; without it, about ``normal_split_ratio`` (0.2 as
  in Anomalib) of the category's normal images are moved to the test set: each image whose path
  (relative to ``root``) hashes below the ratio, whatever the run's seed. A training run and a later
  test run therefore see the same split, no image is in both, and adding or removing images moves
  no other image between them.
- A mask is matched to its image by file stem, with or without ``_mask`` (``000.png`` ->
  ``000_mask.png`` or ``000.png``), in the same sub-folder of ``mask_dir`` as the image is in
  ``abnormal_dir``. One ``mask_dir`` serves every ``abnormal_dir``; a list of them pairs up with a
  list of ``abnormal_dir`` of the same length. A category without ``mask_dir`` gets image metrics only.
- Unknown keys, a missing folder, an empty one, an image in two roles, an abnormal image without its
  mask: one error that names the category and the path.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ["good/0.png", "good/1.png", "good/2.png", "bad/3.png", "masks/3_mask.png"]:
    ...     (root / "screw" / name).parent.mkdir(parents=True, exist_ok=True)
    ...     Image.new("L", (8, 8)).save(root / "screw" / name)
    >>> datamodule = MultiClassFolder(
    ...     {"screw": {"normal_dir": "screw/good", "abnormal_dir": "screw/bad", "mask_dir": "screw/masks"}},
    ...     root=root, num_workers=0, val_split_ratio=0.5,
    ... )
    >>> datamodule.setup()
    >>> sorted(datamodule.test_data.samples.label), datamodule.test_data[0].category
    (['bad', 'good'], 'screw')
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data.utils import LabelName
from anomalib.data.utils.image import IMG_EXTENSIONS

from .dataset import require_images, require_mask, sample_table
from .multiclass import MultiClassDataModule

__all__ = ["FOLDER_KEYS", "MultiClassFolder"]

FOLDER_KEYS = ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir", "extensions")


class MultiClassFolder(MultiClassDataModule):
    """One datamodule over your own categories, each given as Anomalib ``Folder`` folders.

    Args:
        categories: Category name -> its folders: ``normal_dir`` (required), ``abnormal_dir``,
            ``normal_test_dir``, ``mask_dir`` (each a path or a list of paths) and ``extensions``
            (a list such as ``[".png", ".jpg"]``; Anomalib's image extensions by default).
        root: Folder the relative paths start from; ``None``: the working folder.
        normal_split_ratio: Share of a category's normal images moved to the test set when it has
            no ``normal_test_dir``.
        **kwargs: The arguments of :class:`~anomalib_vqflow.data.multiclass.MultiClassDataModule`
            (batch sizes, workers, validation split, ``seed``).

    Raises:
        ValueError: If ``categories`` is empty, a category has an unknown key or no ``normal_dir``,
            or ``normal_split_ratio`` is not in ``[0, 1)``.

    Example:
        >>> datamodule = MultiClassFolder({"screw": {"normal_dir": "good", "abnormal_dir": "bad"}}, root="./parts")
        >>> datamodule.available_categories(), datamodule.name
        (['screw'], 'parts')
    """

    def __init__(
        self,
        categories: dict[str, dict[str, Any]],
        root: str | Path | None = None,
        normal_split_ratio: float = 0.2,
        **kwargs: Any,
    ) -> None:
        if not categories:
            msg = "MultiClassFolder needs at least one category: {name: {normal_dir: ..., ...}}."
            raise ValueError(msg)
        for name, folders in categories.items():
            if not isinstance(folders, Mapping):
                msg = f"Category {name!r}: expected a mapping of {list(FOLDER_KEYS)}, got {folders!r}."
                raise ValueError(msg)
            unknown = sorted(set(folders) - set(FOLDER_KEYS))
            if unknown:
                msg = f"Category {name!r}: unknown keys {unknown}; expected some of {list(FOLDER_KEYS)}."
                raise ValueError(msg)
            if not folders.get("normal_dir"):
                msg = f"Category {name!r}: normal_dir is required."
                raise ValueError(msg)
        if not 0 <= normal_split_ratio < 1:
            msg = f"normal_split_ratio must be in [0, 1), got {normal_split_ratio}."
            raise ValueError(msg)
        super().__init__(root=root if root is not None else ".", categories=list(categories), **kwargs)
        self.folders = {name: dict(folders) for name, folders in categories.items()}
        self.normal_split_ratio = normal_split_ratio

    @property
    def name(self) -> str:
        """Name of the root folder (of the working folder when ``root`` is ``None``), for run folders."""
        return self.root.resolve().name

    def available_categories(self) -> list[str]:
        """List the categories of the mapping, in its order."""
        return list(self.folders)

    def category_samples(self, category: str) -> pd.DataFrame:
        """Read one category's folders; errors name the category and the path.

        Raises:
            FileNotFoundError: If a folder is missing or holds no image.
            ValueError: If an abnormal image has no mask, an image is in two roles, or the folder lists do not pair up.
        """
        try:
            return self._read_category(category, **self.folders[category])
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"Category {category!r}: {error}") from error

    def _paths(self, folders: str | Path | Sequence[str | Path] | None) -> list[Path]:
        if folders is None:
            return []
        folders = [folders] if isinstance(folders, str | Path) else folders
        return [self.root / folder for folder in folders]  # an absolute folder replaces the root

    def _read_category(
        self,
        category: str,
        normal_dir: str | Sequence[str],
        abnormal_dir: str | Sequence[str] | None = None,
        normal_test_dir: str | Sequence[str] | None = None,
        mask_dir: str | Sequence[str] | None = None,
        extensions: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        extensions = [extensions] if isinstance(extensions, str) else list(extensions or IMG_EXTENSIONS)
        if not all(extension.startswith(".") for extension in extensions):
            msg = f"extensions must start with a dot, got {list(extensions)}."
            raise ValueError(msg)

        def images(folders: list[Path], role: str) -> list[list[Path]]:
            return [require_images(folder, f"{role} has no images", extensions, recursive=True) for folder in folders]

        normal = sorted(path for paths in images(self._paths(normal_dir), "normal_dir") for path in paths)
        normal_test = [path for paths in images(self._paths(normal_test_dir), "normal_test_dir") for path in paths]
        abnormal_dirs, mask_dirs = self._paths(abnormal_dir), self._paths(mask_dir)
        abnormal = images(abnormal_dirs, "abnormal_dir")
        if mask_dirs and (not abnormal_dirs or len(mask_dirs) not in {1, len(abnormal_dirs)}):
            msg = f"{len(mask_dirs)} mask_dir for {len(abnormal_dirs)} abnormal_dir: give one, or one per abnormal_dir."
            raise ValueError(msg)
        masks = [path for paths in images(mask_dirs, "mask_dir") for path in paths]
        _check_roles(
            normal_dir=normal,
            normal_test_dir=normal_test,
            abnormal_dir=[path for paths in abnormal for path in paths],
            mask_dir=masks,
        )

        if not normal_test:
            # Anomalib's Folder moves a share of the normal images to the test set when there is no normal_test_dir.
            normal_test = _held_out(normal, self.normal_split_ratio, self.root)
            normal = sorted(set(normal) - set(normal_test))
        rows = [("train", "good", str(path), "", LabelName.NORMAL) for path in normal]
        rows += [("test", "good", str(path), "", LabelName.NORMAL) for path in normal_test]
        for index, (folder, paths) in enumerate(zip(abnormal_dirs, abnormal, strict=True)):
            mask_folder = mask_dirs[index % len(mask_dirs)] if mask_dirs else None
            for path in paths:
                # Masks mirror the sub-folders of the abnormal images; without a mask_dir: image labels only.
                mask = require_mask(mask_folder / path.parent.relative_to(folder), path) if mask_folder else ""
                rows.append(("test", path.parent.name, str(path), str(mask), LabelName.ABNORMAL))
        return sample_table(rows, category, self.root)


def _held_out(normal: list[Path], ratio: float, root: Path) -> list[Path]:
    """Choose the normal images moved to the test set: each one whose path hashes below ``ratio``.

    Each image's side depends on its own path (relative to ``root``) only, so adding or removing
    images never moves another one between training and test. At least one is held out, and never all.
    """
    if ratio == 0 or len(normal) < 2:
        return []
    ranked = sorted(normal, key=lambda path: _split_key(path, root))
    held = [path for path in ranked if _split_key(path, root) < ratio]
    if not held:
        held = ranked[:1]
    elif len(held) == len(normal):
        held = ranked[:-1]
    return sorted(held)


def _split_key(path: Path, root: Path) -> float:
    """Map the image's path relative to ``root`` (its absolute path outside it) to a fixed number in ``[0, 1)``."""
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    return int(hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:12], 16) / 16**12


def _check_roles(**roles: list[Path]) -> None:
    """Refuse an image found in two roles (a normal folder that contains the abnormal one, say)."""
    seen: dict[Path, str] = {}
    for role, paths in roles.items():
        for path in paths:
            if seen.setdefault(path.resolve(), role) != role:
                msg = f"Image {path} is found both by {seen[path.resolve()]} and by {role}; the folders overlap."
                raise ValueError(msg)
