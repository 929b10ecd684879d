"""Per-category, mean and pooled metric table for unified (multi-class) anomaly detection.

Why: a unified model is one model for every category, and the literature reports the
metrics per category plus their mean. The mean hides one thing that matters in
deployment: one model usually runs with ONE threshold for the whole line, so the scores of
all categories must also be comparable with each other. The "pooled" row ranks all samples
of all categories together and exposes categories whose score scales differ.

Rows: one per category (sorted by name), ``mean`` (the mean over categories of each
column) and ``pooled``. Pixel metrics of a category need at least one anomalous pixel in
its masks; categories without pixel annotations get NaN there, are left out of the mean of
the pixel columns and of the pooled pixel metrics, and keep their image metrics. Values
are fractions in ``[0, 1]``; the Markdown and terminal renderings show percentages.

Example:
    >>> from anomalib_vqflow.evaluation.per_category import compute_metrics_table
    >>> table = compute_metrics_table(
    ...     pred_scores=[0.1, 0.9, 0.4, 40.0, 45.0, 50.0],
    ...     gt_labels=[0, 1, 1, 0, 0, 1],
    ...     categories=["cable", "cable", "cable", "screw", "screw", "screw"],
    ... )
    >>> table["cable"]["image_AUROC"], table["screw"]["image_AUROC"], table["mean"]["image_AUROC"]
    (1.0, 1.0, 1.0)
    >>> table["pooled"]["image_AUROC"]  # normal screws (40, 45) outscore both defective cables
    0.5555555555555556

"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike

from anomalib_vqflow.evaluation.metrics import binary_metrics
from anomalib_vqflow.evaluation.pixel import pixel_metrics

IMAGE_COLUMNS = ("image_AUROC", "image_AP", "image_F1max")
PIXEL_COLUMNS = ("pixel_AUROC", "AUPRO", "pixel_AP", "pixel_F1max")
SUMMARY_ROWS = ("mean", "pooled")


def _format_percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


@dataclass(frozen=True)
class MetricsTable:
    """Metric values per row (categories, ``mean``, ``pooled``) and column, as fractions.

    Attributes:
        rows: ``{row name: {column: value}}`` in display order; NaN where undefined.
        fpr_limit: The FPR integration limit used for AUPRO.

    Example:
        >>> table = compute_metrics_table([0.2, 0.8, 3.0, 5.0], [0, 1, 0, 1], ["a", "a", "b", "b"])
        >>> table.categories, table.to_markdown().splitlines()[2]
        (['a', 'b'], '| a | 100.0 | n/a | n/a | 100.0 | n/a | 100.0 | n/a |')
    """

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "image_AUROC",
        "pixel_AUROC",
        "AUPRO",
        "image_AP",
        "pixel_AP",
        "image_F1max",
        "pixel_F1max",
    )
    FILE_STEM: ClassVar[str] = "metrics_per_category"

    rows: dict[str, dict[str, float]]
    fpr_limit: float = 0.3

    @property
    def categories(self) -> list[str]:
        """The category rows, sorted by name."""
        return [name for name in self.rows if name not in SUMMARY_ROWS]

    def __getitem__(self, row: str) -> dict[str, float]:
        return self.rows[row]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready content: NaN becomes ``None`` (JSON has no NaN)."""
        return {
            "fpr_limit": self.fpr_limit,
            "columns": list(self.COLUMNS),
            "rows": {
                name: {col: None if math.isnan(value) else value for col, value in values.items()}
                for name, values in self.rows.items()
            },
        }

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table in percent with one decimal."""
        lines = [
            "| category | " + " | ".join(self.COLUMNS) + " |",
            "|:---|" + "---:|" * len(self.COLUMNS),
        ]
        for name, values in self.rows.items():
            label = f"**{name}**" if name in SUMMARY_ROWS else name
            lines.append(f"| {label} | " + " | ".join(_format_percent(values[c]) for c in self.COLUMNS) + " |")
        lines.append("")
        lines.append(
            f"Values in %. AUPRO integrated up to FPR {self.fpr_limit:g}. n/a: no pixel annotations "
            "(or only one class). mean: mean over categories; pooled: all categories ranked together."
        )
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV with full float precision (``nan`` where undefined)."""
        path = Path(path)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["category", *self.COLUMNS])
            for name, values in self.rows.items():
                writer.writerow([name, *(repr(values[c]) for c in self.COLUMNS)])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON with full float precision."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``metrics_per_category.{csv,json,md}`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        markdown = folder / f"{self.FILE_STEM}.md"
        markdown.write_text(self.to_markdown())
        csv_path = self.to_csv(folder / f"{self.FILE_STEM}.csv")
        return [csv_path, self.to_json(folder / f"{self.FILE_STEM}.json"), markdown]

    def __str__(self) -> str:
        name_width = max(len("category"), *(len(name) for name in self.rows))
        columns = [(column, max(len(column), 5)) for column in self.COLUMNS]
        header = f"{'category':<{name_width}}  " + "  ".join(f"{column:>{width}}" for column, width in columns)
        rule = "-" * len(header)
        lines = [header, rule]
        for name, values in self.rows.items():
            if name == SUMMARY_ROWS[0]:
                lines.append(rule)
            cells = "  ".join(f"{_format_percent(values[column]):>{width}}" for column, width in columns)
            lines.append(f"{name:<{name_width}}  {cells}")
        return "\n".join(lines)


def _image_columns(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {f"image_{name}": value for name, value in binary_metrics(scores, labels).items()}


def _pixel_columns(maps: np.ndarray | None, masks: np.ndarray | None, fpr_limit: float) -> dict[str, float]:
    if maps is None or masks is None:
        return dict.fromkeys(PIXEL_COLUMNS, math.nan)
    values = pixel_metrics(maps, masks, fpr_limit)
    return {
        "pixel_AUROC": values["AUROC"],
        "AUPRO": values["AUPRO"],
        "pixel_AP": values["AP"],
        "pixel_F1max": values["F1max"],
    }


def _ordered(row: dict[str, float]) -> dict[str, float]:
    return {column: row[column] for column in MetricsTable.COLUMNS}


def _members(selected: np.ndarray) -> slice | np.ndarray:
    """Index of the selected rows: a slice when they are contiguous, so that indexing the maps copies nothing."""
    index = np.flatnonzero(selected)
    if index.size and index[-1] - index[0] + 1 == index.size:
        return slice(int(index[0]), int(index[-1]) + 1)
    return selected


def _mean(values: list[float]) -> float:
    # fsum: an exactly rounded sum, so the mean does not depend on the category order.
    return math.fsum(values) / len(values) if values else math.nan


def compute_metrics_table(
    pred_scores: ArrayLike,
    gt_labels: ArrayLike,
    categories: Sequence[str],
    anomaly_maps: ArrayLike | None = None,
    gt_masks: ArrayLike | None = None,
    fpr_limit: float = 0.3,
) -> MetricsTable:
    """Compute image and pixel metrics per category, their mean and the pooled values.

    Args:
        pred_scores: Raw image scores, shape ``(N,)``.
        gt_labels: Image labels ``(N,)``, 1 for anomalous.
        categories: Category name of every image, length ``N``.
        anomaly_maps: Raw anomaly maps ``(N, H, W)``, or ``None`` for image metrics only.
        gt_masks: Ground-truth masks ``(N, H, W)`` (bool or 0/1), or ``None``.
        fpr_limit: FPR integration limit of AUPRO.

    Returns:
        The table; see the module docstring for the meaning of the rows.

    """
    scores = np.asarray(pred_scores).ravel()
    labels = np.asarray(gt_labels).ravel()
    names = np.asarray([str(category) for category in categories])
    if not scores.size == labels.size == names.size:
        msg = f"pred_scores, gt_labels and categories differ in length: {scores.size}, {labels.size}, {names.size}"
        raise ValueError(msg)
    if clash := set(SUMMARY_ROWS) & set(names.tolist()):
        msg = f"category names {sorted(clash)} are reserved for summary rows"
        raise ValueError(msg)
    maps = masks = None
    if anomaly_maps is not None and gt_masks is not None:
        maps, masks = np.asarray(anomaly_maps), np.asarray(gt_masks)
        if maps.ndim != 3 or maps.shape != masks.shape or maps.shape[0] != scores.size:
            msg = f"anomaly_maps and gt_masks must have shape (N={scores.size}, H, W), got {maps.shape}, {masks.shape}"
            raise ValueError(msg)

    rows: dict[str, dict[str, float]] = {}
    annotated = np.zeros(scores.size, dtype=bool)  # images of categories with pixel annotations
    pixel_rows: list[dict[str, float]] = []
    for name in sorted(set(names.tolist())):
        members = _members(names == name)
        row = _image_columns(scores[members], labels[members])
        member_masks = None if masks is None else masks[members]
        if member_masks is not None and member_masks.any():
            annotated[members] = True
            row.update(_pixel_columns(maps[members], member_masks, fpr_limit))
            pixel_rows.append(row)
        else:
            row.update(_pixel_columns(None, None, fpr_limit))
        rows[name] = _ordered(row)

    category_rows = list(rows.values())
    rows["mean"] = _ordered(
        {column: _mean([row[column] for row in category_rows]) for column in IMAGE_COLUMNS}
        | {column: _mean([row[column] for row in pixel_rows]) for column in PIXEL_COLUMNS}
    )
    pooled = _image_columns(scores, labels)
    if annotated.all():
        pooled.update(_pixel_columns(maps, masks, fpr_limit))
    elif annotated.any():
        pooled.update(_pixel_columns(maps[annotated], masks[annotated], fpr_limit))
    else:
        pooled.update(_pixel_columns(None, None, fpr_limit))
    rows["pooled"] = _ordered(pooled)
    return MetricsTable(rows=rows, fpr_limit=fpr_limit)
