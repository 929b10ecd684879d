"""The standard normal's negative log-density of flow latents: the one formula the flows' losses and scores share.

A normalizing flow maps features ``x`` to latents ``z`` that should follow ``N(0, I)``, and
``-log p(x) = 0.5 * ||z||^2 + (D / 2) log(2 pi) - log|det J|``. MSFlow and VQ-Flow train on the
batch mean of ``sum 0.5 * z^2 - log|det J|`` (the constant dropped, not divided by the
dimension, as the official code), and score every position by its own ``0.5 * sum_c(z^2)``
(:mod:`.scoring`; the log-Jacobian is left out at test time, as in the official code).

Example:
    >>> import torch
    >>> latents = [torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    >>> fine, coarse = negative_log_likelihood_maps(latents)
    >>> tuple(fine.shape), float(fine[0, 0, 0, 0]), tuple(coarse.shape)  # 0.5 * (1 + 1 + 1)
    ((2, 1, 4, 4), 1.5, (2, 1, 2, 2))
    >>> negative_log_likelihood(latents, log_jacobian=torch.tensor([0.0, 4.0]))  # 16 positions of 1.5, minus log|det J|
    tensor([24., 20.])
"""

from collections.abc import Sequence

import torch


def negative_log_likelihood_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per position ``0.5 * sum_c(z^2)`` of each ``(N, C, H, W)`` latent, ``(N, 1, H, W)``.

    That is ``-log N(z; 0, I)`` less its constant ``(C / 2) log(2 pi)``.
    """
    return [0.5 * latent.pow(2).sum(dim=1, keepdim=True) for latent in latents]


def negative_log_likelihood(latents: Sequence[torch.Tensor], log_jacobian: torch.Tensor) -> torch.Tensor:
    """Per image, ``0.5 * z^2`` summed over scales, positions and channels, minus ``log_jacobian`` ``(N,)``."""
    energy = sum(scale_map.sum(dim=(1, 2, 3)) for scale_map in negative_log_likelihood_maps(latents))
    return energy - log_jacobian
