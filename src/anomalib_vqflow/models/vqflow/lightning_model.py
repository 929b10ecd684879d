"""VQ-Flow: hierarchical vector quantization for unified anomaly detection with flows, as an Anomalib model.

VQ-Flow (Zhou et al., arXiv 2409.00942, "Taming Normalizing Flows for Multi-Class
Anomaly Detection via Hierarchical Vector Quantization") extends MSFlow to one model for
many categories without labels: a conceptual prototype codebook gives every image a
concept code, concept-specific pattern codebooks quantize local features around it, the
flows are conditioned on both, and the latents follow a Gaussian whose mean and scale
depend on the prototype (see :mod:`.torch_model`).

Paper defaults: convnextv2_base, 384 px, blocks ``[2, 5, 8]``, 32 prototypes of 512
dimensions, 512 pattern codes per level, 64 positional channels (1,088-channel
conditions, about 309M trainable parameters), Adam at 1e-4 with a linear warm-up from 0.1x
over 10 epochs and no decay, 60 epochs, batch 16, gradient norm clipped at 2.

Differences from the official code, each documented where it is built:

- the prior's likelihood includes its log-Jacobian (``prior_log_det=True``; ``False`` is
  the official objective), and its heads start at the standard normal;
- the codebooks' moving averages start at zero, so unused codes stay where they are
  instead of being scaled by ``1 / eps``;
- concept-aware calibration (new, off by default): scores can be standardised per prototype
  with statistics of good validation images (``concept_calibration``), so that one threshold
  serves concepts on different score scales; the official code evaluates each category on
  its own. The statistics are fitted in every validation epoch either way. Switched on after
  training, validation must run again (``Engine.validate``) before testing or exporting, so
  that Anomalib's post-processor refits its normalisation and threshold on the calibrated
  scores. It is off by default because, measured, the flows' per-image normalised scores
  leave it little to correct (see ``configs/model/vq_flow_cpu.yaml``);
- the training loader keeps its last, smaller batch (the official one drops it); a last
  batch of a single image is skipped, since batch norm needs two;
- no epoch is chosen on the test set, images are resized by Anomalib's antialiased
  bilinear pre-processor instead of LANCZOS.

While training, the health of every codebook is logged each epoch
(``codebook/<name>_perplexity``, ``codebook/<name>_unused``) together with how well the
prototypes separate the categories (``codebook/prototype_purity``, ``codebook/prototype_nmi``,
from the categories the data carries, for reporting only: the model never reads them).

Example:
    >>> from anomalib_vqflow.models import VqFlow
    >>> model = VqFlow(backbone="tf_efficientnet_lite0", num_blocks=(1, 1, 1), num_prototypes=4,
    ...                prototype_channels=8, num_patterns=8, position_channels=8)
    >>> sorted(model.model.codebooks)
    ['patterns_0', 'patterns_1', 'patterns_2', 'patterns_3', 'prototypes']

    From the command line (after ``pip install anomalib-vqflow``)::

        anomalib train --model VqFlow --data MultiClassMVTecAD --data.root ./datasets/MVTecAD
"""

import logging
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
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_vqflow.components.flows import AFFINE_CLAMPING
from anomalib_vqflow.components.quantizers import codebook_statistics
from anomalib_vqflow.evaluation.clustering import cluster_purity, normalized_mutual_information
from anomalib_vqflow.models.base import (
    FlowTrainingMixin,
    UnifiedModelMixin,
    preprocessed_batches,
    torch_model_from_hyperparameters,
)
from anomalib_vqflow.models.feature_cache import FeatureCacheMixin

from .anomaly_map import image_moments
from .loss import VqFlowLoss
from .torch_model import VqFlowModel

logger = logging.getLogger(__name__)


class VqFlow(FlowTrainingMixin, FeatureCacheMixin, UnifiedModelMixin, AnomalibModule):
    """VQ-Flow for unified multi-class anomaly detection.

    Args:
        backbone: timm model name (paper: ``convnextv2_base``; offline: ``tf_efficientnet_lite0``).
        layers: timm feature indices of the three flow stages and the conditioning stage;
            ``None`` taps the stages at strides 4, 8, 16 and 32.
        pre_trained: Use ImageNet weights for the backbone.
        backbone_weights: Local backbone weight file, for machines without internet.
        num_blocks: Coupling blocks of the parallel flow of each level.
        num_prototypes: Codes of the prototype codebook.
        prototype_channels: Dimension of the prototype codes.
        num_patterns: Codes of each level's pattern codebook.
        position_channels: Channels of the positional code (multiple of 4).
        codebook_decay: Decay of the codebooks' moving averages.
        restart_dead_codes: Move codes that fell out of use onto current inputs while training.
        commitment_weight: Weight of the commitment losses.
        prior_log_det: Exact likelihood of the prototype prior; ``False`` is the official objective.
        concept_calibration: Standardise scores per prototype with statistics of good validation images
            (fitted either way, so it can be switched on for a trained model).
        min_calibration_images: Good images a prototype needs for calibration statistics of its own.
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
        pre_processor: Anomalib pre-processor, ``True`` for the default (384 px, ImageNet normalisation).
        post_processor: Anomalib post-processor, ``True`` for the default.
        evaluator: Evaluator, ``True`` for the per-category :class:`~anomalib_vqflow.evaluation.UnifiedEvaluator`.
        visualizer: Anomalib visualizer, ``True`` for the default.

    Example:
        >>> import torch
        >>> model = VqFlow(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1), num_prototypes=4,
        ...                prototype_channels=8, num_patterns=8, position_channels=8).eval()
        >>> output = model.model(torch.rand(1, 3, 64, 64))  # the torch model on a pre-processed image
        >>> output.pred_score.shape, output.anomaly_map.shape
        (torch.Size([1]), torch.Size([1, 1, 64, 64]))
    """

    def __init__(
        self,
        backbone: str = "convnextv2_base",
        layers: Sequence[int] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        num_blocks: Sequence[int] = (2, 5, 8),
        num_prototypes: int = 32,
        prototype_channels: int = 512,
        num_patterns: int = 512,
        position_channels: int = 64,
        codebook_decay: float = 0.99,
        restart_dead_codes: bool = False,
        commitment_weight: float = 1.0,
        prior_log_det: bool = True,
        concept_calibration: bool = False,
        min_calibration_images: int = 3,
        clamp: float = AFFINE_CLAMPING,
        top_k: float = 0.03,
        anomaly_map_mode: str = "add",
        lr: float = 1e-4,
        warmup_epochs: int = 10,
        lr_milestones: Sequence[int] = (),
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
        self.model = torch_model_from_hyperparameters(self, VqFlowModel)
        self.loss = VqFlowLoss(commitment_weight=commitment_weight)
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.lr_milestones = list(lr_milestones)
        self.lr_gamma = lr_gamma
        self.codebook_health: dict[str, float] = {}
        self._epoch_prototypes: list[torch.Tensor] = []
        self._epoch_categories: list[str] = []

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (paper: 384 x 384) and normalise with ImageNet statistics."""
        return AnomalibModule.configure_pre_processor(image_size=image_size or (384, 384))

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Maximum likelihood plus commitment on a batch of good images (categories are not read).

        A batch of a single image is skipped: batch normalisation of the image-level
        descriptor needs two.
        """
        del args, kwargs
        batch_size = batch.image.shape[0]
        if batch_size < 2:
            logger.warning("Skipping a training batch of one image: VQ-Flow's batch norm needs at least two.")
            return None
        # Before the forward pass: in training it moves the codebooks, which a skipped batch must not do.
        if not self._finite_step(batch, image=batch.image):
            return None
        encoding = self.model(batch.image, features=self.cached_features(batch))
        loss = self.loss(encoding.latents, encoding.log_jacobian, encoding.commitment)
        if not self._finite_step(
            batch,
            loss=loss,
            log_jacobian=encoding.log_jacobian,
            latents=encoding.latents,
            commitment=encoding.commitment,
        ):
            return None
        self._epoch_prototypes.append(encoding.prototypes.detach().cpu())
        self._epoch_categories.extend(getattr(batch, "category", None) or [])
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train_commitment", encoding.commitment.detach(), on_epoch=True, batch_size=batch_size)
        return {"loss": loss}

    def on_train_epoch_start(self) -> None:
        """Count code use afresh every epoch."""
        super().on_train_epoch_start()
        for codebook in self.model.codebooks.values():
            codebook.reset_usage()
        self._epoch_prototypes.clear()
        self._epoch_categories.clear()

    def on_train_epoch_end(self) -> None:
        """Log the perplexity and unused codes of every codebook, and how the prototypes match the categories."""
        health: dict[str, float] = {}
        for name, codebook in self.model.codebooks.items():
            # Already the use over all ranks: the quantizer adds up its counts over them.
            perplexity, unused = codebook_statistics(codebook.usage)
            health[f"{name}_perplexity"] = perplexity
            health[f"{name}_unused"] = float(unused)
        prototypes = torch.cat(self._epoch_prototypes).tolist() if self._epoch_prototypes else []
        if prototypes and len(prototypes) == len(self._epoch_categories):
            health["prototype_purity"] = cluster_purity(prototypes, self._epoch_categories)
            health["prototype_nmi"] = normalized_mutual_information(prototypes, self._epoch_categories)
        self.codebook_health = health
        for name, value in health.items():
            self.log(f"codebook/{name}", value, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        """Fit the concept-aware calibration on the good validation images before they are scored.

        Anomalib's post-processor then fits its normalisation and threshold on the
        (calibrated, if ``concept_calibration``) scores of the same images. Only good images
        count (anomalous ones, if a validation split holds any, are left out). The statistics
        are fitted even with the calibration off. The pass reads the validation *dataset*
        through :func:`~anomalib_vqflow.models.base.preprocessed_batches`, so it never advances
        Lightning's validation loop and every rank fits the same statistics. A validation split taken from
        the test set is refused: calibration statistics come from training images only.
        Without validation data the calibration stays the identity.
        """
        split_mode = str(getattr(getattr(self.trainer, "datamodule", None), "val_split_mode", ""))
        if split_mode.rsplit(".", 1)[-1].lower() in {"same_as_test", "from_test"}:
            logger.warning(
                "Concept calibration skipped: the validation split (%s) holds test images; use "
                "val_split_mode='from_train' so that calibration never sees them.",
                split_mode,
            )
            return
        dataloaders = self.trainer.val_dataloaders
        if dataloaders is None:
            return
        collected: list[tuple[torch.Tensor, ...]] = []
        with torch.no_grad():
            for batch, images in preprocessed_batches(self, dataloaders):
                pred_score, anomaly_map, prototypes = self.model.uncalibrated_scores(
                    images, self.cached_features(batch, images)
                )
                good = torch.ones_like(prototypes, dtype=torch.bool)
                if batch.gt_label is not None:
                    good = batch.gt_label.to(self.device) == 0
                collected.append((pred_score[good], *(m[good] for m in image_moments(anomaly_map)), prototypes[good]))
        columns = [torch.cat(column) for column in zip(*collected, strict=True)]
        if not columns or len(columns[0]) < self.model.calibration.min_images:
            logger.warning(
                "Concept calibration skipped: %d good validation images, %d needed; scores stay uncalibrated.",
                len(columns[0]) if columns else 0,
                self.model.calibration.min_images,
            )
            return
        self.model.calibration.fit(*columns)
