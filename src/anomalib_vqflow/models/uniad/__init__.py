"""UniAD: the unified feature-reconstruction baseline of the multi-class papers (see :mod:`.lightning_model`)."""

from .lightning_model import UniAd
from .torch_model import UniAdModel

__all__ = ["UniAd", "UniAdModel"]
