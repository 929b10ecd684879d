"""The plugin models' mixins, one job each; :class:`~.base.UnifiedModelMixin` composes them.

- :class:`NonFiniteGuardMixin`: a NaN or an infinity in training stops it (or skips the batch)
  and never reaches a checkpoint (:mod:`anomalib_vqflow.components.guards`);
- :class:`ExactResumeMixin`: the random generators' states travel with the checkpoint, so a
  resumed run repeats the uninterrupted one;
- :class:`OfflineCheckpointMixin`: a checkpoint restores the model without fetching backbone weights;
- :class:`ScorerExportMixin`: exports carry the torch-free ``score.py``, at an opset that converts
  cleanly, and INT8 quantizes the backbone only;
- :class:`UnifiedEvaluationMixin`: the per-category evaluator ahead of Anomalib's post-processor,
  the validation step, the learning type.

Each calls ``super()`` in its hooks, so they compose in any order before ``AnomalibModule``.

Example:
    >>> type(UnifiedEvaluationMixin.configure_evaluator()).__name__
    'UnifiedEvaluator'
"""

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_vqflow.components.guards import (
    NonFiniteError,
    check_non_finite_action,
    first_non_finite,
    non_finite_names,
)
from anomalib_vqflow.deploy import write_scorer
from anomalib_vqflow.deploy.quantization import calibration_dataset, head_ignored_scope
from anomalib_vqflow.evaluation import UnifiedEvaluator

if TYPE_CHECKING:
    # Only exports need OpenVINO; importing a model should not load it.
    import openvino as ov
    from anomalib.models import AnomalibModule

    # Type checkers see the mixins as what they are mixed into (their super() calls and self.log reach it);
    # at run time they stay plain classes, so list_models() does not list them as models.
    MixinBase = AnomalibModule
else:
    MixinBase = object

logger = logging.getLogger(__name__)

_RNG_STATES_KEY = "anomalib_vqflow_rng_states"
# torch's exporter writes opset 18; Anomalib asks for 14, and the down-conversion fails on Pad
# ("No Adapter To Version $17 for Pad"), prints a traceback and keeps 18 anyway.
EXPORT_OPSET = 18


def _rng_states() -> dict[str, Any]:
    """Collect the states of Python's, NumPy's and torch's global generators, as types ``weights_only`` loads."""
    # The legacy global generator is the one third-party code and seed_everything use.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    # A checkpoint written on another number of GPUs (or none) has no matching CUDA states to restore.
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class NonFiniteGuardMixin(MixinBase):
    """Check every training step, every optimizer step and every checkpoint for NaN and infinity.

    A model calls :meth:`_init_non_finite_guard` in its constructor and :meth:`_finite_step` in its
    training step (see :mod:`anomalib_vqflow.components.guards`).

    Example:
        >>> guard = NonFiniteGuardMixin()
        >>> guard._init_non_finite_guard("stop")
        >>> guard.non_finite, guard.skipped_batches
        ('stop', 0)
    """

    non_finite: str

    def _init_non_finite_guard(self, non_finite: str) -> None:
        self.non_finite = check_non_finite_action(non_finite)
        self.skipped_batches = 0

    def _finite_step(self, batch: Batch, **tensors: torch.Tensor | Sequence[torch.Tensor]) -> bool:
        """Whether the training step may go on: ``False`` for a batch to skip; :class:`NonFiniteError` to stop.

        Raises:
            NonFiniteError: a tensor holds a NaN or an infinity and ``non_finite`` is ``"stop"``.
        """
        found = first_non_finite(**tensors)
        if found is None:
            return True
        name, count = found
        message = (
            f"Non-finite {name} at training step {self.global_step} (epoch {self.current_epoch}): {count}. "
            f"Images of the batch: {list(batch.image_path or [])}."
        )
        if self.non_finite == "stop":
            msg = f"{message} Nothing of this step was applied; pass non_finite='skip' to skip such batches."
            raise NonFiniteError(msg)
        self.skipped_batches += 1
        logger.warning("Skipped a training batch. %s", message)
        self.log("train_skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return False

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Stop as soon as an optimizer step leaves a trainable weight non-finite (a finite loss can do that).

        Raises:
            NonFiniteError: naming the weights and the step.
        """
        super().on_train_batch_end(*args, **kwargs)
        trainable = ((name, p) for name, p in self.named_parameters() if p.requires_grad)
        if bad := non_finite_names(trainable):
            msg = f"Non-finite weights after training step {self.global_step}: {bad[:5]}; no checkpoint will hold them."
            raise NonFiniteError(msg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint whose model weights or buffers are not finite.

        The torch model's tensors only: Anomalib's post-processor keeps infinite or NaN
        placeholders (a pixel threshold without anomalous validation pixels, for one).

        Raises:
            NonFiniteError: naming the tensors.
        """
        super().on_save_checkpoint(checkpoint)
        model_tensors = ((name, t) for name, t in checkpoint.get("state_dict", {}).items() if name.startswith("model."))
        if bad := non_finite_names(model_tensors):
            msg = f"Refusing to write a checkpoint with non-finite tensors: {bad[:5]}."
            raise NonFiniteError(msg)


class ExactResumeMixin(MixinBase):
    """Resume with the random streams where the checkpoint left them: a killed run repeats the uninterrupted one.

    Example:
        >>> sorted(_rng_states())
        ['cuda', 'numpy', 'python', 'torch']
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random generators' states with the checkpoint."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[_RNG_STATES_KEY] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random generators' states of the checkpoint for the first training epoch after it."""
        super().on_load_checkpoint(checkpoint)
        self._rng_states_to_restore = checkpoint.get(_RNG_STATES_KEY)

    def on_train_epoch_start(self) -> None:
        """Resume the random streams where the checkpoint left them, so a resumed run repeats the uninterrupted one.

        Restored here rather than at load time: between loading and this point, Lightning's sanity
        validation and the training loader's start draw from the global generator in a resumed
        run only. (The training order itself does not use it: see ``EpochShuffleSampler``.)
        """
        super().on_train_epoch_start()
        if states := getattr(self, "_rng_states_to_restore", None):
            _restore_rng_states(states)
            self._rng_states_to_restore = None


class OfflineCheckpointMixin(MixinBase):
    """Restore from a checkpoint without fetching the backbone's weights: the checkpoint holds them.

    Example:
        >>> callable(OfflineCheckpointMixin.load_from_checkpoint)
        True
    """

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
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


class ScorerExportMixin(MixinBase):
    """Exports that score without PyTorch, convert cleanly and quantize only what INT8 keeps accurate.

    Example:
        >>> EXPORT_OPSET
        18
    """

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's OpenVINO export, plus ``score.py`` next to ``model.xml``: scoring without PyTorch.

        See :mod:`anomalib_vqflow.deploy.score`; ``anomalib export`` and ``Engine.export`` both come here.
        """
        model_file = super().to_openvino(export_root, *args, **kwargs)
        write_scorer(model_file.parent)
        return model_file

    def to_onnx(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's ONNX export, plus ``score.py`` next to ``model.onnx`` (OpenVINO runs ONNX files as they are).

        Written at opset :data:`EXPORT_OPSET` unless ``opset_version`` is given (``onnx_kwargs`` of
        the OpenVINO export come here too).
        """
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        model_file = super().to_onnx(export_root, *args, **kwargs)
        write_scorer(model_file.parent)
        return model_file

    def _compress_ov_model(
        self,
        model: "ov.Model",
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> "ov.Model":
        """Anomalib's NNCF compression, except that INT8 (weights, or PTQ) is for the backbone alone.

        The heads stay in floating point (see :mod:`anomalib_vqflow.deploy.quantization`: whole-graph
        INT8 PTQ leaves a flow at chance level). ``INT8_ACQ`` is refused: Anomalib 2.7 tunes it on
        the test split, which would choose the deployed model by its test results.
        """
        if compression_type == CompressionType.INT8_ACQ:
            msg = (
                "compression_type=int8_acq tunes the quantization on the test images (Anomalib validates it on "
                "datamodule.test_dataloader()); use int8_ptq, calibrated on validation images."
            )
            raise ValueError(msg)
        if compression_type not in {CompressionType.INT8, CompressionType.INT8_PTQ}:
            return super()._compress_ov_model(model, compression_type, datamodule, *args, **kwargs)
        import nncf

        head = head_ignored_scope(model)
        if compression_type == CompressionType.INT8:
            return nncf.compress_weights(model, ignored_scope=head)
        return nncf.quantize(model, calibration_dataset(model, datamodule), ignored_scope=head)


class UnifiedEvaluationMixin(MixinBase):
    """Per-category evaluation on raw scores: the evaluator ahead of the post-processor; validation on good images.

    Example:
        >>> type(UnifiedEvaluationMixin.configure_evaluator()).__name__
        'UnifiedEvaluator'
    """

    cached_features: Callable[..., list[torch.Tensor] | None]

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Per-category and pooled metrics from raw scores (see ``anomalib_vqflow.evaluation``)."""
        return UnifiedEvaluator()

    def configure_callbacks(self) -> Sequence[Callback]:
        """Anomalib's components, with the evaluator ahead of the post-processor."""
        components = (self.pre_processor, self.evaluator, self.post_processor, self.visualizer)
        return [component for component in components if isinstance(component, Callback)]

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score validation images; Anomalib's post-processor fits normalisation and thresholds on them."""
        del args, kwargs
        return batch.update(**self.model(batch.image, features=self.cached_features(batch))._asdict())

    @property
    def learning_type(self) -> LearningType:
        """The models learn from good images only."""
        return LearningType.ONE_CLASS
