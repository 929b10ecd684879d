"""MSFlow's maximum-likelihood loss.

``L = mean_batch[ sum_scales 0.5 * ||z_l||^2 - log|det J| ]``: the negative
log-likelihood of the latents under a standard normal, without the constant and without
dividing by the dimension, as in the official code (the scale of the loss is what its
learning rate and gradient clipping were tuned for).

Example:
    >>> import torch
    >>> loss = MsFlowLoss()
    >>> loss([torch.zeros(2, 3, 4, 4)], torch.zeros(2))
    tensor(0.)
"""

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_vqflow.components.gaussian import negative_log_likelihood


class MsFlowLoss(nn.Module):
    """Negative log-likelihood of multi-scale latents under N(0, I), up to a constant.

    Example:
        >>> import torch
        >>> MsFlowLoss()([torch.zeros(2, 3, 4, 4)], torch.zeros(2))  # latents at the mode, volume kept
        tensor(0.)
    """

    def forward(self, latents: Sequence[torch.Tensor], log_jacobian: torch.Tensor) -> torch.Tensor:
        """Return the batch mean of ``sum_l 0.5 * ||z_l||^2 - log_jacobian``."""
        return negative_log_likelihood(latents, log_jacobian).mean()
