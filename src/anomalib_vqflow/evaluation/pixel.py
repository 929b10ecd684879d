"""Pixel metrics and AUPRO, exact and from one sort of all pixels.

The per-region overlap (PRO) curve of MVTec AD's official evaluation, computed without
thresholds or bins: every distinct raw score is a threshold, the counts are the integer ones
of :mod:`.metrics` (same sort, same tie groups), and the overlaps accumulate in float64. Pixel
AUROC, AP and F1-max come from the same sort, which matters at 10^7..10^8 pixels.

Example:
    >>> import numpy as np
    >>> maps = np.array([[[5.0, 0.0], [1.0, 0.0]]])
    >>> masks = np.array([[[1, 1], [0, 0]]])
    >>> pixel_metrics(maps, masks, fpr_limit=1.0)["AUPRO"] == aupro(maps, masks, fpr_limit=1.0)
    True
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from anomalib_vqflow.evaluation.metrics import (
    _as_binary,
    _as_scores,
    _auroc,
    _average_precision,
    _binary_counts,
    _Counts,
    _f1_max,
    _sort_descending,
)

# 8-connectivity inside each image and none across images: MVTec's official evaluation code
# labels ground-truth regions with ``scipy.ndimage.label(gt, np.ones((3, 3)))`` and Anomalib's
# AUPRO uses ``cv2.connectedComponents`` (8-connectivity by default) on CPU, so both agree.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True
# Pixels per chunk of the overlap's running sum: 8 MiB of float64 at a time.
_CUMSUM_CHUNK = 1 << 20


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
