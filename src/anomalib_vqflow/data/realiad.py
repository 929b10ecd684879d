"""Real-IAD as one unified datamodule: the 30 objects of the multi-view data set, with the papers' splits.

Real-IAD (Wang et al., CVPR 2024) photographs each object from five cameras (``C1`` the top view,
``C2``-``C5`` the sides) and ships its train/test splits as one JSON file per object instead of
MVTec AD folders. Anomalib's ``RealIAD`` reads one object at a time; the unified papers train
one model on all of them. :class:`MultiClassRealIAD` reads the same JSON files for any set of
objects, at any of the released resolutions, with the split folder of the chosen setting:

- ``multi_view`` reads ``realiad_jsons``: every image of every view (the paper's multi-view UIAD
  setting, the authors' ``RealIAD-full`` experiment; Dinomaly's Real-IAD runs read it too);
- ``single_view`` reads ``realiad_jsons_sv`` (the paper's single-view UIAD setting, the authors'
  ``RealIAD-C1`` experiment);
- ``fuiad_0.0`` ... ``fuiad_0.4`` read ``realiad_jsons_fuiad_<ratio>``: fully unsupervised training
  sets that hold a share of defective images (the noise ratio), given to the model as normal.

Each JSON file (``<object>.json``) holds ``meta`` (``prefix``: the object's image folder,
``normal_class``: ``"OK"``) and the ``train`` and ``test`` lists; every entry has ``category``,
``anomaly_class`` (``"OK"`` or a defect code such as ``"AK"`` pit, ``"BX"`` deformation, ``"HS"``
scratch), and ``image_path`` and ``mask_path`` relative to ``realiad_<resolution>/<prefix>``. As in
the authors' loader, a test image whose entry has no mask is normal at image level (the defect is
not visible in that view), and every training image is given to the model as normal.

The sample table has the columns of :func:`~anomalib_vqflow.data.dataset.make_category_samples`
(``label`` is ``"good"`` or the defect code) plus ``anomaly_class`` (the JSON's class),
``view`` (``"C1"``...) and ``sample_id`` (the object's photographed sample, e.g.
``audiojack_0001_OK``: all its views share it). A missing split file, a JSON file without
``train`` or ``test``, a listed image or mask that does not exist, and a path that leaves the
image folder each raise one error that names the path.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> images = root / "realiad_256" / "toy"
    >>> for name in ("OK/S0001/toy_0001_OK_C1_1.jpg", "NG/AK/S0002/toy_0002_NG_AK_C1_1.jpg"):
    ...     (images / name).parent.mkdir(parents=True, exist_ok=True)
    ...     Image.new("RGB", (16, 16)).save(images / name)
    >>> Image.new("L", (16, 16)).save(images / "NG/AK/S0002/toy_0002_NG_AK_C1_1.png")
    >>> ok = {"category": "toy", "anomaly_class": "OK", "image_path": "OK/S0001/toy_0001_OK_C1_1.jpg",
    ...       "mask_path": None}
    >>> ng = {"category": "toy", "anomaly_class": "AK", "image_path": "NG/AK/S0002/toy_0002_NG_AK_C1_1.jpg",
    ...       "mask_path": "NG/AK/S0002/toy_0002_NG_AK_C1_1.png"}
    >>> folder = root / "realiad_jsons" / "realiad_jsons"
    >>> folder.mkdir(parents=True)
    >>> split = {"meta": {"prefix": "toy", "normal_class": "OK"}, "train": [ok], "test": [ok, ng]}
    >>> _ = (folder / "toy.json").write_text(json.dumps(split))
    >>> datamodule = MultiClassRealIAD(root=root, resolution=256, num_workers=0)
    >>> datamodule.categories, datamodule.name
    (['toy'], 'realiad_256_multi_view')
    >>> samples = datamodule.category_samples("toy")
    >>> samples.split.tolist(), samples.label.tolist(), samples.label_index.tolist()
    (['train', 'test', 'test'], ['good', 'good', 'AK'], [0, 0, 1])
    >>> samples.view.tolist(), samples.sample_id.tolist()
    (['C1', 'C1', 'C1'], ['toy_0001_OK', 'toy_0001_OK', 'toy_0002_NG_AK'])
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data.utils import LabelName

from .multiclass import MultiClassDataModule

logger = logging.getLogger(__name__)

# Setting -> split folder, as the Real-IAD release names them.
SETTINGS: dict[str, str] = {
    "multi_view": "realiad_jsons",
    "single_view": "realiad_jsons_sv",
    "fuiad_0.0": "realiad_jsons_fuiad_0.0",
    "fuiad_0.1": "realiad_jsons_fuiad_0.1",
    "fuiad_0.2": "realiad_jsons_fuiad_0.2",
    "fuiad_0.4": "realiad_jsons_fuiad_0.4",
}
RESOLUTIONS: tuple[str, ...] = ("256", "512", "1024", "raw")

# The key the authors' evaluation (ADEval's --sample_key_pat) groups the views of one sample by:
# <object>_<number>_<OK | NG_<codes>>, then the camera.
_SAMPLE_KEY = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_(C[0-9])_")
_COLUMNS = [
    "path",
    "split",
    "label",
    "image_path",
    "mask_path",
    "label_index",
    "category",
    "anomaly_class",
    "view",
    "sample_id",
]


class MultiClassRealIAD(MultiClassDataModule):
    """One datamodule over several Real-IAD objects, read from the release's JSON split files.

    Args:
        root: The Real-IAD folder, holding ``realiad_<resolution>/`` and ``realiad_jsons/``.
        categories: Objects to use; ``None`` uses every object with a JSON file in the setting's folder.
        resolution: Image folder to read: ``256``, ``512``, ``1024`` or ``"raw"``.
        setting: Split files to read: ``"multi_view"`` (``realiad_jsons``), ``"single_view"``
            (``realiad_jsons_sv``) or ``"fuiad_0.0"``, ``"fuiad_0.1"``, ``"fuiad_0.2"``, ``"fuiad_0.4"``
            (``realiad_jsons_fuiad_<ratio>``).
        **kwargs: The arguments of :class:`~anomalib_vqflow.data.multiclass.MultiClassDataModule`
            (batch sizes, workers, splits, ``seed``).

    Raises:
        ValueError: If ``resolution`` or ``setting`` is not one of the allowed values.

    Example:
        >>> datamodule = MultiClassRealIAD(root="./datasets/Real-IAD", resolution=256, setting="single_view")
        >>> datamodule.data_root.as_posix(), datamodule.name, datamodule.category
        ('datasets/Real-IAD/realiad_256', 'realiad_256_single_view', 'unified')
    """

    def __init__(
        self,
        root: str | Path = "./datasets/Real-IAD",
        categories: Sequence[str] | None = None,
        resolution: int | str = 1024,
        setting: str = "multi_view",
        **kwargs: Any,
    ) -> None:
        # bool is an int: refuse it rather than read "realiad_True".
        if isinstance(resolution, bool) or str(resolution) not in RESOLUTIONS:
            msg = f"resolution must be one of 256, 512, 1024 or 'raw', not {resolution!r}."
            raise ValueError(msg)
        if setting not in SETTINGS:
            msg = f"setting must be one of {list(SETTINGS)}, not {setting!r}."
            raise ValueError(msg)
        super().__init__(root=root, categories=categories, **kwargs)
        self.resolution = str(resolution)
        self.setting = setting

    @property
    def data_root(self) -> Path:
        """Image folder of the chosen resolution (``<root>/realiad_<resolution>``)."""
        return self.root / f"realiad_{self.resolution}"

    @property
    def name(self) -> str:
        """Resolution and setting, so that runs on different images or splits get different folders."""
        return f"{self.data_root.name}_{self.setting}"

    @property
    def split_folder(self) -> Path:
        """Folder of the setting's JSON files.

        The release's ``realiad_jsons.zip`` unpacks to ``<root>/realiad_jsons/<split folder>/`` (the layout
        Anomalib and Dinomaly read); the authors' README puts the split folders directly under ``<root>``.
        The first of the two that holds JSON files is used.
        """
        folder = SETTINGS[self.setting]
        candidates = [self.root / "realiad_jsons" / folder, self.root / folder]
        for candidate in candidates:
            if candidate.is_dir() and any(candidate.glob("*.json")):
                return candidate
        return candidates[0]

    def available_categories(self) -> list[str]:
        """Objects with a JSON file in the setting's split folder, sorted.

        Raises:
            FileNotFoundError: If the root or the split folder is missing or holds no JSON file.
        """
        if not self.root.is_dir():
            msg = (
                f"Real-IAD root {self.root} does not exist or is not a folder. Request the data set at "
                "https://realiad4ad.github.io/Real-IAD/ and unpack it there (see docs/datasets/real_iad.md)."
            )
            raise FileNotFoundError(msg)
        folder = self.split_folder
        categories = sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []
        if not categories:
            msg = (
                f"Real-IAD split folder {folder} is missing or holds no <object>.json file "
                f"(setting {self.setting!r}): unpack realiad_jsons.zip into {self.root}."
            )
            raise FileNotFoundError(msg)
        return categories

    def category_samples(self, category: str) -> pd.DataFrame:
        """Read one object's JSON split file into its sample table.

        Raises:
            FileNotFoundError: If the JSON file, a listed image, or the mask of a defect image is missing.
            ValueError: If the JSON file is not valid, lacks ``train`` or ``test``, or a path leaves the image folder.
        """
        json_file = self.split_folder / f"{category}.json"
        if not json_file.is_file():
            msg = f"Real-IAD object {category!r} has no split file: {json_file} does not exist."
            raise FileNotFoundError(msg)
        try:
            content = json.loads(json_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            msg = f"Real-IAD split file {json_file} is not valid JSON: {error}"
            raise ValueError(msg) from error
        missing = [key for key in ("train", "test") if not isinstance(content, dict) or key not in content]
        if missing:
            msg = f"Real-IAD split file {json_file} has no {' and no '.join(repr(key) for key in missing)} list."
            raise ValueError(msg)
        meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
        # The authors join meta.prefix (the object's folder) to the image folder; other loaders use the name.
        prefix = meta.get("prefix") or category
        normal_class = meta.get("normal_class") or "OK"
        category_root = self._inside(Path(prefix), json_file, self.data_root)
        if not content["train"]:
            msg = f"Real-IAD split file {json_file} lists no training image."
            raise ValueError(msg)

        rows = []
        unannotated = 0
        for split in ("train", "test"):
            for index, entry in enumerate(content[split]):
                where = f"{json_file} ({split}[{index}])"
                if not isinstance(entry, dict) or not entry.get("image_path") or "anomaly_class" not in entry:
                    msg = f"Real-IAD entry {where} needs 'image_path' and 'anomaly_class', got {entry!r}."
                    raise ValueError(msg)
                image_path = self._inside(Path(entry["image_path"]), where, category_root)
                if not image_path.is_file():
                    msg = f"Real-IAD image {image_path} listed in {where} does not exist."
                    raise FileNotFoundError(msg)
                anomaly_class = str(entry["anomaly_class"])
                mask = entry.get("mask_path")
                # Training is unsupervised: the FUIAD sets' defective training images are meant to look normal.
                # At test time an entry without a mask is normal (a view that does not show the defect), as in the
                # authors' loader: datasets/explicit_dataset.py of Tencent/AnomalyDetection_Real-IAD.
                abnormal = split == "test" and anomaly_class != normal_class and bool(mask)
                if split == "test" and anomaly_class != normal_class and not mask:
                    unannotated += 1
                mask_path = ""
                if abnormal:
                    mask_file = self._inside(Path(mask), where, category_root)
                    if not mask_file.is_file():
                        msg = f"Real-IAD mask {mask_file} of defect image {image_path} ({where}) does not exist."
                        raise FileNotFoundError(msg)
                    mask_path = str(mask_file)
                key = _SAMPLE_KEY.search(image_path.name)
                rows.append(
                    {
                        "path": str(category_root),
                        "split": split,
                        "label": anomaly_class if abnormal else "good",
                        "image_path": str(image_path),
                        "mask_path": mask_path,
                        "label_index": int(LabelName.ABNORMAL if abnormal else LabelName.NORMAL),
                        "category": category,
                        "anomaly_class": anomaly_class,
                        "view": key.group(2) if key else "",
                        "sample_id": key.group(1) if key else "",
                    }
                )
        if unannotated:
            logger.info(
                "Real-IAD %r: %d test images of defective samples have no mask (the defect is not visible in "
                "that view); they count as normal images, as in the authors' evaluation.",
                category,
                unannotated,
            )
        return pd.DataFrame(rows, columns=_COLUMNS)

    @staticmethod
    def _inside(relative: Path, where: object, folder: Path) -> Path:
        """Join ``relative`` to ``folder``, refusing paths that leave it.

        The check is on the written path (``..`` and absolute paths), not on resolved links: a data set
        whose resolution folders are links to another disk is fine.
        """
        joined = Path(os.path.normpath(folder / relative))
        base = Path(os.path.normpath(folder))
        if relative.is_absolute() or not joined.is_relative_to(base):
            msg = f"Real-IAD path {relative} in {where} leaves {folder}: absolute paths and '..' are refused."
            raise ValueError(msg)
        return joined
