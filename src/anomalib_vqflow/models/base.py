"""What every plugin model shares on top of Anomalib's ``AnomalibModule``.

:class:`UnifiedModelMixin` gives a model the per-category evaluator and puts it *before*
Anomalib's post-processor in the callback list. The post-processor normalises scores in
place and clamps them to ``[0, 1]``, which turns distinct raw scores into ties; metrics
computed after it are wrong whenever raw scores fall outside the validation range. The
evaluator therefore reads the raw scores first.

It is a mixin, not a subclass of ``AnomalibModule``: ``anomalib.models.list_models()``
lists only *direct* subclasses of ``AnomalibModule``, so each model subclasses both.

Example:
    >>> from anomalib_vqflow.models import MsFlow
    >>> [type(callback).__name__ for callback in MsFlow(backbone="tf_efficientnet_lite0").configure_callbacks()]
    ['PreProcessor', 'UnifiedEvaluator', 'PostProcessor', 'ImageVisualizer']
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.metrics import Evaluator
from lightning.pytorch import Callback

from anomalib_vqflow.evaluation import UnifiedEvaluator


class UnifiedModelMixin:
    """Per-category evaluation on raw scores for the plugin's ``AnomalibModule`` models."""

    pre_processor: object
    post_processor: object
    evaluator: object
    visualizer: object

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Per-category and pooled metrics from raw scores (see ``anomalib_vqflow.evaluation``)."""
        return UnifiedEvaluator()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """Restore a model without fetching backbone weights: the checkpoint already holds them.

        The saved hyperparameters say ``pre_trained=True``; rebuilding with them would download
        the backbone (or read a ``backbone_weights`` file that may be gone) only to overwrite it
        with the checkpoint's copy, and fails offline. Anomalib's ``export``, ``predict`` and
        ``test`` with ``ckpt_path`` go through here.
        """
        kwargs.setdefault("pre_trained", False)
        kwargs.setdefault("backbone_weights", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def configure_callbacks(self) -> Sequence[Callback]:
        """Anomalib's components, with the evaluator ahead of the post-processor."""
        components = (self.pre_processor, self.evaluator, self.post_processor, self.visualizer)
        return [component for component in components if isinstance(component, Callback)]
