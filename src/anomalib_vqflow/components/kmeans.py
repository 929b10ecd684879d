"""k-means and squared distances: the general maths that the codebooks, the mixture priors and HGAD share.

:func:`squared_distances` gives every vector's squared L2 distance to every code in one matrix
product (nearest codes of :class:`~.quantizers.VectorQuantizer`, mixture densities of
:class:`~.priors.HierarchicalGaussianMixture`); :func:`kmeans` fits a codebook to a fixed set of
vectors in one go (HGAD's label-free components).

Example:
    >>> import torch
    >>> squared_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]]))
    tensor([[ 0.],
            [25.]])
"""

import torch


def squared_distances(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``(M, K)`` between ``vectors (M, D)`` and ``codebook (K, D)`` from one matrix product."""
    return (
        vectors.pow(2).sum(dim=1, keepdim=True) - 2.0 * vectors @ codebook.t() + codebook.pow(2).sum(dim=1).unsqueeze(0)
    )


def kmeans(
    vectors: torch.Tensor,
    num_clusters: int,
    iterations: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``vectors (M, D)``: k-means++ seeding, then Lloyd iterations until nothing moves.

    Deterministic for a given ``generator``. With fewer distinct rows than ``num_clusters``,
    the surplus centres repeat rows and stay empty.

    Returns:
        The centres ``(num_clusters, D)`` and the cluster of every row ``(M,)``.

    >>> points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> centres, assignments = kmeans(points, 2, generator=torch.Generator().manual_seed(0))
    >>> bool(assignments[0] == assignments[1]), bool(assignments[0] != assignments[2])
    (True, True)
    """
    if num_clusters < 1 or len(vectors) == 0:
        msg = f"k-means needs a cluster and a vector at least, got {num_clusters} clusters, {len(vectors)} vectors."
        raise ValueError(msg)
    vectors = vectors.double()
    first = torch.randint(len(vectors), (1,), generator=generator)
    centres = [vectors[first]]
    closest = squared_distances(vectors, centres[0]).squeeze(1).clamp_min(0.0)
    for _ in range(num_clusters - 1):
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres.append(vectors[pick])
        closest = torch.minimum(closest, squared_distances(vectors, vectors[pick]).squeeze(1).clamp_min(0.0))
    codebook = torch.cat(centres)
    assignments = squared_distances(vectors, codebook).argmin(dim=1)
    for _ in range(iterations):
        counts = torch.bincount(assignments, minlength=num_clusters).to(vectors.dtype)
        sums = torch.zeros_like(codebook).index_add_(0, assignments, vectors)
        filled = counts > 0
        codebook[filled] = sums[filled] / counts[filled].unsqueeze(1)
        updated = squared_distances(vectors, codebook).argmin(dim=1)
        if torch.equal(updated, assignments):
            break
        assignments = updated
    return codebook.float(), assignments
