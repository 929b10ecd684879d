"""anomalib-vqflow: normalizing-flow models for unified multi-class anomaly detection in Anomalib.

Importing the package registers its models and datamodules with Anomalib: they become
direct ``AnomalibModule`` / ``AnomalibDataModule`` subclasses that ``list_models()``,
``get_model()`` and the ``anomalib`` command resolve by short name.

Example:
    >>> import anomalib_vqflow
    >>> from anomalib.models import list_models
    >>> {"ms_flow", "vq_flow"} <= list_models()
    True
"""

from anomalib_vqflow.data import (
    DemoMultiClass,
    MultiClassFolder,
    MultiClassMVTecAD,
    MultiClassMVTecAD2,
    MultiClassRealIAD,
    MultiClassVisa,
)
from anomalib_vqflow.models import Hgad, MsFlow, UniAd, VqFlow

__all__ = [
    "DemoMultiClass",
    "Hgad",
    "MsFlow",
    "MultiClassFolder",
    "MultiClassMVTecAD",
    "MultiClassMVTecAD2",
    "MultiClassRealIAD",
    "MultiClassVisa",
    "UniAd",
    "VqFlow",
]
__version__ = "0.1.0"
