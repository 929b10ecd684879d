"""The plugin's Anomalib models.

Each is a direct ``AnomalibModule`` subclass, so that ``anomalib.models.list_models()`` and
``get_model("vq_flow")`` find it once imported.
"""

from .hgad import Hgad
from .msflow import MsFlow
from .uniad import UniAd
from .vqflow import VqFlow

__all__ = ["Hgad", "MsFlow", "UniAd", "VqFlow"]
