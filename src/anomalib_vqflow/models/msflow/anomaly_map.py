"""MSFlow's scoring: the additive map localizes, the multiplicative map detects.

The generator lives in :mod:`anomalib_vqflow.components.scoring` because VQ-Flow scores
the same way; MSFlow uses it as is.

Example:
    >>> import torch
    >>> generator = AnomalyMapGenerator(top_k=0.03)
    >>> score, anomaly_map = generator([torch.randn(1, 4, 8, 8)], (32, 32))
    >>> score.shape, anomaly_map.shape
    (torch.Size([1]), torch.Size([1, 1, 32, 32]))
"""

from anomalib_vqflow.components.scoring import AnomalyMapGenerator, AnomalyMapMode

__all__ = ["AnomalyMapGenerator", "AnomalyMapMode"]
