"""MSFlow's scoring: the additive map localizes, the multiplicative map detects.

The functions live in :mod:`anomalib_vqflow.components.scoring` because VQ-Flow scores the
same way; this module ties them together for MSFlow and picks which map Anomalib sees
as ``anomaly_map``.

Example:
    >>> import torch
    >>> generator = AnomalyMapGenerator(top_k=0.03)
    >>> score, anomaly_map = generator([torch.randn(1, 4, 8, 8)], (32, 32))
    >>> score.shape, anomaly_map.shape
    (torch.Size([1]), torch.Size([1, 1, 32, 32]))
"""

from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from anomalib_vqflow.components.scoring import (
    additive_anomaly_map,
    joint_log_likelihood,
    log_likelihood_maps,
    multiplicative_anomaly_map,
    multiplicative_image_score,
)


class AnomalyMapMode(str, Enum):
    """Which aggregation of the scales becomes ``anomaly_map``: MSFlow localizes with ``add``."""

    ADD = "add"
    MUL = "mul"


class AnomalyMapGenerator(nn.Module):
    """Turn latents into the image score (top-k mean of the multiplicative map, log form) and the anomaly map.

    Args:
        top_k: Share of pixels averaged for the image score (MSFlow: 0.03).
        mode: Aggregation used for ``anomaly_map``: ``"add"`` (MSFlow's localization map) or ``"mul"``.
    """

    def __init__(self, top_k: float = 0.03, mode: AnomalyMapMode | str = AnomalyMapMode.ADD) -> None:
        super().__init__()
        if not 0.0 < top_k <= 1.0:
            msg = f"top_k is a share of pixels in (0, 1], got top_k={top_k}."
            raise ValueError(msg)
        self.top_k = top_k
        self.mode = AnomalyMapMode(mode)

    def forward(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pred_score (N,), anomaly_map (N, 1, H, W))`` at image size ``size``."""
        log_likelihoods = log_likelihood_maps(latents)
        joint = joint_log_likelihood(log_likelihoods, size)
        pred_score = multiplicative_image_score(joint, self.top_k)
        if self.mode == AnomalyMapMode.MUL:
            return pred_score, multiplicative_anomaly_map(joint)
        return pred_score, additive_anomaly_map(log_likelihoods, size)
