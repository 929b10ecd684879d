"""Exact metrics from raw scores: hand-computed values, tie handling and sklearn cross-checks."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.classification import BinaryAUROC

from anomalib_vqflow.evaluation import pixel
from anomalib_vqflow.evaluation.metrics import auroc, average_precision, binary_metrics, f1_max
from anomalib_vqflow.evaluation.pixel import aupro, pixel_metrics

# Six samples with a tie between a positive and a negative at 0.7.
SIX_SCORES = [0.9, 0.8, 0.7, 0.7, 0.3, 0.1]
SIX_LABELS = [1, 0, 1, 0, 1, 0]


def test_auroc_with_ties_by_hand():
    scores = [0.1, 0.4, 0.4, 0.4, 0.8, 0.9]
    labels = [0, 0, 1, 1, 0, 1]
    # positives 0.4, 0.4, 0.9; negatives 0.1, 0.4, 0.8.
    # each 0.4 positive: beats 0.1 (1), ties 0.4 (1/2), loses to 0.8 (0) -> 3/2, twice -> 3
    # 0.9 beats all three negatives -> 3;  AUROC = 6 / 9 = 2/3
    assert auroc(scores, labels) == float(Fraction(2, 3))


def test_auroc_is_rank_invariant_on_raw_scores_far_outside_unit_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    # raw flow-like scores in [30, 50] on a 0.5 grid (ties included), anomalies shifted up
    raw = np.round((30 + 12 * rng.random(200) + 8 * labels) * 2) / 2
    rescaled = (raw - 30) / 20
    value = auroc(raw, labels)
    assert value == auroc(rescaled, labels)
    assert value == pytest.approx(roc_auc_score(labels, raw), abs=1e-12)
    assert value > 0.85


def test_torchmetrics_sigmoid_pitfall_on_raw_scores():
    # torchmetrics applies a sigmoid to scores outside [0, 1]; in float32 sigmoid(30..50) == 1.0
    # for all of them, so every pair ties and the AUROC collapses to 0.5.
    raw = torch.tensor([30.0, 35.0, 40.0, 45.0, 48.0, 50.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert auroc(raw.numpy(), labels.numpy()) == 1.0
    assert float(BinaryAUROC()(raw, labels)) == 0.5


def test_average_precision_and_f1_max_by_hand():
    # Tie groups in descending order (cumulative tp, fp), 3 positives:
    #   0.9 -> (1, 0): P = 1,   R = 1/3
    #   0.8 -> (1, 1): P = 1/2, R = 1/3
    #   0.7 -> (2, 2): P = 1/2, R = 2/3   (tie: positive and negative enter together)
    #   0.3 -> (3, 2): P = 3/5, R = 1
    #   0.1 -> (3, 3): P = 1/2, R = 1
    # AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 3/5 = 21/30 = 7/10
    # (breaking the tie positive-first would give 1/3 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45 instead)
    assert average_precision(SIX_SCORES, SIX_LABELS) == pytest.approx(float(Fraction(7, 10)), abs=1e-15)
    assert average_precision(SIX_SCORES, SIX_LABELS) == pytest.approx(
        average_precision_score(SIX_LABELS, SIX_SCORES), abs=1e-15
    )
    # F1 = 2 tp / (tp + fp + 3): 2/4, 2/5, 4/7, 6/8, 6/9 -> max 3/4 at threshold 0.3
    assert f1_max(SIX_SCORES, SIX_LABELS) == 0.75


def test_binary_metrics_matches_single_functions():
    assert binary_metrics(SIX_SCORES, SIX_LABELS) == {
        "AUROC": auroc(SIX_SCORES, SIX_LABELS),
        "AP": average_precision(SIX_SCORES, SIX_LABELS),
        "F1max": f1_max(SIX_SCORES, SIX_LABELS),
    }


def _brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        best = max(best, 2 * tp / (predicted.sum() + labels.sum()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])  # None: continuous scores; 1: many ties
def test_cross_check_against_sklearn_on_random_data(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(_brute_force_f1_max(scores, labels), abs=1e-12)


def test_float64_scores_that_float32_would_merge_stay_distinct():
    # 1 + 1e-12 rounds to 1.0 in float32; the float64 path must still rank it higher.
    assert auroc(np.array([1.0, 1.0 + 1e-12]), [0, 1]) == 1.0
    assert auroc(np.array([1.0, 1.0]), [0, 1]) == 0.5


def test_float32_and_float64_inputs_agree_and_signed_zeros_tie():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300), 1).astype(np.float32)
    assert binary_metrics(scores, labels) == binary_metrics(scores.astype(np.float64), labels)
    assert auroc(np.array([-0.0, 0.0], dtype=np.float32), [0, 1]) == 0.5
    assert auroc(np.array([-3.0, -1.0, 2.0, -0.5], dtype=np.float32), [0, 0, 1, 1]) == 1.0


def test_undefined_and_invalid_inputs():
    assert np.isnan(auroc([1.0, 2.0], [1, 1]))
    assert np.isnan(auroc([], []))
    assert np.isnan(average_precision([1.0, 2.0], [0, 0]))
    assert np.isnan(f1_max([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError, match="0/1"):
        auroc([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="elements"):
        auroc([1.0, 2.0, 3.0], [0, 1])


def _pro_example() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 maps: image 0 has one 2x2 region in the top-left corner, image 1 is normal."""
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 1, 0], maps[0, 1, 1] = 0.9, 0.8, 0.4, 0.2  # region
    maps[1, 3, 3] = 0.85  # normal pixels with high scores
    maps[0, 3, 3] = 0.5
    maps[1, 0, 0] = 0.4  # ties with a region pixel
    return maps, masks


# 28 normal pixels, one region of 4 pixels. Descending tie groups -> (FPR, PRO):
#   0.9 region -> (0, 1/4); 0.85 normal -> (1/28, 1/4); 0.8 region -> (1/28, 1/2);
#   0.5 normal -> (2/28, 1/2); 0.4 region + normal -> (3/28, 3/4); 0.2 region -> (3/28, 1);
#   0.0 (25 normal pixels) -> (1, 1).  The curve starts at (0, 0).
PRO_POINTS = [
    (Fraction(0), Fraction(0)),
    (Fraction(0), Fraction(1, 4)),
    (Fraction(1, 28), Fraction(1, 4)),
    (Fraction(1, 28), Fraction(1, 2)),
    (Fraction(2, 28), Fraction(1, 2)),
    (Fraction(3, 28), Fraction(3, 4)),
    (Fraction(3, 28), Fraction(1)),
    (Fraction(1), Fraction(1)),
]


def _exact_aupro(limit: Fraction) -> Fraction:
    area = Fraction(0)
    for (x0, y0), (x1, y1) in itertools.pairwise(PRO_POINTS):
        if x0 >= limit:
            break
        if x1 > limit:  # linear interpolation at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_by_hand():
    maps, masks = _pro_example()
    # up to 0.3: 0.25/28 + 0.5/28 + 0.625/28 + (0.3 - 3/28) * 1, divided by 0.3 = 271/336
    assert _exact_aupro(Fraction(3, 10)) == Fraction(271, 336)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(271 / 336, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(float(1 - Fraction(13, 8) / 28), abs=1e-12)


def test_aupro_interpolates_at_the_fpr_limit():
    maps, masks = _pro_example()
    # 0.09 lies inside the diagonal step from (2/28, 1/2) to (3/28, 3/4): PRO there is 0.63
    expected = _exact_aupro(Fraction(9, 100))
    assert expected == (
        Fraction(1, 4) / 28 + Fraction(1, 2) / 28 + (Fraction(9, 100) - Fraction(2, 28)) * Fraction(113, 200)
    ) / Fraction(9, 100)
    assert aupro(maps, masks, fpr_limit=0.09) == pytest.approx(float(expected), abs=1e-12)
    # a limit that is exactly a curve point needs no interpolation
    assert aupro(maps, masks, fpr_limit=1 / 28) == pytest.approx(float(_exact_aupro(Fraction(1, 28))), abs=1e-12)


def test_aupro_uses_8_connectivity():
    maps = np.zeros((1, 3, 3))
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True  # (1, 2) touches (0, 1) diagonally only
    maps[0, 1, 2] = 1.0
    # 8-connectivity: one region of 3 pixels, PRO jumps to 1/3, then rises with the tie at 0
    # to (1, 1): area (1/3 + 1) / 2 = 2/3 (4-connectivity would give two regions and 3/4).
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(2 / 3, abs=1e-12)


def test_aupro_undefined_and_perfect():
    maps, masks = _pro_example()
    assert np.isnan(aupro(maps, np.zeros_like(masks)))
    assert np.isnan(aupro(maps, np.ones_like(masks)))
    assert aupro(masks.astype(np.float32) * 40 + 30, masks) == 1.0
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="shape"):
        aupro(maps, masks[:, :, :3])


def test_pixel_metrics_equal_the_single_functions():
    rng = np.random.default_rng(4)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = masks[2, 10:14, 1:4] = masks[2, 0:2, 12:16] = masks[5, 7:9, 7:9] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1).astype(np.float32)
    values = pixel_metrics(maps, masks)
    assert values == {
        "AUROC": auroc(maps, masks),
        "AP": average_precision(maps, masks),
        "F1max": f1_max(maps, masks),
        "AUPRO": aupro(maps, masks),
    }
    assert values["AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_pro_curve_in_chunks_equals_one_running_sum(chunk, monkeypatch):
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = masks[1, 10:14, 1:4] = masks[2, 0:3, 0:3] = True
    maps = np.round(rng.normal(size=masks.shape) + masks, 1).astype(np.float32)  # rounded: ties across chunks
    whole = aupro(maps, masks, fpr_limit=1.0)
    monkeypatch.setattr(pixel, "_CUMSUM_CHUNK", chunk)
    assert aupro(maps, masks, fpr_limit=1.0) == whole  # bit for bit: the same additions in the same order


def test_aupro_close_to_anomalib_on_continuous_maps():
    from anomalib.metrics.aupro import _AUPRO

    rng = np.random.default_rng(5)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 4:12, 4:10] = masks[1, 20:30, 2:5] = masks[3, 0:3, 0:32] = True
    maps = rng.random(masks.shape).astype(np.float32) + 0.4 * masks
    reference = _AUPRO(fpr_limit=0.3)
    reference.update(torch.from_numpy(maps), torch.from_numpy(masks).int())
    # same definition; anomalib accumulates in float32, hence the tolerance
    assert aupro(maps, masks) == pytest.approx(float(reference.compute()), abs=1e-5)
