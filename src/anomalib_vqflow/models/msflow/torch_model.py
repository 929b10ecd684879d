"""PyTorch model of MSFlow: frozen backbone, parallel flows per scale, fusion flow.

Pipeline: a frozen backbone gives three stages (strides 4, 8, 16 by default, whatever
the timm backbone), each average-pooled by 2 (``AvgPool2d(3, 2, 1)``); a conditional
flow per scale (asymmetric depth, ``[2, 5, 8]`` blocks by default) maps each stage to a
latent, conditioned per pixel on a 2-D sinusoidal positional encoding; the fusion flow
then couples the three latents so that every scale sees the others. While training the
model returns the latents and the log-Jacobian; in eval mode an ``InferenceBatch`` with
the image score and the anomaly map.

Example:
    >>> import torch
    >>> model = MsFlowModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1),
    ...                     condition_channels=8)
    >>> output = model.eval()(torch.rand(1, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([1]), torch.Size([1, 1, 64, 64]))
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_vqflow.components.backbone import FeatureExtractor
from anomalib_vqflow.components.flows import AFFINE_CLAMPING, FusionCoupling, ParallelFlows
from anomalib_vqflow.components.positional import positional_encoding_2d

from .anomaly_map import AnomalyMapGenerator, AnomalyMapMode

# Backbone strides the paper taps (layer1-3 of wide_resnet50_2), used when ``layers`` is not given.
PAPER_STRIDES = (4, 8, 16)


class MsFlowModel(nn.Module):
    """MSFlow: multi-scale normalizing flows with a fusion flow.

    Args:
        backbone: timm model name.
        layers: timm feature indices to tap; ``None`` picks the stages at strides 4, 8, 16.
        pre_trained: Load ImageNet weights (offline for tf_efficientnet_lite0/1/2).
        backbone_weights: Local weight file for the backbone, instead of downloading.
        num_blocks: Coupling blocks of each scale's parallel flow.
        condition_channels: Channels of the positional-encoding condition (multiple of 4).
        clamp: Affine clamping of all couplings.
        top_k: Share of pixels averaged into the image score.
        anomaly_map_mode: ``"add"`` (localization map of the paper) or ``"mul"``.

    Example:
        >>> model = MsFlowModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1))
        >>> latents, log_jacobian = model.train()(torch.rand(2, 3, 64, 64))  # training: latents per scale
        >>> [tuple(latent.shape) for latent in latents], log_jacobian.shape
        ([(2, 24, 8, 8), (2, 40, 4, 4), (2, 112, 2, 2)], torch.Size([2]))
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
        anomaly_map_mode: AnomalyMapMode | str = AnomalyMapMode.ADD,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor.of_model(
            backbone, layers, PAPER_STRIDES, pre_trained, backbone_weights
        )
        channels = self.feature_extractor.out_channels
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.condition_channels = condition_channels
        self.parallel_flows = ParallelFlows(channels, condition_channels, num_blocks, clamp)
        self.fusion_flow = FusionCoupling(channels, clamp=clamp)
        self.anomaly_map_generator = AnomalyMapGenerator(top_k=top_k, mode=anomaly_map_mode)

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the pooled backbone stages: everything before the first trainable layer (what a cache keeps)."""
        return [self.pool(feature) for feature in self.feature_extractor(images)]

    def encode(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Map images (or their :meth:`frozen_features`) to the fused latents and the total log-Jacobian ``(N,)``."""
        if features is None:
            features = self.frozen_features(images)
        conditions = [
            positional_encoding_2d(self.condition_channels, *feature.shape[-2:])
            .to(feature)
            .expand(feature.shape[0], -1, -1, -1)
            for feature in features
        ]
        latents, parallel_log_jacobian = self.parallel_flows(features, conditions)
        latents, fusion_log_jacobian = self.fusion_flow(latents)
        return latents, parallel_log_jacobian + fusion_log_jacobian

    def forward(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor] | InferenceBatch:
        """Return ``(latents, log_jacobian)`` in training mode, an ``InferenceBatch`` in eval mode.

        ``features``: the images' :meth:`frozen_features`, when already known (a feature cache).
        """
        latents, log_jacobian = self.encode(images, features)
        if self.training:
            return latents, log_jacobian
        pred_score, anomaly_map = self.anomaly_map_generator(latents, images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
