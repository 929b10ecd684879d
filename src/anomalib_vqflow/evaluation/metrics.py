"""Exact, threshold-free anomaly-detection metrics computed from raw scores.

Why not torchmetrics or Anomalib's default evaluator: torchmetrics' binary metrics pass
scores outside ``[0, 1]`` through a sigmoid, which in float32 turns raw flow scores such as
30..50 into the same value 1.0 (every pair ties, AUROC 0.5), and Anomalib's evaluator sees
the scores only after the post-processor has clamped them to ``[0, 1]``, which also creates
ties. The functions here only use the ORDER of the raw scores, so any real values work
(negative, large, float32 or float64) and an increasing rescaling never changes a result.

How: scores are sorted once; a group of equal scores is one threshold (ties are never broken
by position), and all counts are integers accumulated per tie group, so AUROC and F1-max are
single correctly rounded divisions of exact integers and AP/PRO accumulate in float64.
Float32 scores (and float64 scores that are exactly float32 values) are sorted as packed
64-bit integer keys, which is several times faster than an ``argsort``; other float64
scores fall back to ``argsort`` so that no two distinct values are merged. The pixel metrics
and AUPRO (:mod:`.pixel`) share this sort and these counts.

Example:
    >>> from anomalib_vqflow.evaluation.metrics import auroc, average_precision, f1_max
    >>> scores = [31.0, 35.0, 35.0, 48.0]  # raw scores, no normalisation needed
    >>> labels = [0, 0, 1, 1]
    >>> auroc(scores, labels)  # pairs (pos, neg): 35>31, 35=35 counts 1/2, 48>31, 48>35
    0.875
    >>> average_precision(scores, labels)  # recall 1/2 at precision 1, then 1/2 at 2/3
    0.8333333333333333
    >>> f1_max(scores, labels)  # best threshold 35: tp=2, fp=1, fn=0
    0.8

"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike


class _Counts(NamedTuple):
    """Cumulative positives/negatives at or above each distinct score, descending (int64)."""

    tp: np.ndarray
    fp: np.ndarray


def _as_scores(scores: ArrayLike) -> np.ndarray:
    arr = np.asarray(scores)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        msg = f"scores must be real numbers, got dtype {arr.dtype}"
        raise TypeError(msg)
    arr = arr.ravel()
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        msg = "scores contain NaN"
        raise ValueError(msg)
    return arr


def _as_binary(labels: ArrayLike, size: int, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels).ravel()
    if arr.size != size:
        msg = f"{name} has {arr.size} elements but the scores have {size}"
        raise ValueError(msg)
    if arr.dtype != np.bool_:
        if ((arr != 0) & (arr != 1)).any():
            msg = f"{name} must be 0/1 or boolean"
            raise ValueError(msg)
        arr = arr != 0
    return arr


def _descending_keys(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint32 keys whose ASCENDING order is the descending score order."""
    # Adding +0.0 turns -0.0 into +0.0, so the two zeros (equal scores) get one key.
    keys = (scores + np.float32(0.0)).view(np.int32)
    # IEEE-754 bit trick: negative floats already sort after positives and, as unsigned
    # integers, larger magnitudes (lower scores) come later; positive floats need their 31
    # magnitude bits inverted so that larger scores come first.
    flip = keys >> 31  # arithmetic shift: -1 for negative scores, 0 otherwise
    np.invert(flip, out=flip)
    flip &= 0x7FFFFFFF
    keys ^= flip
    return keys.view(np.uint32)


def _sort_descending(values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order ``codes`` by descending score and find the end of every tie group.

    Args:
        values: Non-empty scores as returned by ``_as_scores``.
        codes: One non-negative integer below 2**32 per score (label or region id), carried
            along by the sort.

    Returns:
        The codes in descending score order (order inside a tie group is arbitrary; possibly
        a strided view) and the indices of the last element of each group of equal scores.

    """
    if values.dtype == np.float64:
        with np.errstate(over="ignore"):
            narrow = values.astype(np.float32)
        if np.array_equal(narrow, values):
            values = narrow
    if values.dtype == np.float32:
        # Score key in the high half and code in the low half of one uint64: a single integer
        # sort (SIMD-accelerated in numpy) instead of a much slower argsort plus gathers.
        packed = np.empty(values.size, dtype=np.uint64)
        halves = packed.view(np.uint32).reshape(-1, 2)
        low, high = (0, 1) if np.little_endian else (1, 0)
        halves[:, high] = _descending_keys(values)
        halves[:, low] = codes
        packed.sort()
        sorted_codes = halves[:, low]
        sorted_keys = halves[:, high]
    else:
        order = np.argsort(values)[::-1]
        sorted_codes = codes[order]
        sorted_keys = values[order]
    is_end = np.empty(values.size, dtype=bool)
    np.not_equal(sorted_keys[:-1], sorted_keys[1:], out=is_end[:-1])
    is_end[-1] = True
    return sorted_codes, np.flatnonzero(is_end)


def _binary_counts(sorted_codes: np.ndarray, ends: np.ndarray) -> _Counts:
    # int32 running sums are exact below 2**31 elements and twice as fast as int64.
    dtype = np.int32 if sorted_codes.size < 2**31 else np.int64
    tp = np.cumsum(sorted_codes != 0, dtype=dtype)[ends].astype(np.int64)
    fp = ends.astype(np.int64)  # one array per distinct score at a time: there can be as many as pixels
    fp += 1
    fp -= tp
    return _Counts(tp=tp, fp=fp)


def _counts(scores: ArrayLike, labels: ArrayLike) -> _Counts | None:
    values = _as_scores(scores)
    positive = _as_binary(labels, values.size)
    if values.size == 0:
        return None
    return _binary_counts(*_sort_descending(values, positive))


def _auroc(counts: _Counts) -> float:
    n_pos, n_neg = int(counts.tp[-1]), int(counts.fp[-1])
    if n_pos == 0 or n_neg == 0:
        return math.nan
    new_tp = np.diff(counts.tp, prepend=0)
    new_fp = np.diff(counts.fp, prepend=0)
    # Each negative wins against the positives strictly above it and ties with the positives
    # in its own group: 2 * U = sum(new_fp * (2 * tp_above + new_tp)), exact in int64.
    twice_u = int(np.sum(new_fp * (2 * counts.tp - new_tp)))
    return twice_u / (2 * n_pos * n_neg)  # Python int division is correctly rounded


def _average_precision(counts: _Counts) -> float:
    n_pos = int(counts.tp[-1])
    if n_pos == 0:
        return math.nan
    precision = counts.tp / (counts.tp + counts.fp)
    return float(np.sum(np.diff(counts.tp, prepend=0) * precision) / n_pos)


def _f1_max(counts: _Counts) -> float:
    n_pos = int(counts.tp[-1])
    if n_pos == 0:
        return math.nan
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (tp + fp + n_pos)
    return float(np.max(2 * counts.tp / (counts.tp + counts.fp + n_pos)))


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic with ties counting 1/2.

    Args:
        scores: Raw anomaly scores, any shape (flattened); higher means more anomalous.
        labels: Ground truth of the same size, 1/True for anomalous.

    Returns:
        P(score of a random anomalous sample > score of a random normal one) + 1/2 P(equal),
        or NaN when only one class is present.

    """
    counts = _counts(scores, labels)
    return math.nan if counts is None else _auroc(counts)


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision with scikit-learn's step definition ``sum_n (R_n - R_{n-1}) P_n``.

    Every distinct score is one threshold (tied samples enter together), exactly as
    ``sklearn.metrics.average_precision_score``; no interpolation of the PR curve.

    Args:
        scores: Raw anomaly scores, any shape (flattened); higher means more anomalous.
        labels: Ground truth of the same size, 1/True for anomalous.

    Returns:
        The average precision in ``[0, 1]``, or NaN when there is no anomalous sample.

    """
    counts = _counts(scores, labels)
    return math.nan if counts is None else _average_precision(counts)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum F1 score over all thresholds ``score >= t`` (tied samples always together).

    Args:
        scores: Raw anomaly scores, any shape (flattened); higher means more anomalous.
        labels: Ground truth of the same size, 1/True for anomalous.

    Returns:
        The best F1 in ``[0, 1]``, or NaN when there is no anomalous sample.

    """
    counts = _counts(scores, labels)
    return math.nan if counts is None else _f1_max(counts)


def binary_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """AUROC, AP and F1-max from one sort; same values as the three separate functions.

    Returns:
        ``{"AUROC": ..., "AP": ..., "F1max": ...}``.

    """
    counts = _counts(scores, labels)
    if counts is None:
        return {"AUROC": math.nan, "AP": math.nan, "F1max": math.nan}
    return {"AUROC": _auroc(counts), "AP": _average_precision(counts), "F1max": _f1_max(counts)}
