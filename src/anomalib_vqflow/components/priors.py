"""Concept-conditioned Gaussian priors: each image's latents get the mean and scale of its prototype.

VQ-Flow re-parametrises the standard normal of the flows per concept: for an image whose
prototype code is ``c``, the latent ``z`` of every scale is modelled as
``N(mu(c), s(c)^2)`` per channel (constant over space), with ``mu`` and ``sigma`` linear
maps of the prototype and ``s = sqrt(sigma^2 + 1e-8)``. :class:`ConceptGaussianPrior`
standardises ``z -> (z - mu(c)) / s(c)``, after which the fusion flow maps to ``N(0, I)``.
The paper writes the prior as a mixture over prototypes; like the official code, each image
uses its own (hard-assigned) prototype's component.

Standardising is an invertible affine map, so the exact likelihood carries its log-Jacobian
``-H * W * sum_c log s_c(c)``. The official VQ-Flow code leaves that term out: the scale can
then grow for free (shrinking every latent towards zero costs nothing), which is not a
likelihood. ``log_det=True`` (the default) keeps the term; ``log_det=False`` reproduces
the official objective.

The heads start at ``mu = 0`` and ``sigma = 1`` (zero weights), so an untrained prior is
MSFlow's standard normal; the official code uses PyTorch's default initialisation, whose
small random scales blow the first latents up by an order of magnitude.

Example:
    >>> import torch
    >>> prior = ConceptGaussianPrior(prototype_channels=4, channels=[3, 5])
    >>> latents = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    >>> standardised, log_det = prior(latents, torch.randn(2, 4))
    >>> [z.shape[1] for z in standardised], log_det.shape
    ([3, 5], torch.Size([2]))
"""

from collections.abc import Sequence

import torch
from torch import nn

_VARIANCE_FLOOR = 1e-8


class ConceptGaussianPrior(nn.Module):
    """Per-prototype mean and scale of the latents of every scale.

    Args:
        prototype_channels: Dimension of the prototype codes.
        channels: Latent channels of each scale.
        log_det: Add the standardisation's log-Jacobian (the exact likelihood); ``False`` is the official form.
    """

    def __init__(self, prototype_channels: int, channels: Sequence[int], log_det: bool = True) -> None:
        super().__init__()
        self.log_det = log_det
        self.mean_heads = nn.ModuleList(nn.Linear(prototype_channels, c) for c in channels)
        self.scale_heads = nn.ModuleList(nn.Linear(prototype_channels, c) for c in channels)
        for head in [*self.mean_heads, *self.scale_heads]:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        for head in self.scale_heads:
            nn.init.ones_(head.bias)

    def parameters_for(self, prototype: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(mean, scale)`` of every scale for prototypes ``(N, P)``, each ``(N, C_l, 1, 1)``."""
        return [
            (
                mean_head(prototype)[..., None, None],
                torch.sqrt(scale_head(prototype).pow(2) + _VARIANCE_FLOOR)[..., None, None],
            )
            for mean_head, scale_head in zip(self.mean_heads, self.scale_heads, strict=True)
        ]

    def forward(
        self,
        latents: Sequence[torch.Tensor],
        prototype: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Standardise every scale's latent; return them and the log-Jacobian ``(N,)`` (zero if ``log_det=False``)."""
        standardised = []
        log_jacobian = latents[0].new_zeros(latents[0].shape[0])
        for latent, (mean, scale) in zip(latents, self.parameters_for(prototype), strict=True):
            standardised.append((latent - mean) / scale)
            if self.log_det:
                log_jacobian = log_jacobian - latent.shape[-2] * latent.shape[-1] * scale.log().sum(dim=(1, 2, 3))
        return standardised, log_jacobian

    def inverse(self, standardised: Sequence[torch.Tensor], prototype: torch.Tensor) -> list[torch.Tensor]:
        """Undo :meth:`forward`."""
        return [
            latent * scale + mean
            for latent, (mean, scale) in zip(standardised, self.parameters_for(prototype), strict=True)
        ]
