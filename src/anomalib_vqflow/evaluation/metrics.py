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
scores fall back to ``argsort`` so that no two distinct values are merged.

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
from scipy import ndimage

# 8-connectivity inside each image and none across images: MVTec's official evaluation code
# labels ground-truth regions with ``scipy.ndimage.label(gt, np.ones((3, 3)))`` and Anomalib's
# AUPRO uses ``cv2.connectedComponents`` (8-connectivity by default) on CPU, so both agree.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_CUMSUM_CHUNK = 1 << 20
_STACK_STRUCTURE[1] = True


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


def _check_maps(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flattened scores and ``(N, H, W)`` boolean masks, after checking shapes and values."""
    maps = np.asarray(anomaly_maps)
    gt = np.asarray(masks)
    if maps.ndim not in {2, 3} or gt.shape != maps.shape:
        msg = f"anomaly_maps and masks must both have shape (N, H, W) or (H, W), got {maps.shape} and {gt.shape}"
        raise ValueError(msg)
    return _as_scores(maps), _as_binary(gt, maps.size, name="masks").reshape((-1, *maps.shape[-2:]))


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Label connected ground-truth regions: region id per pixel (0 = normal), count, sizes."""
    regions, n_regions = ndimage.label(masks, structure=_STACK_STRUCTURE)
    sizes = np.bincount(regions[masks], minlength=n_regions + 1)
    return regions, int(n_regions), sizes


def _pro_curve(
    sorted_regions: np.ndarray,
    ends: np.ndarray,
    counts: _Counts,
    n_regions: int,
    sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """PRO curve at every distinct score, starting at the origin.

    ``counts`` are the binary counts of the same sort (region pixels positive): their false
    positives are exactly the normal pixels at or above each score.

    Returns:
        The number of normal pixels at or above each threshold (float64, exact integers) and
        the mean per-region overlap there, both with a leading 0; ``None`` when there is no
        normal or no anomalous pixel.

    """
    if counts.fp[-1] == 0 or n_regions == 0:
        return None
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / sizes[1:]  # a pixel of region r adds 1/|r| to that region's overlap
    # The running sum over all pixels, a chunk at a time (8 bytes per pixel of a chunk, not of all pixels): the
    # chunk's first gain starts from the total so far, so every partial sum is the one of a single cumsum.
    overlap = np.empty(ends.size)
    total, done = 0.0, 0
    for start in range(0, sorted_regions.size, _CUMSUM_CHUNK):
        gains = weight[sorted_regions[start : start + _CUMSUM_CHUNK]]
        gains[0] += total
        np.cumsum(gains, out=gains)
        inside = int(np.searchsorted(ends, start + gains.size, side="left"))
        overlap[done:inside] = gains[ends[done:inside] - start]
        total, done = gains[-1], inside
    # The total is R in exact arithmetic; dividing by the float64 total instead of R keeps
    # the curve monotone and ending at exactly 1 despite ~1e7 rounded additions.
    overlap /= overlap[-1]
    return np.concatenate(([0.0], counts.fp)), np.concatenate(([0.0], overlap))


def _area_up_to(normal_above: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under the PRO curve on ``FPR in [0, fpr_limit]``, divided by ``fpr_limit``.

    Works in units of normal pixels (FPR times ``N_normal``), where the x steps are exact
    integers, so no rounding accumulates along the x axis (a perfect map scores 1).
    """
    limit = fpr_limit * float(normal_above[-1])
    last = int(np.searchsorted(normal_above, limit, side="right")) - 1
    x, y = normal_above[: last + 1], pro[: last + 1]
    area = float(np.sum(np.diff(x) * (y[:-1] + y[1:]))) / 2
    if x[-1] < limit:
        # The curve ends at FPR 1 >= fpr_limit, so the next point exists and lies beyond the limit.
        step = (limit - x[-1]) / (normal_above[last + 1] - x[-1])
        pro_at_limit = y[-1] + step * (pro[last + 1] - y[-1])
        area += (limit - x[-1]) * (y[-1] + pro_at_limit) / 2
    return float(area / limit)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise ValueError(msg)


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Definition (MVTec AD's official ``compute_pro``): ground-truth regions are the
    8-connected components of each mask; at threshold ``t`` the FPR is the fraction of all
    normal pixels (of every image) with score ``>= t`` and the PRO is the mean over all
    regions ``r`` of the fraction of ``r`` with score ``>= t``. The curve is computed
    exactly: all pixels sorted by descending score, each normal pixel adds
    ``1 / N_normal`` to the FPR, each pixel of region ``r`` adds ``1 / (R * |r|)`` to the
    PRO, and a group of equal scores is one step (a diagonal segment when it mixes normal
    and region pixels). The area is integrated by trapezoids from FPR 0 to ``fpr_limit``,
    with linear interpolation at the limit, and divided by ``fpr_limit`` so that a perfect
    map scores 1.

    Difference from ``anomalib.metrics.AUPRO`` (2.7): that metric builds the same sorted
    curve, but in float32 (the running FPR/PRO sums lose precision over tens of millions of
    pixels), and within Anomalib's default evaluator it sees the post-processed maps, which
    are clamped to ``[0, 1]`` and so tie every pixel beyond the normalisation range. Anomalib
    1.x built the curve from torchmetrics ROC curves at binned thresholds. Here the raw maps
    are used, every distinct value is a threshold and all sums are exact integers or float64.

    Args:
        anomaly_maps: Raw anomaly maps of shape ``(N, H, W)`` (or one ``(H, W)`` map).
        masks: Ground-truth masks of the same shape, boolean or 0/1.
        fpr_limit: Upper integration limit of the FPR, in ``(0, 1]``.

    Returns:
        The normalised AUPRO in ``[0, 1]``, or NaN when there is no anomalous or no normal
        pixel.

    Example:
        >>> import numpy as np
        >>> maps = np.array([[[5.0, 0.0], [1.0, 0.0]]])
        >>> masks = np.array([[[1, 1], [0, 0]]])  # one region of two pixels
        >>> # PRO 1/2 from FPR 0 to 1/2; the tie at 0.0 (one normal, one region pixel) then
        >>> # rises diagonally to (1, 1): area 1/4 + 3/8
        >>> aupro(maps, masks, fpr_limit=1.0)
        0.625

    """
    _check_fpr_limit(fpr_limit)
    values, gt = _check_maps(anomaly_maps, masks)
    if values.size == 0:
        return math.nan
    regions, n_regions, sizes = _label_regions(gt)
    sorted_regions, ends = _sort_descending(values, regions.ravel())
    curve = _pro_curve(sorted_regions, ends, _binary_counts(sorted_regions, ends), n_regions, sizes)
    return math.nan if curve is None else _area_up_to(*curve, fpr_limit)


def pixel_metrics(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO from a single sort of all pixels.

    The values are identical to ``auroc``/``average_precision``/``f1_max`` on the flattened
    maps and masks and to :func:`aupro`; sorting once matters for 10^7..10^8 pixels.

    Returns:
        ``{"AUROC": ..., "AP": ..., "F1max": ..., "AUPRO": ...}``.

    """
    _check_fpr_limit(fpr_limit)
    values, gt = _check_maps(anomaly_maps, masks)
    if values.size == 0:
        return dict.fromkeys(("AUROC", "AP", "F1max", "AUPRO"), math.nan)
    regions, n_regions, sizes = _label_regions(gt)
    sorted_regions, ends = _sort_descending(values, regions.ravel())
    del regions  # 4 bytes per pixel that the cumulative sums below can reuse
    counts = _binary_counts(sorted_regions, ends)
    curve = _pro_curve(sorted_regions, ends, counts, n_regions, sizes)
    return {
        "AUROC": _auroc(counts),
        "AP": _average_precision(counts),
        "F1max": _f1_max(counts),
        "AUPRO": math.nan if curve is None else _area_up_to(*curve, fpr_limit),
    }
