"""How well label-free clusters (VQ-Flow's prototypes) match the true categories, for reporting only.

- :func:`cluster_purity`: the share of images whose cluster's majority category is their own
  (1.0 when every cluster holds one category; splitting a category over several clusters
  is not penalised);
- :func:`normalized_mutual_information`: ``I(clusters; categories)`` divided by the
  arithmetic mean of the two entropies (scikit-learn's default), 1.0 for a one-to-one
  match, 0.0 for independence; it does penalise splitting.

Both take any hashable labels. The models never read them: these numbers describe what the
prototypes learned without labels.

Example:
    >>> clusters = [0, 0, 1, 1, 2, 2]
    >>> categories = ["a", "a", "b", "b", "b", "b"]
    >>> cluster_purity(clusters, categories)
    1.0
    >>> round(normalized_mutual_information(clusters, categories), 4)
    0.7337
"""

from collections.abc import Hashable, Sequence

import numpy as np


def _contingency(clusters: Sequence[Hashable], categories: Sequence[Hashable]) -> np.ndarray:
    if len(clusters) != len(categories):
        msg = (
            f"Need one category per cluster assignment, got {len(clusters)} clusters and {len(categories)} categories."
        )
        raise ValueError(msg)
    if not clusters:
        msg = "Cannot compare clusters with categories on zero items."
        raise ValueError(msg)
    _, cluster_ids = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    _, category_ids = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((cluster_ids.max() + 1, category_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_ids, category_ids), 1)
    return table


def cluster_purity(clusters: Sequence[Hashable], categories: Sequence[Hashable]) -> float:
    """Share of items that belong to the most frequent category of their cluster."""
    table = _contingency(clusters, categories)
    return float(table.max(axis=1).sum() / table.sum())


def _entropy(counts: np.ndarray) -> float:
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def normalized_mutual_information(clusters: Sequence[Hashable], categories: Sequence[Hashable]) -> float:
    """Mutual information of clusters and categories over the mean of their entropies (1.0 if both are constant)."""
    table = _contingency(clusters, categories).astype(np.float64)
    total = table.sum()
    joint = table / total
    outer = np.outer(joint.sum(axis=1), joint.sum(axis=0))
    nonzero = joint > 0
    mutual_information = float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())
    mean_entropy = 0.5 * (_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0)))
    if mean_entropy == 0.0:
        return 1.0
    return max(mutual_information, 0.0) / mean_entropy
