"""PyTorch model of UniAD: reconstruct frozen multi-stage features with a neighbour-masked transformer.

Pipeline (You et al., NeurIPS 2022, "A Unified Model for Multi-class Anomaly Detection"):

1. a frozen backbone gives four stages (strides 2, 4, 8 and 16 by default); each is
   resampled bilinearly (``align_corners=True``) to the stride-16 grid and the stages are
   concatenated: the **reconstruction target** (272 channels for EfficientNet-B4). Bilinear
   resampling reads a finer stage at one point per grid cell; ``stage_resampling="average"``
   (not in the official code) takes each cell's mean, so that a defect between the points
   still reaches the target;
2. while training, the tokens are **jittered** (:func:`~.layers.feature_jitter`) before a linear
   projection to the transformer width, so that the network must remove perturbations
   of normal features rather than learn an identity map;
3. a post-norm transformer encoder, then a decoder whose every layer has its **own learned
   query** per grid position (:class:`~.layers.LayerwiseQueryDecoderLayer`): attention 1 reads the
   encoder output, attention 2 the previous decoder layer's output;
4. **neighbour-masked attention** (:func:`~.layers.neighbor_mask`) in the encoder and in both decoder
   attentions: no position may look at its own ``7 x 7`` neighbourhood, so it cannot copy
   an anomaly from itself or its neighbours;
5. a linear projection back to the feature channels; the anomaly map is the per-position
   error norm (:mod:`.anomaly_map`).

The learned queries and position embeddings have one entry per grid position, so the model
is built for one input size (Anomalib's pre-processor sets it) and refuses other sizes.

Example:
    >>> import torch
    >>> model = UniAdModel((64, 64), backbone="tf_efficientnet_lite0", pre_trained=False, hidden_channels=32,
    ...                    num_heads=2, num_encoder_layers=1, num_decoder_layers=1, feedforward_channels=64,
    ...                    neighbor_size=1)
    >>> output = model.eval()(torch.rand(1, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([1]), torch.Size([1, 1, 64, 64]))
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_vqflow.components.backbone import FeatureExtractor

from .anomaly_map import UniAdAnomalyMapGenerator
from .layers import (
    LayerwiseQueryDecoderLayer,
    LearnedPositionEmbedding,
    NeighborMaskedEncoderLayer,
    feature_jitter,
    neighbor_mask,
    xavier_uniform_linear,
)

# Backbone strides UniAD taps (EfficientNet-B4 blocks 1, 5, 9 and 21), used when ``layers`` is not given.
PAPER_STRIDES = (2, 4, 8, 16)


class UniAdReconstruction(NamedTuple):
    """Training output: the reconstruction from jittered features and the clean target, both ``(N, C, h, w)``.

    Example:
        >>> UniAdReconstruction._fields
        ('reconstruction', 'target')
    """

    reconstruction: torch.Tensor
    target: torch.Tensor


class UniAdModel(nn.Module):
    """UniAD: multi-stage feature reconstruction with layer-wise queries and neighbour-masked attention.

    Args:
        input_size: ``(height, width)`` of the pre-processed images the model is built for.
        backbone: timm model name (paper: ``efficientnet_b4``; offline: ``tf_efficientnet_lite0``).
        layers: timm feature indices to tap; ``None`` picks the stages at strides 2, 4, 8 and 16.
        pre_trained: Load ImageNet weights (offline for tf_efficientnet_lite0/1/2).
        backbone_weights: Local weight file for the backbone, instead of downloading.
        feature_stride: Stride of the grid every stage is resampled to (UniAD: 16).
        hidden_channels: Transformer width (UniAD: 256).
        num_heads: Attention heads (UniAD: 8).
        num_encoder_layers: Encoder layers (UniAD: 4).
        num_decoder_layers: Decoder layers, each with its own learned query (UniAD: 4).
        feedforward_channels: Hidden width of the feed-forward blocks (UniAD: 1024).
        dropout: Dropout in the transformer (UniAD: 0.1).
        neighbor_size: Side of the blocked neighbourhood in grid positions (UniAD: 7); ``None`` turns
            the mask off.
        jitter_scale: Scale of the training feature jitter (UniAD: 20); 0 turns it off.
        jitter_probability: Chance per batch of jittering (UniAD: 1).
        pool_size: Average pooling in pixels before the image score's maximum (UniAD: 16).
        stage_resampling: How the finer stages come to the grid: ``"bilinear"`` (UniAD: bilinear with
            ``align_corners=True``, which reads each stage at one point per grid cell) or ``"average"``
            (the mean over the cell, so that a defect between the sampled points still counts).

    Raises:
        ValueError: If the neighbourhood covers the whole grid (every position would be blocked
            from every key), or if the position embedding width is odd.

    Example:
        >>> model = UniAdModel(input_size=(64, 64), backbone="tf_efficientnet_lite0", pre_trained=False,
        ...                    hidden_channels=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        ...                    feedforward_channels=32, neighbor_size=3)
        >>> output = model.train()(torch.rand(2, 3, 64, 64))  # training: reconstruction and target features
        >>> output.reconstruction.shape == output.target.shape, tuple(output.target.shape)  # 16 + 24 + 40 + 112
        (True, (2, 192, 4, 4))
    """

    def __init__(
        self,
        input_size: tuple[int, int],
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
    ) -> None:
        super().__init__()
        if stage_resampling not in {"bilinear", "average"}:
            msg = f"stage_resampling must be 'bilinear' or 'average', got stage_resampling={stage_resampling!r}."
            raise ValueError(msg)
        self.stage_resampling = stage_resampling
        self.input_size = (int(input_size[0]), int(input_size[1]))
        # Every timm CNN pads so that a stride-s stage of an H-pixel input has ceil(H / s) rows.
        self.grid = (math.ceil(self.input_size[0] / feature_stride), math.ceil(self.input_size[1] / feature_stride))
        self.jitter_scale = jitter_scale
        self.jitter_probability = jitter_probability

        mask = None
        if neighbor_size is not None:
            mask = neighbor_mask(*self.grid, size=neighbor_size)
            if mask.all(dim=1).any():
                msg = (
                    f"neighbor_size={neighbor_size} blocks some position of the {self.grid[0]}x{self.grid[1]} feature "
                    f"grid of {self.input_size[0]}x{self.input_size[1]} inputs from every other position. Use a "
                    "smaller neighbor_size, larger images, or neighbor_size=None."
                )
                raise ValueError(msg)
        # Derived from the grid, so rebuilt with the model and not stored in checkpoints.
        self.register_buffer("attention_mask", mask, persistent=False)

        self.feature_extractor = FeatureExtractor.of_model(
            backbone, layers, PAPER_STRIDES, pre_trained, backbone_weights
        )
        feature_channels = sum(self.feature_extractor.out_channels)
        num_positions = self.grid[0] * self.grid[1]
        self.input_projection = nn.Linear(feature_channels, hidden_channels)
        self.position_embedding = LearnedPositionEmbedding(self.grid, hidden_channels)
        self.encoder = nn.ModuleList(
            NeighborMaskedEncoderLayer(hidden_channels, num_heads, feedforward_channels, dropout)
            for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            LayerwiseQueryDecoderLayer(num_positions, hidden_channels, num_heads, feedforward_channels, dropout)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_channels)
        self.output_projection = nn.Linear(hidden_channels, feature_channels)
        for part in (self.input_projection, self.encoder, self.decoder, self.output_projection):
            xavier_uniform_linear(part)
        self.anomaly_map_generator = UniAdAnomalyMapGenerator(pool_size=pool_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone stages resampled to the grid and concatenated: the ``(N, C, h, w)`` reconstruction target."""
        if tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"UniAd was built for {self.input_size[0]}x{self.input_size[1]} images (one learned query and "
                f"position per cell of its {self.grid[0]}x{self.grid[1]} grid), got "
                f"{images.shape[-2]}x{images.shape[-1]}. Resize with the model's pre-processor."
            )
            raise ValueError(msg)
        return torch.cat([self._to_grid(stage) for stage in self.feature_extractor(images)], dim=1)

    def _to_grid(self, stage: torch.Tensor) -> torch.Tensor:
        if tuple(stage.shape[-2:]) == self.grid:
            return stage
        if self.stage_resampling == "average":
            return F.adaptive_avg_pool2d(stage, self.grid)
        return F.interpolate(stage, size=self.grid, mode="bilinear", align_corners=True)

    def reconstruct(self, target: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(N, C, h, w)`` features; in training mode from a jittered copy."""
        tokens = target.flatten(start_dim=2).transpose(1, 2)
        if self.training and self.jitter_scale > 0:
            tokens = feature_jitter(tokens, self.jitter_scale, self.jitter_probability)
        tokens = self.input_projection(tokens)
        position = self.position_embedding().unsqueeze(0)
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, position, self.attention_mask)
        decoded = memory
        for layer in self.decoder:
            decoded = layer(decoded, memory, position, self.attention_mask)
        reconstruction = self.output_projection(self.decoder_norm(decoded))
        return reconstruction.transpose(1, 2).reshape(target.shape)

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[features(images)]``: the reconstruction target is all that comes before a trainable layer."""
        return [self.features(images)]

    def forward(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> UniAdReconstruction | InferenceBatch:
        """Return the reconstruction and its target in training mode, an ``InferenceBatch`` in eval mode.

        ``features``: the images' :meth:`frozen_features`, when already known (a feature cache).
        """
        target = self.features(images) if features is None else features[0]
        reconstruction = self.reconstruct(target)
        if self.training:
            return UniAdReconstruction(reconstruction, target)
        pred_score, anomaly_map = self.anomaly_map_generator(reconstruction, target, self.input_size)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
