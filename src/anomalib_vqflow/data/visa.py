"""VisA as one unified datamodule, after Anomalib's one-class split of it.

Anomalib's ``Visa`` datamodule downloads VisA and splits it by the data set's ``split_csv/1cls.csv``
into ``<root>/visa_pytorch/<category>/{train,test,ground_truth}`` (MVTec AD layout, masks as 0/255
PNGs named like their images); :class:`MultiClassVisa` reuses that preparation and reads the split
folder as :class:`~anomalib_vqflow.data.multiclass.MultiClassMVTecAD` does. Checked against the CSV
sample by sample in ``tests/data/test_visa_split.py``.

Example:
    >>> MultiClassVisa(root="./datasets/visa").data_root.as_posix()
    'datasets/visa/visa_pytorch'
"""

from __future__ import annotations

from pathlib import Path

from .dataset import discover_categories, image_files
from .multiclass import MultiClassMVTecAD


class MultiClassVisa(MultiClassMVTecAD):
    """One datamodule over several VisA categories, after Anomalib's one-class split.

    Anomalib's ``Visa`` datamodule downloads VisA and writes the split into
    ``<root>/visa_pytorch``; this datamodule reuses that preparation and then loads the
    split folder like :class:`MultiClassMVTecAD`.

    Example:
        >>> datamodule = MultiClassVisa(root="./datasets/visa", categories=["candle"])
        >>> datamodule.name
        'visa'
    """

    def __init__(self, root: str | Path = "./datasets/visa", **kwargs: object) -> None:
        super().__init__(root=root, **kwargs)

    @property
    def data_root(self) -> Path:
        """Folder of the split categories that Anomalib's VisA preparation writes."""
        return self.root / "visa_pytorch"

    @property
    def name(self) -> str:
        """Name of the VisA folder (not of the split folder inside it), for run folders."""
        return self.root.name

    def available_categories(self) -> list[str]:
        """List the split categories that have training images.

        Anomalib's split writes an empty ``train/good`` for each of the 12 categories, also for those
        missing from a partial copy of VisA; those are left out.
        """
        return [c for c in discover_categories(self.data_root) if image_files(self.data_root / c / "train" / "good")]

    def prepare_data(self) -> None:
        """Download VisA and apply Anomalib's split where it has not been done yet."""
        from anomalib.data import Visa
        from anomalib.data.datasets.image.visa import CATEGORIES

        unknown = sorted(set(self._requested_categories or []) - set(CATEGORIES))
        if unknown:
            msg = f"Unknown VisA categories {unknown}; VisA has {list(CATEGORIES)}."
            raise ValueError(msg)
        for category in self._requested_categories or [CATEGORIES[0]]:
            Visa(root=self.root, category=category).prepare_data()
