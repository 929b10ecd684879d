"""Purity and normalized mutual information of clusters against categories, by hand and against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from anomalib_vqflow.evaluation.clustering import cluster_purity, normalized_mutual_information


def test_purity_by_hand() -> None:
    # Cluster 0 holds a, a, b (majority 2); cluster 1 holds b, b (2): 4 of 5.
    assert cluster_purity([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]) == pytest.approx(0.8)
    assert cluster_purity([0, 0, 0, 0], ["a", "b", "c", "d"]) == pytest.approx(0.25)


def test_nmi_by_hand() -> None:
    # Clusters split categories exactly in half each: I = log 2, H(clusters) = H(categories) = log 2.
    assert normalized_mutual_information([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0, abs=1e-12)
    # One cluster: I = 0, H(clusters) = 0, H(categories) = log 2 -> 0.
    assert normalized_mutual_information([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.0
    # Clusters {a,a},{b},{b}: I = H(categories) = log 2; H(clusters) = 1.5 log 2: NMI = log2 / (1.25 log 2).
    value = normalized_mutual_information([0, 0, 1, 2], ["a", "a", "b", "b"])
    assert value == pytest.approx(math.log(2) / (0.5 * (math.log(2) + 1.5 * math.log(2))))


def test_nmi_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 6, 200).tolist()
    categories = [str(c % 3) if rng.random() < 0.7 else "x" for c in clusters]
    expected = normalized_mutual_info_score(categories, clusters)
    assert normalized_mutual_information(clusters, categories) == pytest.approx(expected, rel=1e-10)


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="one category per cluster"):
        cluster_purity([0, 1], ["a"])
