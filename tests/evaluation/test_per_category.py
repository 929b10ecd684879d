"""Per-category table: rows equal independent computations; mean vs pooled; file outputs."""

import csv
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from anomalib.metrics.aupro import _AUPRO
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalib_vqflow.evaluation.metrics import auroc, average_precision, f1_max
from anomalib_vqflow.evaluation.per_category import MetricsTable, compute_metrics_table
from anomalib_vqflow.evaluation.pixel import aupro

PIXEL_COLUMNS = ("pixel_AUROC", "AUPRO", "pixel_AP", "pixel_F1max")


def _fixture() -> dict:
    """Three categories, given out of order; cable scores live on a 30..50 scale; zipper has no masks."""
    categories = [
        "cable",
        "bottle",
        "zipper",
        "bottle",
        "cable",
        "zipper",
        "bottle",
        "cable",
        "bottle",
        "cable",
        "zipper",
    ]
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    scores = np.array([31.0, 0.1, 2.0, 0.3, 45.0, 5.0, 0.3, 40.0, 0.8, 50.0, 3.0])
    rng = np.random.default_rng(0)
    masks = np.zeros((11, 8, 8), dtype=bool)
    masks[6, 1:4, 1:4] = True  # bottle
    masks[8, 5:8, 0:2] = masks[8, 0, 7] = True  # bottle, two regions
    masks[7, 2:6, 2:6] = True  # cable
    masks[9, 0:2, 0:8] = True  # cable
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2).astype(np.float32)
    is_cable = np.array([c == "cable" for c in categories])
    maps[is_cable] = maps[is_cable] * 20 + 30  # same shape, other scale
    return {"categories": categories, "labels": labels, "scores": scores, "maps": maps, "masks": masks}


@pytest.fixture
def data() -> dict:
    return _fixture()


@pytest.fixture
def table(data) -> MetricsTable:
    return compute_metrics_table(
        data["scores"], data["labels"], data["categories"], data["maps"], data["masks"], fpr_limit=0.3
    )


def _expected_row(data: dict, members: np.ndarray, with_pixels: bool) -> dict[str, float]:
    scores, labels = data["scores"][members], data["labels"][members]
    row = {
        "image_AUROC": auroc(scores, labels),
        "image_AP": average_precision(scores, labels),
        "image_F1max": f1_max(scores, labels),
    }
    if with_pixels:
        maps, masks = data["maps"][members], data["masks"][members]
        row |= {
            "pixel_AUROC": auroc(maps.ravel(), masks.ravel()),
            "AUPRO": aupro(maps, masks, fpr_limit=0.3),
            "pixel_AP": average_precision(maps.ravel(), masks.ravel()),
            "pixel_F1max": f1_max(maps.ravel(), masks.ravel()),
        }
    else:
        row |= dict.fromkeys(PIXEL_COLUMNS, math.nan)
    return row


def _assert_rows_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(MetricsTable.COLUMNS)
    for column, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[column]), column
        else:
            assert actual[column] == value, column


def test_rows_sorted_and_equal_independent_computations(data, table):
    assert list(table.rows) == ["bottle", "cable", "zipper", "mean", "pooled"]
    assert table.categories == ["bottle", "cable", "zipper"]
    names = np.array(data["categories"])
    for name in ("bottle", "cable"):
        _assert_rows_equal(table[name], _expected_row(data, names == name, with_pixels=True))
    # zipper has defect images but empty masks: image metrics only
    _assert_rows_equal(table["zipper"], _expected_row(data, names == "zipper", with_pixels=False))
    annotated = names != "zipper"
    pooled = _expected_row(data, np.ones(len(names), dtype=bool), with_pixels=False)
    pooled |= {k: v for k, v in _expected_row(data, annotated, True).items() if k in PIXEL_COLUMNS}
    _assert_rows_equal(table["pooled"], pooled)


def test_image_auroc_by_hand(table):
    # bottle: pos 0.3, 0.8 vs neg 0.1, 0.3 -> (1 + 1/2 + 2) / 4
    assert table["bottle"]["image_AUROC"] == 0.875
    # cable: pos 40, 50 vs neg 31, 45 -> (1 + 2) / 4
    assert table["cable"]["image_AUROC"] == 0.75
    assert table["zipper"]["image_AUROC"] == 1.0
    assert table["mean"]["image_AUROC"] == 0.875
    # pooled: pos 0.3 -> 1.5, 0.8 -> 2, 40 -> 4, 50 -> 5, 5.0 -> 3, 3.0 -> 3 of 6 * 5 pairs
    assert table["pooled"]["image_AUROC"] == float(Fraction(37, 60))


def test_mean_ignores_only_categories_without_pixel_annotations(table):
    for column in ("image_AUROC", "image_AP", "image_F1max"):
        values = [table[name][column] for name in ("bottle", "cable", "zipper")]
        assert table["mean"][column] == pytest.approx(sum(values) / 3, abs=1e-12)
    for column in PIXEL_COLUMNS:
        values = [table[name][column] for name in ("bottle", "cable")]
        assert table["mean"][column] == pytest.approx(sum(values) / 2, abs=1e-12)


def test_pooled_differs_from_mean_when_score_scales_differ(table):
    assert table["pooled"]["image_AUROC"] < table["mean"]["image_AUROC"] - 0.2
    assert table["pooled"]["pixel_AUROC"] != pytest.approx(table["mean"]["pixel_AUROC"], abs=1e-3)


def test_image_only_table_has_nan_pixel_columns(data):
    table = compute_metrics_table(data["scores"], data["labels"], data["categories"])
    for row in table.rows.values():
        assert all(math.isnan(row[column]) for column in PIXEL_COLUMNS)
        assert not math.isnan(row["image_AUROC"])


def test_invalid_inputs(data):
    with pytest.raises(ValueError, match="reserved"):
        compute_metrics_table([0.1, 0.2], [0, 1], ["mean", "mean"])
    with pytest.raises(ValueError, match="length"):
        compute_metrics_table([0.1, 0.2], [0, 1], ["a"])
    with pytest.raises(ValueError, match="shape"):
        compute_metrics_table(data["scores"], data["labels"], data["categories"], data["maps"][:, :4], data["masks"])


def test_files_keep_full_precision(table, tmp_path):
    paths = table.write(tmp_path / "run")
    assert sorted(path.name for path in paths) == [
        "metrics_per_category.csv",
        "metrics_per_category.json",
        "metrics_per_category.md",
    ]
    with (tmp_path / "run" / "metrics_per_category.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["category"] for row in rows] == list(table.rows)
    for row in rows:
        for column in MetricsTable.COLUMNS:
            value = table[row["category"]][column]
            parsed = float(row[column])
            assert math.isnan(parsed) if math.isnan(value) else parsed == value

    content = json.loads((tmp_path / "run" / "metrics_per_category.json").read_text())
    assert content["fpr_limit"] == 0.3
    assert content["columns"] == list(MetricsTable.COLUMNS)
    assert content["rows"]["zipper"]["AUPRO"] is None
    assert content["rows"]["pooled"]["AUPRO"] == table["pooled"]["AUPRO"]

    markdown = (tmp_path / "run" / "metrics_per_category.md").read_text()
    assert markdown == table.to_markdown()
    assert "| bottle | 87.5 |" in markdown
    assert "| zipper | 100.0 | n/a | n/a |" in markdown


def test_terminal_rendering_is_fixed_width(table):
    lines = str(table).splitlines()
    assert lines[0].split() == ["category", *MetricsTable.COLUMNS]
    data_lines = [line for line in lines if not line.startswith("-")]
    assert len({len(line) for line in data_lines}) == 1
    assert [line.split()[0] for line in data_lines[1:]] == list(table.rows)
    assert "n/a" in next(line for line in lines if line.startswith("zipper"))


def _f1_max_by_sklearn(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def _aupro_by_anomalib(maps: np.ndarray, masks: np.ndarray) -> float:
    metric = _AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
    return float(metric.compute())


def test_every_cell_against_other_implementations(data, table):
    """sklearn for AUROC, AP and F1-max, Anomalib's own AUPRO: implementations that share no code with ours."""
    names = np.array(data["categories"])
    groups = {"bottle": names == "bottle", "cable": names == "cable", "pooled": np.ones(len(names), dtype=bool)}
    for row, members in groups.items():
        scores, labels = data["scores"][members], data["labels"][members]
        assert table[row]["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert table[row]["image_AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert table[row]["image_F1max"] == pytest.approx(_f1_max_by_sklearn(scores, labels), abs=1e-12)
        annotated = members & (names != "zipper")
        maps, masks = data["maps"][annotated], data["masks"][annotated]
        flat_maps, flat_masks = maps.ravel().astype(np.float64), masks.ravel()
        assert table[row]["pixel_AUROC"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
        assert table[row]["pixel_AP"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-12)
        assert table[row]["pixel_F1max"] == pytest.approx(_f1_max_by_sklearn(flat_maps, flat_masks), abs=1e-12)
        assert table[row]["AUPRO"] == pytest.approx(_aupro_by_anomalib(maps, masks), abs=1e-5)
