"""HGAD's losses for one feature level: mixture likelihood, mutual information, entropy, intra-class likelihood.

With ``d_k = ||z - mu_k||^2`` the squared distance of a latent to component ``k``,
``w = softmax(phi_inter)`` the component weights, ``D`` the latent dimension and ``y`` the
component of the pixel's image (its class, or its cluster without labels):

- ``likelihood`` (L_g): ``-[log sum_k w_k exp(-d_k / 2) + log|det J|] / D``, the negative
  log-likelihood under the inter-class mixture;
- ``mutual_information`` (L_mi, *maximised*): ``sum_k y~_k [log softmax_k(-d / 2 + log w) - log w_k]``
  with ``y~`` the label-smoothed one-hot of ``y`` (0.02) and ``w`` held fixed, so that
  latents move towards their own component's centre;
- ``entropy`` (L_e): the entropy of ``softmax(-d / 2)``, so that every latent clearly
  belongs to one component;
- after the first epochs (``intra=True``): ``intra_likelihood`` (L_g_intra), the negative
  log-likelihood under the intra-class mixture of component ``y``, and
  ``likelihood_sigmoid`` (L_z), ``-log sigmoid(log p(x) / D)`` with ``log p(x)`` the full
  log-likelihood under that mixture (constant and log-Jacobian included).

Total: ``likelihood - 100 * mutual_information + entropy (+ intra_likelihood + likelihood_sigmoid)``,
each averaged over pixels.

Example:
    >>> import torch
    >>> from anomalib_vqflow.components.priors import HierarchicalGaussianMixture
    >>> prior = HierarchicalGaussianMixture(num_components=2, channels=4, num_intra_centers=3)
    >>> terms = HgadLoss()(prior, torch.randn(6, 4), torch.zeros(6), torch.tensor([0, 0, 0, 1, 1, 1]), intra=True)
    >>> sorted(terms)
    ['entropy', 'intra_likelihood', 'likelihood', 'likelihood_sigmoid', 'loss', 'mutual_information']
"""

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_vqflow.components.priors import HierarchicalGaussianMixture


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot rows ``(P, K)`` with ``smoothing`` spread evenly: ``(1 - s) * onehot + s / K``."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def mutual_information(
    squared_distances: torch.Tensor,
    log_weights: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """HGAD's mutual-information term per row, ``sum_k t_k [log softmax_k(-d / 2 + log w) - log w_k]``, ``(P,)``.

    The weights enter without gradient (the term moves the latents, not the weights).
    """
    log_weights = log_weights.detach()
    log_posterior = torch.log_softmax(-0.5 * squared_distances + log_weights, dim=1)
    return ((log_posterior - log_weights) * targets).sum(dim=1)


class HgadLoss(nn.Module):
    """Loss terms of one level's latents under its hierarchical Gaussian mixture.

    Args:
        mutual_information_weight: Weight of the mutual-information term (HGAD: 100).
        label_smoothing: Label smoothing of the component targets (HGAD: 0.02).

    Example:
        >>> import torch
        >>> from anomalib_vqflow.components import HierarchicalGaussianMixture
        >>> prior = HierarchicalGaussianMixture(num_components=2, channels=4, num_intra_centers=3)
        >>> latents, log_jacobian, components = torch.randn(10, 4), torch.zeros(10), torch.zeros(10, dtype=torch.long)
        >>> terms = HgadLoss()(prior, latents, log_jacobian, components, intra=True)
        >>> sorted(terms)
        ['entropy', 'intra_likelihood', 'likelihood', 'likelihood_sigmoid', 'loss', 'mutual_information']
    """

    def __init__(self, mutual_information_weight: float = 100.0, label_smoothing: float = 0.02) -> None:
        super().__init__()
        self.mutual_information_weight = mutual_information_weight
        self.label_smoothing = label_smoothing

    def forward(
        self,
        prior: HierarchicalGaussianMixture,
        latents: torch.Tensor,
        log_jacobian: torch.Tensor,
        components: torch.Tensor,
        intra: bool,
    ) -> dict[str, torch.Tensor]:
        """Return every term (pixel means) and their weighted sum ``loss``.

        Args:
            prior: The level's mixture.
            latents: Latent rows ``(P, D)``.
            log_jacobian: Log-Jacobian of every row ``(P,)``.
            components: Component of every row ``(P,)``.
            intra: Add the intra-class terms (HGAD: after two meta-epochs).
        """
        channels = prior.channels
        distances = prior.squared_distances(latents)
        log_weights = prior.log_weights()
        mixture = torch.logsumexp(-0.5 * distances + log_weights, dim=1)
        log_posterior = torch.log_softmax(-0.5 * distances, dim=1)
        targets = smoothed_one_hot(components, prior.num_components, self.label_smoothing)
        terms = {
            "likelihood": (-(mixture + log_jacobian) / channels).mean(),
            "mutual_information": mutual_information(distances, log_weights, targets).mean(),
            "entropy": -(log_posterior.exp() * log_posterior).sum(dim=1).mean(),
        }
        loss = terms["likelihood"] - self.mutual_information_weight * terms["mutual_information"] + terms["entropy"]
        if intra:
            log_likelihood = prior.log_likelihood(latents, log_jacobian, components)
            terms["intra_likelihood"] = (-(log_likelihood - prior.log_normaliser) / channels).mean()
            terms["likelihood_sigmoid"] = -F.logsigmoid(log_likelihood / channels).mean()
            loss = loss + terms["intra_likelihood"] + terms["likelihood_sigmoid"]
        terms["loss"] = loss
        return terms
