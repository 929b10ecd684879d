"""VQ-Flow's loss: MSFlow's negative log-likelihood plus the commitment losses of the codebooks.

``L = mean_batch[ sum_l 0.5 * ||z_l||^2 - log|det J| ] + w * (commit_prototypes + sum_levels commit_patterns)``
with ``w = 1`` in the paper. The log-Jacobian includes the prior's standardisation unless the
model was built with the official form (``prior_log_det=False``). The codebooks themselves
learn by moving averages, so there is no codebook term.

Example:
    >>> import torch
    >>> loss = VqFlowLoss(commitment_weight=0.5)
    >>> loss([torch.zeros(2, 3, 4, 4)], torch.zeros(2), torch.tensor(2.0))
    tensor(1.)
"""

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_vqflow.components.gaussian import negative_log_likelihood


class VqFlowLoss(nn.Module):
    """Negative log-likelihood of the latents plus the weighted commitment loss.

    Args:
        commitment_weight: Weight of the commitment losses.

    Example:
        >>> import torch
        >>> VqFlowLoss(commitment_weight=2.0)([torch.zeros(1, 2, 2, 2)], torch.zeros(1), torch.tensor(0.5))
        tensor(1.)
    """

    def __init__(self, commitment_weight: float = 1.0) -> None:
        super().__init__()
        self.commitment_weight = commitment_weight

    def forward(
        self,
        latents: Sequence[torch.Tensor],
        log_jacobian: torch.Tensor,
        commitment: torch.Tensor,
    ) -> torch.Tensor:
        """Return the scalar loss."""
        return negative_log_likelihood(latents, log_jacobian).mean() + self.commitment_weight * commitment
