"""VQ-Flow: multi-scale flows conditioned on hierarchical vector-quantized concepts (see :mod:`.lightning_model`)."""

from .lightning_model import VqFlow
from .torch_model import VqFlowModel

__all__ = ["VqFlow", "VqFlowModel"]
