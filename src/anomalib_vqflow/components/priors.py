"""Priors of the flows' latents: concept-conditioned Gaussians (VQ-Flow) and hierarchical Gaussian mixtures (HGAD).

**Concept-conditioned Gaussian** (:class:`ConceptGaussianPrior`). VQ-Flow re-parametrises
the standard normal of the flows per concept: for an image whose prototype code is ``c``,
the latent ``z`` of every scale is modelled as ``N(mu(c), s(c)^2)`` per channel (constant
over space), with ``mu`` and ``sigma`` linear maps of the prototype and
``s = sqrt(sigma^2 + 1e-8)``. It standardises ``z -> (z - mu(c)) / s(c)``, after which the
fusion flow maps to ``N(0, I)``. The paper writes the prior as a mixture over prototypes;
like the official code, each image uses its own (hard-assigned) prototype's component.

Standardising is an invertible affine map, so the exact likelihood carries its log-Jacobian
``-H * W * sum_c log s_c(c)``. The official VQ-Flow code leaves that term out: the scale can
then grow for free (shrinking every latent towards zero costs nothing), which is not a
likelihood. ``log_det=True`` (the default) keeps the term; ``log_det=False`` reproduces
the official objective.

The heads start at ``mu = 0`` and ``sigma = 1`` (zero weights), so an untrained prior is
MSFlow's standard normal; the official code uses PyTorch's default initialisation, whose
small random scales blow the first latents up by an order of magnitude.

**Hierarchical Gaussian mixture** (:class:`HierarchicalGaussianMixture`). HGAD models the
latent ``z`` of every pixel of one feature level with unit-variance Gaussians at two levels:
``K`` components (one per class, or per self-assigned cluster) with centres ``mu_k`` and
weights ``softmax(phi_inter)``, and inside each component ``M`` intra-class centres
``{sg(mu_k)} u {sg(mu_k) + delta_k,j}`` with weights ``softmax(phi_intra[k])``. The
component centres start as repeated identity blocks scaled by ``5 / sqrt(2D // K)``, so that
every pair is equally far apart; the offsets start at ``N(0, 1)``; the logits at zero.

Example:
    >>> import torch
    >>> prior = ConceptGaussianPrior(prototype_channels=4, channels=[3, 5])
    >>> latents = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    >>> standardised, log_det = prior(latents, torch.randn(2, 4))
    >>> [z.shape[1] for z in standardised], log_det.shape
    ([3, 5], torch.Size([2]))
    >>> mixture = HierarchicalGaussianMixture(num_components=3, channels=6, num_intra_centers=4)
    >>> z = torch.randn(10, 6)
    >>> mixture.squared_distances(z).shape, mixture.log_likelihood(z, torch.zeros(10), torch.zeros(10).long()).shape
    (torch.Size([10, 3]), torch.Size([10]))
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from .kmeans import squared_distances

_VARIANCE_FLOOR = 1e-8


class ConceptGaussianPrior(nn.Module):
    """Per-prototype mean and scale of the latents of every scale.

    Args:
        prototype_channels: Dimension of the prototype codes.
        channels: Latent channels of each scale.
        log_det: Add the standardisation's log-Jacobian (the exact likelihood); ``False`` is the official form.

    Example:
        >>> import torch
        >>> prior = ConceptGaussianPrior(prototype_channels=4, channels=[3])
        >>> latent = torch.randn(2, 3, 8, 8)
        >>> standardised, log_det = prior([latent], torch.randn(2, 4))
        >>> torch.equal(standardised[0], latent), log_det.tolist()  # zero-initialised heads: the identity at first
        (True, [0.0, 0.0])
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


class HierarchicalGaussianMixture(nn.Module):
    """HGAD's prior of one feature level: ``K`` weighted components, each a weighted mixture of ``M`` centres.

    Latents are rows ``(P, D)``, one per pixel. The log-densities below leave out the
    normalising constant ``D * log(1 / sqrt(2 pi))`` except in :meth:`log_likelihood`.

    Args:
        num_components: Components ``K`` (classes or clusters); at most ``channels``.
        channels: Latent dimension ``D``.
        num_intra_centers: Centres ``M`` of every component, its main centre included (HGAD: 10).
        init_scale: Scale of the identity-block initialisation of the component centres (HGAD: 5).

    Example:
        >>> mixture = HierarchicalGaussianMixture(num_components=2, channels=4, num_intra_centers=3)
        >>> tuple(mixture.centers.shape), tuple(mixture.center_offsets.shape)  # main centres; the others as offsets
        ((2, 4), (2, 2, 4))
    """

    def __init__(
        self, num_components: int, channels: int, num_intra_centers: int = 10, init_scale: float = 5.0
    ) -> None:
        super().__init__()
        if not 1 <= num_components <= channels:
            msg = (
                f"num_components must be between 1 and the latent dimension {channels} "
                f"(the centres start as identity blocks), got num_components={num_components}."
            )
            raise ValueError(msg)
        if num_intra_centers < 1:
            msg = f"num_intra_centers must be at least 1 (the main centre), got {num_intra_centers}."
            raise ValueError(msg)
        self.num_components = num_components
        self.channels = channels
        self.num_intra_centers = num_intra_centers
        blocks = channels // num_components
        centers = torch.zeros(num_components, channels)
        centers[:, : blocks * num_components] = torch.eye(num_components).repeat(1, blocks)
        self.centers = nn.Parameter(centers * init_scale / math.sqrt(2 * channels // num_components))
        self.center_offsets = nn.Parameter(torch.randn(num_components, num_intra_centers - 1, channels))
        self.component_logits = nn.Parameter(torch.zeros(num_components))
        self.intra_logits = nn.Parameter(torch.zeros(num_components, num_intra_centers))

    def log_weights(self) -> torch.Tensor:
        """Log-weights ``log softmax(phi_inter)`` of the components, ``(K,)``."""
        return torch.log_softmax(self.component_logits, dim=0)

    def squared_distances(self, latents: torch.Tensor) -> torch.Tensor:
        """Squared distances ``(P, K)`` of every latent to every component centre."""
        return squared_distances(latents, self.centers)

    def intra_centers(self) -> torch.Tensor:
        """Centres ``(K, M, D)`` of every component: its main centre (no gradient) and the offset ones."""
        main = self.centers.detach().unsqueeze(1)
        return torch.cat([main, main + self.center_offsets], dim=1)

    def intra_log_density(self, latents: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """``log sum_m w_km N(z; mu_km, I)`` without the constant, for each row's component ``k``, ``(P,)``.

        Args:
            latents: Latents ``(P, D)``.
            components: Component of every row, ``(P,)`` integers.
        """
        centers = self.intra_centers().flatten(end_dim=1)
        distances = squared_distances(latents, centers).view(-1, self.num_components, self.num_intra_centers)
        log_densities = torch.logsumexp(-0.5 * distances + torch.log_softmax(self.intra_logits, dim=1), dim=2)
        return log_densities.gather(1, components.view(-1, 1)).squeeze(1)

    @property
    def log_normaliser(self) -> float:
        """``D * log(1 / sqrt(2 pi))``, the constant of a unit-variance Gaussian's log-density."""
        return -0.5 * self.channels * math.log(2.0 * math.pi)

    def log_likelihood(
        self, latents: torch.Tensor, log_jacobian: torch.Tensor, components: torch.Tensor
    ) -> torch.Tensor:
        """Log-likelihood of the features under the component's intra-class mixture, flow included, ``(P,)``."""
        return self.log_normaliser + self.intra_log_density(latents, components) + log_jacobian

    def negative_entropy(self, latents: torch.Tensor) -> torch.Tensor:
        """``sum_k p_k log p_k`` of the unweighted posterior ``p = softmax(-d / 2)`` over components, ``(P,)``.

        Close to 0 where a latent clearly belongs to one component, down to ``-log K`` between them.
        """
        log_posterior = torch.log_softmax(-0.5 * self.squared_distances(latents), dim=1)
        return (log_posterior.exp() * log_posterior).sum(dim=1)
