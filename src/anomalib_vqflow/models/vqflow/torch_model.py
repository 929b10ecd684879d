"""PyTorch model of VQ-Flow: MSFlow's flows conditioned on hierarchical vector-quantized concepts.

Pipeline (``h_1..h_3`` the flow stages at strides 4/8/16, each average-pooled by 2, and
``h_4`` the stride-32 stage):

1. **Prototype** (conceptual prototype codebook, CPC): ``v = MLP(GAP(h_4))`` (linear, batch
   norm, ReLU, twice) is quantized against ``num_prototypes`` codes; the chosen code
   ``c_k`` is the image's concept, found without labels.
2. **Patterns** (concept-specific pattern codebooks, CSPC): per level a local feature
   ``h'_l = FeatMLP_l(h_l) + Up_l(SemEnc(h_4))`` (``h'_top = FeatMLP_top(h_4)`` at the top) is
   quantized *around* the base ``b = [PE(x, y); c_k]``: ``hat h_l = b + VQ_l(h'_l - b)``, one
   codebook per level (three flow levels and the top).
3. **Flows**: the parallel flow of each level is conditioned per pixel on ``[hat h_l; c_k]``
   (instead of MSFlow's positional encoding); each latent is standardised by the
   prototype's Gaussian (:class:`~anomalib_vqflow.components.priors.ConceptGaussianPrior`);
   the fusion flow, conditioned on ``[hat h_top; c_k]`` at the coarsest scale, maps to N(0, I).
4. **Scores**: MSFlow's maps and image score, then, if ``concept_calibration``, the
   per-prototype calibration (:class:`~.anomaly_map.ConceptCalibration`).

The category of an image is never an input: the prototype is computed from the image.

Example:
    >>> import torch
    >>> model = VqFlowModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1),
    ...                     num_prototypes=4, prototype_channels=8, num_patterns=8, position_channels=8)
    >>> output = model.eval()(torch.rand(2, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_vqflow.components.backbone import FeatureExtractor
from anomalib_vqflow.components.flows import AFFINE_CLAMPING, FusionCoupling, ParallelFlows
from anomalib_vqflow.components.positional import positional_encoding_2d
from anomalib_vqflow.components.priors import ConceptGaussianPrior
from anomalib_vqflow.components.quantizers import VectorQuantizer, residual_quantize
from anomalib_vqflow.components.scoring import AnomalyMapGenerator, AnomalyMapMode

from .anomaly_map import ConceptCalibration

# Strides of the three flow stages and of the conditioning stage (layer1-4 of a ResNet, stages 1-4 of a ConvNeXt).
PAPER_STRIDES = (4, 8, 16, 32)


class VqFlowEncoding(NamedTuple):
    """Everything a training step needs from one forward pass.

    Attributes:
        latents: Fused latents of the three levels.
        log_jacobian: Total log-Jacobian of flows and prior, ``(N,)``.
        commitment: Sum of the commitment losses of all codebooks (scalar).
        prototypes: Index of every image's prototype, ``(N,)``.

    Example:
        >>> VqFlowEncoding._fields
        ('latents', 'log_jacobian', 'commitment', 'prototypes')
    """

    latents: list[torch.Tensor]
    log_jacobian: torch.Tensor
    commitment: torch.Tensor
    prototypes: torch.Tensor


class ConceptEncoder(nn.Sequential):
    """Image-level descriptor for the prototype codebook: global average pool, then a two-layer MLP with batch norm.

    Example:
        >>> ConceptEncoder(in_channels=8, out_channels=4)(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, out_channels),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(inplace=True),
            nn.Linear(out_channels, out_channels),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(inplace=True),
        )


def _pointwise_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class PatternEncoder(nn.Module):
    """Local pattern features of every level: its own features plus the upsampled semantics of the top stage.

    Args:
        channels: Channels of the flow levels.
        top_channels: Channels of the conditioning (top) stage.
        pattern_channels: Channels of the pattern features (= positional code + prototype).

    Example:
        >>> encoder = PatternEncoder(channels=[4, 6], top_channels=8, pattern_channels=5)
        >>> patterns = encoder([torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)], torch.randn(1, 8, 2, 2))
        >>> [tuple(pattern.shape) for pattern in patterns]  # one per level, and one for the top stage
        [(1, 5, 8, 8), (1, 5, 4, 4), (1, 5, 2, 2)]
    """

    def __init__(self, channels: Sequence[int], top_channels: int, pattern_channels: int) -> None:
        super().__init__()
        self.local_encoders = nn.ModuleList(
            nn.Sequential(*_pointwise_block(c, pattern_channels), *_pointwise_block(pattern_channels, pattern_channels))
            for c in [*channels, top_channels]
        )
        self.semantic_encoder = nn.Sequential(*_pointwise_block(top_channels, pattern_channels))
        self.upsample_heads = nn.ModuleList(nn.Conv2d(pattern_channels, pattern_channels, 1) for _ in channels)

    def forward(self, features: Sequence[torch.Tensor], top: torch.Tensor) -> list[torch.Tensor]:
        """Return the pattern features of every flow level, then of the top stage."""
        semantics = self.semantic_encoder(top)
        patterns = []
        for feature, encoder, head in zip(features, self.local_encoders, self.upsample_heads, strict=False):
            upsampled = semantics
            if semantics.shape[-2:] != feature.shape[-2:]:
                upsampled = F.interpolate(semantics, size=feature.shape[-2:], mode="bilinear", align_corners=False)
            patterns.append(encoder(feature) + head(upsampled))
        patterns.append(self.local_encoders[-1](top))
        return patterns


class VqFlowModel(nn.Module):
    """VQ-Flow: multi-scale flows conditioned on a prototype and quantized local patterns.

    Args:
        backbone: timm model name.
        layers: timm feature indices of the three flow stages and the conditioning stage;
            ``None`` picks the stages at strides 4, 8, 16 and 32.
        pre_trained: Load ImageNet weights (offline for tf_efficientnet_lite0/1/2).
        backbone_weights: Local weight file for the backbone, instead of downloading.
        num_blocks: Coupling blocks of each level's parallel flow.
        num_prototypes: Codes of the prototype codebook (paper: 32).
        prototype_channels: Dimension of the prototype codes (paper: 512).
        num_patterns: Codes of each pattern codebook (paper: 512).
        position_channels: Channels of the positional code (multiple of 4; paper: 64). The
            pattern codes have ``position_channels + prototype_channels`` dimensions and the
            flow conditions ``position_channels + 2 * prototype_channels`` channels.
        codebook_decay: Decay of the codebooks' moving averages.
        restart_dead_codes: Move codes that fell out of use onto current inputs while training.
        prior_log_det: Exact likelihood of the prototype prior (``False``: the official code's form).
        concept_calibration: Standardise scores per prototype (statistics of good images) at inference.
        min_calibration_images: Good images a prototype needs for calibration statistics of its own.
        clamp: Affine clamping of the couplings.
        top_k: Share of pixels averaged into the image score.
        anomaly_map_mode: ``"add"`` (localization map of the paper) or ``"mul"``.

    Example:
        >>> model = VqFlowModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1),
        ...                     num_prototypes=4, prototype_channels=8, num_patterns=8, position_channels=8)
        >>> encoding = model.train()(torch.rand(2, 3, 64, 64))  # training: latents, commitment, prototypes
        >>> [latent.shape[1] for latent in encoding.latents], encoding.prototypes.shape  # a prototype per image
        ([24, 40, 112], torch.Size([2]))
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
        prior_log_det: bool = True,
        concept_calibration: bool = False,
        min_calibration_images: int = 3,
        clamp: float = AFFINE_CLAMPING,
        top_k: float = 0.03,
        anomaly_map_mode: AnomalyMapMode | str = AnomalyMapMode.ADD,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor.of_model(
            backbone, layers, PAPER_STRIDES, pre_trained, backbone_weights
        )
        if len(self.feature_extractor.out_channels) != len(num_blocks) + 1:
            msg = (
                f"VQ-Flow needs one backbone stage per flow level plus a conditioning stage: "
                f"{len(num_blocks)} levels (num_blocks={list(num_blocks)}) but "
                f"{len(self.feature_extractor.out_channels)} stages (layers={layers})."
            )
            raise ValueError(msg)
        *channels, top_channels = self.feature_extractor.out_channels
        pattern_channels = position_channels + prototype_channels
        condition_channels = pattern_channels + prototype_channels
        self.position_channels = position_channels
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)

        self.concept_encoder = ConceptEncoder(top_channels, prototype_channels)
        self.prototype_codebook = VectorQuantizer(
            num_prototypes,
            prototype_channels,
            decay=codebook_decay,
            restart_dead_codes=restart_dead_codes,
        )
        self.pattern_encoder = PatternEncoder(channels, top_channels, pattern_channels)
        self.pattern_codebooks = nn.ModuleList(
            VectorQuantizer(num_patterns, pattern_channels, decay=codebook_decay, restart_dead_codes=restart_dead_codes)
            for _ in range(len(channels) + 1)
        )
        self.parallel_flows = ParallelFlows(channels, condition_channels, num_blocks, clamp)
        self.prior = ConceptGaussianPrior(prototype_channels, channels, log_det=prior_log_det)
        self.fusion_flow = FusionCoupling(channels, condition_channels=condition_channels, clamp=clamp)
        self.anomaly_map_generator = AnomalyMapGenerator(top_k=top_k, mode=anomaly_map_mode)
        self.concept_calibration = concept_calibration
        self.calibration = ConceptCalibration(num_prototypes, min_images=min_calibration_images)

    @property
    def codebooks(self) -> dict[str, VectorQuantizer]:
        """Every codebook by name: ``prototypes``, then ``patterns_<level>`` (the top level last)."""
        return {
            "prototypes": self.prototype_codebook,
            **{f"patterns_{level}": codebook for level, codebook in enumerate(self.pattern_codebooks)},
        }

    def _condition(
        self,
        codebook: VectorQuantizer,
        pattern: torch.Tensor,
        prototype: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a level's pattern around ``[PE; prototype]``; return ``[hat h; prototype]`` and the commitment."""
        batch, _, height, width = pattern.shape
        position = positional_encoding_2d(self.position_channels, height, width).to(pattern)
        prototype_map = prototype[..., None, None].expand(-1, -1, height, width)
        base = torch.cat([position.expand(batch, -1, -1, -1), prototype_map], dim=1)
        output = residual_quantize(codebook, pattern, base)
        return torch.cat([output.quantized, prototype_map], dim=1), output.commitment

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the pooled flow stages and the conditioning stage: everything before the first trainable layer."""
        *stages, top = self.feature_extractor(images)
        return [*(self.pool(stage) for stage in stages), top]

    def encode(self, images: torch.Tensor, features: list[torch.Tensor] | None = None) -> VqFlowEncoding:
        """Map images (or their :meth:`frozen_features`) to fused latents, log-Jacobian, commitment and prototypes."""
        *features, top = self.frozen_features(images) if features is None else features
        prototype_output = self.prototype_codebook(self.concept_encoder(top))
        prototype = prototype_output.quantized
        commitment = prototype_output.commitment
        conditions = []
        for codebook, pattern in zip(self.pattern_codebooks, self.pattern_encoder(features, top), strict=True):
            condition, pattern_commitment = self._condition(codebook, pattern, prototype)
            conditions.append(condition)
            commitment = commitment + pattern_commitment
        *level_conditions, top_condition = conditions
        latents, parallel_log_jacobian = self.parallel_flows(features, level_conditions)
        latents, prior_log_jacobian = self.prior(latents, prototype)
        if top_condition.shape[-2:] != latents[-1].shape[-2:]:
            top_condition = F.interpolate(top_condition, size=latents[-1].shape[-2:], mode="bilinear")
        latents, fusion_log_jacobian = self.fusion_flow(latents, top_condition)
        log_jacobian = parallel_log_jacobian + prior_log_jacobian + fusion_log_jacobian
        return VqFlowEncoding(latents, log_jacobian, commitment, prototype_output.indices)

    def uncalibrated_scores(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image scores ``(N,)``, anomaly maps ``(N, 1, H, W)`` before calibration, and the prototypes ``(N,)``."""
        encoding = self.encode(images, features)
        pred_score, anomaly_map = self.anomaly_map_generator(encoding.latents, images.shape[-2:])
        return pred_score, anomaly_map, encoding.prototypes

    def forward(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> VqFlowEncoding | InferenceBatch:
        """Return the :class:`VqFlowEncoding` in training mode, the calibrated ``InferenceBatch`` in eval mode.

        ``features``: the images' :meth:`frozen_features`, when already known (a feature cache).
        """
        if self.training:
            return self.encode(images, features)
        pred_score, anomaly_map, prototypes = self.uncalibrated_scores(images, features)
        if self.concept_calibration:
            pred_score, anomaly_map = self.calibration(pred_score, anomaly_map, prototypes)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
