"""MSFlow: multi-scale normalizing flows with a fusion flow (see :mod:`.lightning_model`)."""

from .lightning_model import MsFlow
from .torch_model import MsFlowModel

__all__ = ["MsFlow", "MsFlowModel"]
