"""What every plugin model shares on top of Anomalib's ``AnomalibModule``.

:class:`FlowTrainingMixin` is the training recipe of the multi-scale flows (MSFlow and
VQ-Flow): Adam on the trainable parameters with a linear warm-up from 0.1x and a step
decay, stepped per epoch, gradient norm clipped at 2, no sanity validation.

:class:`UnifiedModelMixin` gives a model the per-category evaluator and puts it *before*
Anomalib's post-processor in the callback list. The post-processor normalises scores in
place and clamps them to ``[0, 1]``, which turns distinct raw scores into ties; metrics
computed after it are wrong whenever raw scores fall outside the validation range. The
evaluator therefore reads the raw scores first. The mixin also scores validation images:
every plugin model learns from good images only and returns an ``InferenceBatch`` in eval mode.

It is a mixin, not a subclass of ``AnomalibModule``: ``anomalib.models.list_models()``
lists only *direct* subclasses of ``AnomalibModule``, so each model subclasses both.

Example:
    >>> from anomalib_vqflow.models import MsFlow
    >>> [type(callback).__name__ for callback in MsFlow(backbone="tf_efficientnet_lite0").configure_callbacks()]
    ['PreProcessor', 'UnifiedEvaluator', 'PostProcessor', 'ImageVisualizer']
"""

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRSchedulerConfig
from torch.utils.data import DataLoader

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


class UnifiedModelMixin:
    """Per-category evaluation on raw scores, and non-finite guards, for the plugin's ``AnomalibModule`` models.

    A model calls :meth:`_init_non_finite_guard` in its constructor and :meth:`_finite_step` in its
    training step (see :mod:`anomalib_vqflow.components.guards`).

    Example:
        >>> type(UnifiedModelMixin.configure_evaluator()).__name__
        'UnifiedEvaluator'
    """

    pre_processor: object
    post_processor: object
    evaluator: object
    visualizer: object
    non_finite: str
    cached_features: Callable[..., list[torch.Tensor] | None]
    global_step: int
    current_epoch: int

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
        self.log("train_skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        return False

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Stop as soon as an optimizer step leaves a trainable weight non-finite (a finite loss can do that).

        Raises:
            NonFiniteError: naming the weights and the step.
        """
        super().on_train_batch_end(*args, **kwargs)  # type: ignore[misc]
        trainable = ((name, p) for name, p in self.named_parameters() if p.requires_grad)  # type: ignore[attr-defined]
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
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        model_tensors = ((name, t) for name, t in checkpoint.get("state_dict", {}).items() if name.startswith("model."))
        if bad := non_finite_names(model_tensors):
            msg = f"Refusing to write a checkpoint with non-finite tensors: {bad[:5]}."
            raise NonFiniteError(msg)
        checkpoint[_RNG_STATES_KEY] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random generators' states of the checkpoint for the first training epoch after it."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._rng_states_to_restore = checkpoint.get(_RNG_STATES_KEY)

    def on_train_epoch_start(self) -> None:
        """Resume the random streams where the checkpoint left them, so a resumed run repeats the uninterrupted one.

        Restored here rather than at load time: between loading and this point, Lightning's sanity
        validation and the training loader's start draw from the global generator in a resumed
        run only. (The training order itself does not use it: see ``EpochShuffleSampler``.)
        """
        super().on_train_epoch_start()  # type: ignore[misc]
        if states := getattr(self, "_rng_states_to_restore", None):
            _restore_rng_states(states)
            self._rng_states_to_restore = None

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

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's OpenVINO export, plus ``score.py`` next to ``model.xml``: scoring without PyTorch.

        See :mod:`anomalib_vqflow.deploy.score`; ``anomalib export`` and ``Engine.export`` both come here.
        """
        model_file = super().to_openvino(export_root, *args, **kwargs)  # type: ignore[misc]
        write_scorer(model_file.parent)
        return model_file

    def to_onnx(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's ONNX export, plus ``score.py`` next to ``model.onnx`` (OpenVINO runs ONNX files as they are).

        Written at opset :data:`EXPORT_OPSET` unless ``opset_version`` is given (``onnx_kwargs`` of
        the OpenVINO export come here too).
        """
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        model_file = super().to_onnx(export_root, *args, **kwargs)  # type: ignore[misc]
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
            return super()._compress_ov_model(model, compression_type, datamodule, *args, **kwargs)  # type: ignore[misc]
        import nncf

        head = head_ignored_scope(model)
        if compression_type == CompressionType.INT8:
            return nncf.compress_weights(model, ignored_scope=head)
        return nncf.quantize(model, calibration_dataset(model, datamodule), ignored_scope=head)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score validation images; Anomalib's post-processor fits normalisation and thresholds on them."""
        del args, kwargs
        return batch.update(**self.model(batch.image, features=self.cached_features(batch))._asdict())

    @property
    def learning_type(self) -> LearningType:
        """The models learn from good images only."""
        return LearningType.ONE_CLASS


def preprocessed_batches(
    module: LightningModule,
    dataloaders: DataLoader | Sequence[DataLoader],
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Every batch of the datasets behind ``dataloaders``, with its images pre-processed on the module's device.

    The datasets are read again through loaders of their own (in the main process, in
    order, every image on every rank), so that a pass made from a hook never advances the
    iterator of Lightning's loop (which persistent workers would share) and every rank sees
    the same images. For statistics that a model fits from its training or validation data.
    """
    transform = getattr(getattr(module, "pre_processor", None), "transform", None)
    for stage_loader in dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]:
        loader = DataLoader(
            stage_loader.dataset, batch_size=stage_loader.batch_size, collate_fn=stage_loader.collate_fn
        )
        for batch in loader:
            images = batch.image.to(module.device)
            yield batch, transform(images) if transform is not None else images


def warmup_multistep_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int], gamma: float) -> float:
    """Learning-rate factor at ``epoch``: linear warm-up from 0.1, then a step decay by ``gamma`` at each milestone.

    >>> [round(warmup_multistep_factor(e, 2, [3], 0.5), 2) for e in range(5)]
    [0.1, 0.55, 1.0, 0.5, 0.5]
    """
    warmup = 0.1 + 0.9 * epoch / warmup_epochs if epoch < warmup_epochs else 1.0
    return warmup * gamma ** sum(epoch >= milestone for milestone in milestones)


def warmup_cosine_factor(epoch: int, warmup_epochs: int, total_epochs: int | None, min_factor: float) -> float:
    """Learning-rate factor at ``epoch``: cosine from 1 to ``min_factor`` over ``total_epochs``, after a linear warm-up.

    The warm-up goes from 0.1 to the cosine's value at its end. Without a known number of
    epochs (``None`` or negative), the factor stays at 1 after the warm-up.

    >>> [round(warmup_cosine_factor(e, 1, 4, 0.0), 3) for e in range(5)]
    [0.1, 0.854, 0.5, 0.146, 0.0]
    """

    def cosine(step: int) -> float:
        if total_epochs is None or total_epochs <= 0:
            return 1.0
        progress = min(step / total_epochs, 1.0)
        return min_factor + (1.0 - min_factor) * (1.0 + math.cos(math.pi * progress)) / 2.0

    if epoch < warmup_epochs:
        return 0.1 + (cosine(warmup_epochs) - 0.1) * epoch / warmup_epochs
    return cosine(epoch)


class FlowTrainingMixin:
    """Optimiser, schedule, validation step and trainer settings of the multi-scale flow models.

    The model sets ``model`` (its torch model), ``lr``, ``warmup_epochs``, ``lr_milestones``
    and ``lr_gamma``.

    Example:
        >>> from anomalib_vqflow.models import MsFlow
        >>> MsFlow(backbone="tf_efficientnet_lite0", pre_trained=False).trainer_arguments
        {'gradient_clip_val': 2.0, 'gradient_clip_algorithm': 'norm', 'num_sanity_val_steps': 0}
    """

    model: torch.nn.Module
    lr: float
    warmup_epochs: int
    lr_milestones: list[int]
    lr_gamma: float

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """Adam on the trainable parameters (the backbone is frozen), warm-up then step decay, stepped per epoch."""
        optimizer = torch.optim.Adam((p for p in self.model.parameters() if p.requires_grad), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda epoch: warmup_multistep_factor(epoch, self.warmup_epochs, self.lr_milestones, self.lr_gamma),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Clip the gradient norm at 2 as the papers do; no sanity validation."""
        return {"gradient_clip_val": 2.0, "gradient_clip_algorithm": "norm", "num_sanity_val_steps": 0}
