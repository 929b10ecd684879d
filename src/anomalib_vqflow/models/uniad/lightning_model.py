"""UniAD: the unified feature-reconstruction baseline, as an Anomalib model.

UniAD (You et al., NeurIPS 2022, "A Unified Model for Multi-class Anomaly Detection") is the
model every unified (multi-class) anomaly-detection paper compares against, and Anomalib has
none. A transformer reconstructs the frozen multi-stage features of normal images; three
choices keep it from learning the identity ("identical shortcut") when one model must cover
many categories: feature jitter while training, a learned query per decoder layer, and
attention masked on each position's own neighbourhood. Pixels are scored by their
reconstruction error (:mod:`.torch_model`, :mod:`.anomaly_map`).

Paper settings: efficientnet_b4 stages at strides 2/4/8/16 (272 channels) on a 14 x 14 grid at
224 px, transformer width 256, 8 heads, 4 + 4 layers, FFN 1024, dropout 0.1, 7 x 7 neighbour
mask, jitter scale 20; AdamW at 1e-4 with weight decay 1e-4, 1000 epochs, step decay x0.1 at
epoch 800, gradient norm clipped at 0.1, batch 8.

Differences from the official code:

- the last epoch is kept; the official training picks the best checkpoint by the test set's
  mean pixel AUROC, and its evaluation flips any AUROC below 0.5;
- images are resized with torchvision's antialiased bilinear resize (Anomalib's pre-processor),
  not OpenCV's;
- the backbone is timm's ``efficientnet_b4`` (PyTorch padding) instead of the lukemelas
  EfficientNet-PyTorch port (TF "same" padding), as in the ADer re-implementation;
- the jitter's Bernoulli draw comes from torch's generator instead of Python's ``random``;
- Lightning steps the learning-rate decay after each epoch, so the rate drops for the 801st
  epoch (index 800); the official loop drops it one epoch later.

Example:
    >>> from anomalib_vqflow.models import UniAd
    >>> model = UniAd(backbone="tf_efficientnet_lite0", hidden_channels=32, num_heads=2, feedforward_channels=64)
    >>> model.model.grid
    (14, 14)

    From the command line (after ``pip install anomalib-vqflow``)::

        anomalib train --model UniAd --data MultiClassMVTecAD --data.root ./datasets/MVTecAD
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRSchedulerConfig

from anomalib_vqflow.models.base import UnifiedModelMixin, torch_model_from_hyperparameters
from anomalib_vqflow.models.feature_cache import FeatureCacheMixin

from .loss import UniAdLoss
from .torch_model import UniAdModel


class UniAd(FeatureCacheMixin, UnifiedModelMixin, AnomalibModule):
    """UniAD for unified multi-class anomaly detection.

    The torch model is built for the input size of the pre-processor (its learned queries and
    position embeddings have one entry per grid position).

    Args:
        backbone: timm model name (paper: ``efficientnet_b4``; offline: ``tf_efficientnet_lite0``).
        layers: timm feature indices; ``None`` taps the stages at strides 2, 4, 8 and 16.
        pre_trained: Use ImageNet weights for the backbone.
        backbone_weights: Local backbone weight file, for machines without internet.
        feature_stride: Stride of the grid the stages are resampled to.
        hidden_channels: Transformer width.
        num_heads: Attention heads.
        num_encoder_layers: Encoder layers.
        num_decoder_layers: Decoder layers, each with its own learned query.
        feedforward_channels: Hidden width of the feed-forward blocks.
        dropout: Transformer dropout.
        neighbor_size: Side of the masked neighbourhood in grid positions; ``None`` for no mask.
        jitter_scale: Scale of the training feature jitter; 0 for none.
        jitter_probability: Chance per batch of jittering.
        pool_size: Average pooling in pixels before the image score's maximum.
        stage_resampling: ``"bilinear"`` (UniAD's point sampling of the finer stages) or ``"average"``
            (their mean over each grid cell).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_step: Epochs between learning-rate decays.
        lr_gamma: Learning-rate decay factor.
        non_finite: What a NaN or an infinity in a training step does: ``"stop"`` raises, ``"skip"`` drops
            the batch (:mod:`anomalib_vqflow.components.guards` says what is checked).
        feature_cache: Compute the frozen features of every training image once and train on them
            (:mod:`anomalib_vqflow.models.feature_cache`); ``None``: wherever that is exact,
            ``True``: an error where it is not, ``False``: never.
        pre_processor: Anomalib pre-processor, ``True`` for the default (224 px, ImageNet normalisation).
        post_processor: Anomalib post-processor, ``True`` for the default.
        evaluator: Evaluator, ``True`` for the per-category :class:`~anomalib_vqflow.evaluation.UnifiedEvaluator`.
        visualizer: Anomalib visualizer, ``True`` for the default.

    Raises:
        ValueError: If the pre-processor does not fix an input size.

    Example:
        >>> import torch
        >>> model = UniAd(backbone="tf_efficientnet_lite0", pre_trained=False, hidden_channels=16, num_heads=2,
        ...               num_encoder_layers=1, num_decoder_layers=1, feedforward_channels=32,
        ...               neighbor_size=3, pre_processor=UniAd.configure_pre_processor(image_size=(64, 64))).eval()
        >>> output = model.model(torch.rand(1, 3, 64, 64))
        >>> output.pred_score.shape, output.anomaly_map.shape
        (torch.Size([1]), torch.Size([1, 1, 64, 64]))
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        layers: Sequence[int] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        feature_stride: int = 16,
        hidden_channels: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        feedforward_channels: int = 1024,
        dropout: float = 0.1,
        neighbor_size: int | None = 7,
        jitter_scale: float = 20.0,
        jitter_probability: float = 1.0,
        pool_size: int = 16,
        stage_resampling: str = "bilinear",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_step: int = 800,
        lr_gamma: float = 0.1,
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
        self.model = self._build_model()
        self.loss = UniAdLoss()
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_step = lr_step
        self.lr_gamma = lr_gamma

    def _build_model(self, **overrides: Any) -> UniAdModel:
        if self.input_size is None:
            msg = "UniAd needs a pre-processor that resizes to a fixed input size: the model is built for it."
            raise ValueError(msg)
        return torch_model_from_hyperparameters(self, UniAdModel, input_size=self.input_size, **overrides)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (paper: 224 x 224) and normalise with ImageNet statistics."""
        return AnomalibModule.configure_pre_processor(image_size=image_size or (224, 224))

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW on the trainable parameters (the backbone is frozen), step decay per epoch."""
        optimizer = torch.optim.AdamW(
            (p for p in self.model.parameters() if p.requires_grad),
            lr=self.lr,
            betas=(0.9, 0.999),
            weight_decay=self.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Clip the gradient norm at 0.1 as UniAD does; no sanity validation."""
        return {"gradient_clip_val": 0.1, "gradient_clip_algorithm": "norm", "num_sanity_val_steps": 0}

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Reconstruct the clean features of good images from jittered ones (categories are not read)."""
        del args, kwargs
        if not self._finite_step(batch, image=batch.image):
            return None
        output = self.model(batch.image, features=self.cached_features(batch))
        loss = self.loss(output.reconstruction, output.target)
        if not self._finite_step(batch, loss=loss, reconstruction=output.reconstruction):
            return None
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the torch model for the checkpoint's input size before its weights are loaded.

        ``load_from_checkpoint`` first builds the model with the default pre-processor (the
        pre-processor is not a hyperparameter); Anomalib restores the saved one here, and a model
        trained at another size needs queries and position embeddings of another shape.
        """
        super().on_load_checkpoint(checkpoint)
        if self.input_size != self.model.input_size:
            # The checkpoint holds the backbone's weights: fetching them (maybe offline) would be wasted.
            rebuilt = self._build_model(pre_trained=False, backbone_weights=None)
            self.model = rebuilt.to(next(self.model.parameters()).device)
