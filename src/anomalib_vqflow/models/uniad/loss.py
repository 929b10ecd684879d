"""UniAD's loss: mean squared error between the reconstructed and the clean backbone features.

The reconstruction is computed from jittered features (:func:`.torch_model.feature_jitter`),
the target is the clean multi-stage feature map, so the network learns to remove
perturbations of normal features instead of copying its input.

Example:
    >>> import torch
    >>> UniAdLoss()(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    tensor(1.)
"""

import torch
from torch import nn


class UniAdLoss(nn.Module):
    """Mean over batch, channels and positions of the squared reconstruction error.

    Example:
        >>> import torch
        >>> UniAdLoss()(torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
        tensor(1.)
    """

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``mean((reconstruction - target)^2)``; the target carries no gradient."""
        return nn.functional.mse_loss(reconstruction, target.detach())
