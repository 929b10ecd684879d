"""Unified multi-class data: several categories in one datamodule, items that carry their category.

- :class:`MultiClassMVTecAD`: any folder in MVTec AD layout (MVTec AD itself, your own data);
- :class:`MultiClassVisa`: VisA after Anomalib's one-class split;
- :class:`MultiClassRealIAD`: Real-IAD from its JSON split files (multi-view, single-view, FUIAD);
- :class:`MultiClassMVTecAD2`: MVTec AD 2 with its public test set;
- :class:`MultiClassFolder`: your own categories, each in any layout Anomalib's ``Folder`` reads;
- :class:`DemoMultiClass`: the embedded demo data, generated offline in seconds.
"""

from .dataset import CategoryImageBatch, CategoryImageItem, MultiClassDataset, discover_categories
from .demo import DEMO_CATEGORIES, DemoMultiClass, default_demo_root, generate_demo_dataset
from .folder import MultiClassFolder
from .multiclass import MultiClassDataModule, MultiClassMVTecAD
from .mvtecad2 import MultiClassMVTecAD2
from .predict import PredictFolder
from .realiad import MultiClassRealIAD
from .visa import MultiClassVisa

__all__ = [
    "DEMO_CATEGORIES",
    "CategoryImageBatch",
    "CategoryImageItem",
    "DemoMultiClass",
    "MultiClassDataModule",
    "MultiClassDataset",
    "MultiClassFolder",
    "MultiClassMVTecAD",
    "MultiClassMVTecAD2",
    "MultiClassRealIAD",
    "MultiClassVisa",
    "PredictFolder",
    "default_demo_root",
    "discover_categories",
    "generate_demo_dataset",
]
