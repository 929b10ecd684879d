"""Unified multi-class data: several categories in one datamodule, items that carry their category.

- :class:`MultiClassMVTecAD`: any folder in MVTec AD layout (MVTec AD itself, your own data);
- :class:`MultiClassVisa`: VisA after Anomalib's one-class split;
- :class:`DemoMultiClass`: the embedded demo data, generated offline in seconds.
"""

from .dataset import CategoryImageBatch, CategoryImageItem, MultiClassDataset, discover_categories
from .demo import DEMO_CATEGORIES, DemoMultiClass, default_demo_root, generate_demo_dataset
from .multiclass import MultiClassDataModule, MultiClassMVTecAD, MultiClassVisa
from .predict import PredictFolder

__all__ = [
    "DEMO_CATEGORIES",
    "CategoryImageBatch",
    "CategoryImageItem",
    "DemoMultiClass",
    "MultiClassDataModule",
    "MultiClassDataset",
    "MultiClassMVTecAD",
    "MultiClassVisa",
    "PredictFolder",
    "default_demo_root",
    "discover_categories",
    "generate_demo_dataset",
]
