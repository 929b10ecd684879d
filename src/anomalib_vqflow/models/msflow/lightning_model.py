"""MSFlow: multi-scale flow-based anomaly detection, as an Anomalib model.

MSFlow (Zhou et al., TNNLS 2024, "MSFlow: Multi-Scale Flow-based Framework for
Unsupervised Anomaly Detection") maps the features of three backbone stages to Gaussian
latents with parallel flows of asymmetric depth and a fusion flow that exchanges
information across scales, then scores pixels by their likelihood. Here it is trained
in the unified setting: one model on the good images of every category, no labels.

Paper defaults: wide_resnet50_2, 512 px, blocks ``[2, 5, 8]``, Adam at 1e-4, 100 epochs
with a linear warm-up from 0.1x over 12 epochs and a decay by 0.33 at epochs 70 and 90,
gradient norm clipped at 2. Differences from the official code: images are resized with
torchvision's antialiased bilinear resize (Anomalib's pre-processor) instead of LANCZOS,
no epoch is chosen on the test set (the last epoch is kept), and the fusion coupling also
handles odd channel counts.

Example:
    >>> from anomalib_vqflow.models import MsFlow
    >>> model = MsFlow(backbone="tf_efficientnet_lite0", num_blocks=(1, 1, 1), condition_channels=16)
    >>> model.learning_type.value
    'one_class'

    From the command line (after ``pip install anomalib-vqflow``)::

        anomalib train --model MsFlow --data MultiClassMVTecAD --data.root ./datasets/MVTecAD
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_vqflow.components.flows import AFFINE_CLAMPING
from anomalib_vqflow.models.base import FlowTrainingMixin, UnifiedModelMixin, torch_model_from_hyperparameters
from anomalib_vqflow.models.feature_cache import FeatureCacheMixin

from .loss import MsFlowLoss
from .torch_model import MsFlowModel


class MsFlow(FlowTrainingMixin, FeatureCacheMixin, UnifiedModelMixin, AnomalibModule):
    """MSFlow for unified multi-class anomaly detection.

    Args:
        backbone: timm model name (paper: ``wide_resnet50_2``; offline: ``tf_efficientnet_lite0``).
        layers: timm feature indices; ``None`` taps the stages at strides 4, 8 and 16.
        pre_trained: Use ImageNet weights for the backbone.
        backbone_weights: Local backbone weight file, for machines without internet.
        num_blocks: Coupling blocks of the parallel flow of each scale.
        condition_channels: Channels of the positional-encoding condition.
        clamp: Affine clamping of the couplings.
        top_k: Share of pixels averaged into the image score.
        anomaly_map_mode: ``"add"`` (paper's localization map), ``"mul"``, or ``"nll"`` (unnormalised
            negative log-likelihood, the ``_cpu`` configs'; :mod:`anomalib_vqflow.components.scoring`).
        lr: Adam learning rate.
        warmup_epochs: Epochs of linear warm-up from 0.1 x ``lr``.
        lr_milestones: Epochs at which the learning rate is multiplied by ``lr_gamma``.
        lr_gamma: Step decay factor.
        non_finite: What a NaN or an infinity in a training step does: ``"stop"`` raises, ``"skip"`` drops
            the batch (:mod:`anomalib_vqflow.components.guards` says what is checked).
        feature_cache: Compute the frozen features of every training image once and train on them
            (:mod:`anomalib_vqflow.models.feature_cache`); ``None``: wherever that is exact,
            ``True``: an error where it is not, ``False``: never.
        pre_processor: Anomalib pre-processor, ``True`` for the default (512 px, ImageNet normalisation).
        post_processor: Anomalib post-processor, ``True`` for the default.
        evaluator: Evaluator, ``True`` for the per-category :class:`~anomalib_vqflow.evaluation.UnifiedEvaluator`.
        visualizer: Anomalib visualizer, ``True`` for the default.

    Example:
        >>> import torch
        >>> model = MsFlow(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1)).eval()
        >>> output = model.model(torch.rand(1, 3, 64, 64))  # the torch model on a pre-processed image
        >>> output.pred_score.shape, output.anomaly_map.shape
        (torch.Size([1]), torch.Size([1, 1, 64, 64]))
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        num_blocks: Sequence[int] = (2, 5, 8),
        condition_channels: int = 64,
        clamp: float = AFFINE_CLAMPING,
        top_k: float = 0.03,
        anomaly_map_mode: str = "add",
        lr: float = 1e-4,
        warmup_epochs: int = 12,
        lr_milestones: Sequence[int] = (70, 90),
        lr_gamma: float = 0.33,
        non_finite: str = "stop",
        feature_cache: bool | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self._init_non_finite_guard(non_finite)
        self._init_feature_cache(feature_cache)
        self.model = torch_model_from_hyperparameters(self, MsFlowModel)
        self.loss = MsFlowLoss()
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.lr_milestones = list(lr_milestones)
        self.lr_gamma = lr_gamma

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (paper: 512 x 512) and normalise with ImageNet statistics."""
        return AnomalibModule.configure_pre_processor(image_size=image_size or (512, 512))

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Maximum-likelihood step on a batch of good images (categories are not read)."""
        del args, kwargs
        if not self._finite_step(batch, image=batch.image):
            return None
        latents, log_jacobian = self.model(batch.image, features=self.cached_features(batch))
        loss = self.loss(latents, log_jacobian)
        if not self._finite_step(batch, loss=loss, log_jacobian=log_jacobian, latents=latents):
            return None
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return {"loss": loss}
