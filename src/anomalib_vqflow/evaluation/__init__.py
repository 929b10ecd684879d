"""Exact, per-category evaluation for unified multi-class anomaly detection.

Why a package of its own: flow models emit raw log-likelihood scores (any real values), and
the stock metrics either squash them with a sigmoid (torchmetrics) or see them only after
Anomalib's post-processor has clamped them to ``[0, 1]``; both create ties and bias the
results. Here every metric is computed exactly from the raw scores (ties grouped, integer
counts, float64), per category, as the mean over categories and pooled over all of them.

- :mod:`.metrics`: ``auroc``, ``average_precision``, ``f1_max`` and ``aupro`` on NumPy arrays.
- :mod:`.per_category`: ``compute_metrics_table`` and its ``MetricsTable`` (CSV/JSON/Markdown).
- :mod:`.callback`: ``UnifiedEvaluator``, an Anomalib ``Evaluator``/Lightning callback that
  collects raw test outputs and reports the table.

Example:
    >>> from anomalib_vqflow.evaluation import auroc, compute_metrics_table
    >>> auroc([30.0, 42.0, 42.0, 50.0], [0, 0, 1, 1])  # ties count 1/2
    0.875
    >>> table = compute_metrics_table([30.0, 50.0, 0.2, 0.7], [0, 1, 0, 1], ["a", "a", "b", "b"])
    >>> table["mean"]["image_AUROC"], table["pooled"]["image_AUROC"]
    (1.0, 0.75)

"""

from anomalib_vqflow.evaluation.callback import UnifiedEvaluator
from anomalib_vqflow.evaluation.metrics import auroc, average_precision, f1_max
from anomalib_vqflow.evaluation.per_category import MetricsTable, compute_metrics_table
from anomalib_vqflow.evaluation.pixel import aupro

__all__ = [
    "MetricsTable",
    "UnifiedEvaluator",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics_table",
    "f1_max",
]
