"""A small multi-category anomaly-detection dataset, generated offline into a cache folder.

Tests, doctests, notebooks and smoke runs need a unified multi-class dataset in MVTec AD layout that
exists on every machine, needs no download and no licence click-through, and builds in seconds.
:mod:`.demo_images` renders its pictures from the photographs inside scikit-image's wheel; this
module writes them, keeps them in a cache folder, and serves them as a datamodule
(:class:`DemoMultiClass`). The same parameters give byte-identical files.

Layout (``root/<category>`` is what an MVTec AD loader reads)::

    root/.complete.json                                  # the parameters; written last
    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png   # uint8, 0 or 255

The dataset is built in a hidden sibling folder and renamed onto ``root`` when complete, so a crash or a
concurrent run never leaves a half-written ``root`` behind; a later call with the same parameters
returns at once, and one with other parameters fails instead of mixing two datasets.

Example:
    >>> import tempfile
    >>> root = generate_demo_dataset(Path(tempfile.mkdtemp()) / "demo", categories=["brick", "coins"],
    ...                              num_train=2, num_test_good=1, num_test_defect=4)
    >>> sorted(path.name for path in (root / "coins" / "test").iterdir())
    ['good', 'hole', 'patch', 'scratch', 'stain']
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_vqflow.data.demo_images import DEFECT_TYPES, check_category, render_sample
from anomalib_vqflow.data.multiclass import MultiClassMVTecAD

DEMO_CATEGORIES: tuple[str, ...] = ("brick", "gravel", "coffee", "coins")
_MARKER = ".complete.json"
# Bump when the pictures change, so caches built by an older generator are refused, not reused.
_GENERATOR_VERSION = 1


def default_demo_root() -> Path:
    """Return the cache folder for the demo dataset.

    ``$ANOMALIB_VQFLOW_DEMO_ROOT`` if set, else ``anomalib_vqflow/demo`` under ``$XDG_CACHE_HOME``
    (``~/.cache`` when that is unset or not absolute, as the XDG spec asks).
    """
    if override := os.environ.get("ANOMALIB_VQFLOW_DEMO_ROOT"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "anomalib_vqflow" / "demo"


def demo_root_for(**generation: Any) -> Path:
    """Cache folder of the demo data set with these :func:`generate_demo_dataset` parameters.

    The default parameters use :func:`default_demo_root`; any other set gets a sibling folder
    named after a digest of its parameters, so several sets live side by side in the cache.

    >>> demo_root_for().name, demo_root_for(image_size=64).name
    ('demo', 'demo-4cc97b16')
    """
    base = default_demo_root()
    signature = inspect.signature(generate_demo_dataset).parameters
    default_values = {name: parameter.default for name, parameter in signature.items() if name != "root"}
    defaults = _parameters(**default_values)
    params = _parameters(**{**default_values, **generation})
    if params == defaults:
        return base
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}-{digest}")


def generate_demo_dataset(
    root: str | Path,
    categories: Sequence[str] = DEMO_CATEGORIES,
    image_size: int = 128,
    num_train: int = 60,
    num_test_good: int = 15,
    num_test_defect: int = 20,
    seed: int = 0,
) -> Path:
    """Write the demo dataset into ``root`` (MVTec AD layout) unless it is already there.

    Args:
        root: Dataset folder; ``root/<category>`` is one MVTec AD category. It may be missing or an
            empty folder; its parent is created if needed.
        categories: Photographs to use, from ``brick``, ``grass``, ``gravel``, ``coffee``, ``coins``,
            ``chelsea``.
        image_size: Side of the square images, in pixels (at least 32).
        num_train: Good training images per category.
        num_test_good: Good test images per category.
        num_test_defect: Defect test images per category, spread evenly over :data:`DEFECT_TYPES` in
            that order.
        seed: Base seed; the same parameters give byte-identical files.

    Returns:
        ``root`` as an absolute path.

    Raises:
        ValueError: For an invalid parameter, or when ``root`` holds something else: a demo dataset
            generated with other parameters, or files without the completion marker.

    """
    params = _parameters(categories, image_size, num_train, num_test_good, num_test_defect, seed)
    root = Path(root).expanduser().absolute()
    if _is_generated(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling on the same file system, so the final rename is atomic and concurrent runs
    # never write into each other's folders.
    staging = root.parent / f".{root.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        for category in params["categories"]:
            _write_category(staging / category, category, image_size, num_train, num_test_good, num_test_defect, seed)
        (staging / _MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _publish(staging, root, params)
    finally:
        # Gone after a successful rename; otherwise a failed or lost run's leftovers.
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _parameters(
    categories: Sequence[str], image_size: int, num_train: int, num_test_good: int, num_test_defect: int, seed: int
) -> dict[str, Any]:
    categories = [categories] if isinstance(categories, str) else list(categories)
    if not categories or len(set(categories)) != len(categories):
        msg = f"categories must be a non-empty list without repeats, got {categories}"
        raise ValueError(msg)
    for category in categories:
        check_category(category)
    if image_size < 32:
        msg = f"image_size must be at least 32, got {image_size}"
        raise ValueError(msg)
    if num_train < 1 or num_test_good < 0 or num_test_defect < 0 or seed < 0:
        msg = (
            "need num_train >= 1 and num_test_good, num_test_defect, seed >= 0, got "
            f"{num_train}, {num_test_good}, {num_test_defect}, {seed}"
        )
        raise ValueError(msg)
    return {
        "generator_version": _GENERATOR_VERSION,
        # Categories are generated independently, so their order does not change the dataset.
        "categories": sorted(categories),
        "image_size": image_size,
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "seed": seed,
    }


def _is_generated(root: Path, params: dict[str, Any]) -> bool:
    marker = root / _MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError) as error:
            msg = f"cannot read the demo dataset marker {marker}: {error}; delete {root} to regenerate it"
            raise ValueError(msg) from error
        if found != params:
            msg = (
                f"{root} already holds a demo dataset generated with {found}, not the requested {params}; "
                "delete that folder or choose another root"
            )
            raise ValueError(msg)
        return True
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        msg = f"{root} exists but is not a complete demo dataset (no {_MARKER}); refusing to write into it"
        raise ValueError(msg)
    return False


def _publish(staging: Path, root: Path, params: dict[str, Any]) -> None:
    try:
        # Renaming onto an existing folder, even an empty one, fails on some systems.
        if root.is_dir():
            root.rmdir()
        staging.rename(root)
    except OSError:
        # A concurrent run may have published the same dataset first; that is success.
        if not _is_generated(root, params):
            raise


def _write_category(
    folder: Path, category: str, image_size: int, num_train: int, num_test_good: int, num_test_defect: int, seed: int
) -> None:
    counts = {("train", "good"): num_train, ("test", "good"): num_test_good}
    for position, defect in enumerate(DEFECT_TYPES):
        counts["test", defect] = num_test_defect // len(DEFECT_TYPES) + (position < num_test_defect % len(DEFECT_TYPES))
    for (split, label), count in counts.items():
        if count == 0:
            continue
        (folder / split / label).mkdir(parents=True)
        if label != "good":
            (folder / "ground_truth" / label).mkdir(parents=True)
        width = max(3, len(str(count - 1)))
        for index in range(count):
            _, image, mask = render_sample(category, split, label, index, image_size, seed)
            name = f"{index:0{width}d}"
            _save_png(image, folder / split / label / f"{name}.png")
            if label != "good":
                _save_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / label / f"{name}_mask.png")


def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed settings and no metadata chunks, so equal arrays give equal bytes. Level 1 encodes three
    # times faster than the default and, on these images, gives no larger files.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


class DemoMultiClass(MultiClassMVTecAD):
    """Unified datamodule over the embedded demo data, generated into a cache folder on first use.

    Args:
        root: Where the data set is written; ``None`` for :func:`default_demo_root`.
        categories: Demo categories (photographs); ``None`` for :data:`DEMO_CATEGORIES`.
        image_size: Side of the generated square images.
        num_train: Good training images per category.
        num_test_good: Good test images per category.
        num_test_defect: Defect test images per category.
        generator_seed: Seed of the generated images (the data set's identity, not the split's).
        **kwargs: The arguments of :class:`MultiClassMVTecAD` (batch sizes, workers, splits, ``seed``).

    Example:
        >>> import tempfile
        >>> datamodule = DemoMultiClass(categories=["coins"], num_train=4, num_test_good=2, num_test_defect=4,
        ...                             root=Path(tempfile.mkdtemp()) / "demo", num_workers=0)
        >>> datamodule.prepare_data()
        >>> datamodule.categories
        ['coins']
    """

    def __init__(
        self,
        root: str | Path | None = None,
        categories: Sequence[str] | None = None,
        image_size: int = 128,
        num_train: int = 60,
        num_test_good: int = 15,
        num_test_defect: int = 20,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        demo_categories = list(categories or DEMO_CATEGORIES)
        generation = {
            "categories": demo_categories,
            "image_size": image_size,
            "num_train": num_train,
            "num_test_good": num_test_good,
            "num_test_defect": num_test_defect,
            "seed": generator_seed,
        }
        super().__init__(root=root or demo_root_for(**generation), categories=demo_categories, **kwargs)
        self._generation = generation

    def prepare_data(self) -> None:
        """Generate the data set unless the cache already holds it (a few seconds)."""
        generate_demo_dataset(self.root, **self._generation)

    def _setup(self, _stage: str | None = None) -> None:
        self.prepare_data()
        super()._setup(_stage)
