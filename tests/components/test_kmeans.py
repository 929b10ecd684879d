"""k-means and squared distances against hand-made groups and torch.cdist."""

import torch

from anomalib_vqflow.components.kmeans import kmeans, squared_distances


def test_matrix_product_distances_match_cdist() -> None:
    torch.manual_seed(0)
    vectors, codebook = torch.randn(7, 5), torch.randn(3, 5)
    torch.testing.assert_close(squared_distances(vectors, codebook), torch.cdist(vectors, codebook).pow(2))


def test_kmeans_recovers_separated_groups_deterministically() -> None:
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    points = torch.cat([offset + torch.randn(20, 3, generator=generator) for offset in offsets])
    groups = torch.arange(3).repeat_interleave(20)
    centres, assignments = kmeans(points, 3, generator=torch.Generator().manual_seed(1))
    # Same partition as the groups, whatever the numbering, and each centre at its group's mean.
    for group in range(3):
        members = assignments[groups == group]
        assert bool((members == members[0]).all())
        torch.testing.assert_close(centres[members[0]], points[groups == group].mean(dim=0))
    assert len(set(assignments.tolist())) == 3
    again = kmeans(points, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again[0], centres, rtol=0, atol=0)


def test_kmeans_with_more_clusters_than_points_leaves_some_empty() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    centres, assignments = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (4, 2)
    assert len(set(assignments.tolist())) == 2
