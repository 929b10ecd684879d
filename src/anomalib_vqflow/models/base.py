"""What every plugin model shares on top of Anomalib's ``AnomalibModule``.

:class:`FlowTrainingMixin` is the training recipe of the multi-scale flows (MSFlow and
VQ-Flow): Adam on the trainable parameters with a linear warm-up from 0.1x and a step
decay, stepped per epoch, gradient norm clipped at 2, no sanity validation.

:class:`UnifiedModelMixin` composes the mixins of :mod:`.mixins`, one job each: non-finite
guards, exact resume, offline checkpoints, export with the scorer, and unified evaluation. The
last gives a model the per-category evaluator and puts it *before* Anomalib's post-processor in
the callback list. The post-processor normalises scores in
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

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from anomalib.data import Batch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.utils.data import DataLoader

from .mixins import (
    ExactResumeMixin,
    NonFiniteGuardMixin,
    OfflineCheckpointMixin,
    ScorerExportMixin,
    UnifiedEvaluationMixin,
)


class UnifiedModelMixin(
    NonFiniteGuardMixin, ExactResumeMixin, OfflineCheckpointMixin, ScorerExportMixin, UnifiedEvaluationMixin
):
    """Everything a plugin ``AnomalibModule`` model adds to Anomalib's: the mixins of :mod:`.mixins`, one job each.

    Example:
        >>> [mixin.__name__ for mixin in UnifiedModelMixin.__bases__]  # doctest: +NORMALIZE_WHITESPACE
        ['NonFiniteGuardMixin', 'ExactResumeMixin', 'OfflineCheckpointMixin', 'ScorerExportMixin',
         'UnifiedEvaluationMixin']
    """


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def torch_model_from_hyperparameters(module: LightningModule, model_class: type[ModelT], **overrides: Any) -> ModelT:
    """Build ``model_class`` from ``module``'s hyperparameters of the same names, and ``overrides``.

    Every plugin model's Lightning signature repeats its torch model's arguments under the same
    names, so all four build their torch model in this one way, from what Anomalib saves in
    ``hparams`` and a checkpoint restores.

    Raises:
        TypeError: If an argument of ``model_class`` is neither a hyperparameter nor overridden: a
            renamed argument must fail, not fall back to its default.

    Example:
        >>> from anomalib_vqflow.models import MsFlow
        >>> from anomalib_vqflow.models.msflow.torch_model import MsFlowModel
        >>> module = MsFlow(backbone="tf_efficientnet_lite0", num_blocks=[1, 1, 1], pre_trained=False)
        >>> torch_model_from_hyperparameters(module, MsFlowModel, condition_channels=8).condition_channels
        8
    """
    names = inspect.signature(model_class).parameters
    arguments = {name: value for name, value in module.hparams.items() if name in names} | overrides
    missing = sorted(set(names) - set(arguments))
    if missing:
        msg = f"{type(module).__name__} has no hyperparameters {missing} for {model_class.__name__}."
        raise TypeError(msg)
    return model_class(**arguments)


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
