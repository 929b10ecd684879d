"""PyTorch model of HGAD: per-pixel flows on an image pyramid, each level with a hierarchical Gaussian mixture prior.

Pipeline:

1. **Pyramid features**: the image is resized to ``1, 1/2, 1/4, ...`` of its size
   (bilinear) and one frozen backbone stage (stride 16 by default, whatever the timm
   backbone) runs on each, giving one feature map per level. Each level's features are
   standardised per channel with the mean and standard deviation of the training pixels
   (:class:`FeatureStandardizer`, fitted before training; not in the official code).
   Backbone stages are not normalised (lite0's stride-8 stage has a standard deviation
   of about 8), and per-pixel flows of MLP couplings take hundreds of steps just to shrink
   them to the unit-variance mixture, so a short training ends far from the prior: on the
   development data the per-dimension log-likelihood of training pixels stayed around -27
   after 8 CPU epochs without it (about -1.5 with it), so far below the score references
   that the anomaly maps saturated and every image's score tied. It is an affine map with a
   constant log-Jacobian, so likelihoods are those of the standardised features.
2. **Flows**: every pixel's feature vector goes through the level's own conditional flow of
   ``AllInOneBlock`` couplings (MLP subnets, soft permutations), conditioned on the
   pixel's sinusoidal positional encoding, giving a latent and its log-Jacobian.
3. **Prior**: every level has a
   :class:`~anomalib_vqflow.components.priors.HierarchicalGaussianMixture` with ``K``
   components (classes or clusters), each a mixture of intra-class centres.
4. **Component of an image** (:class:`ComponentAssigner`): the nearest of ``K`` centroids
   of the image's descriptor, the L2-normalised global average of its level-0 backbone features. The
   centroids are fitted on the training images before training: class means in the paper's
   labelled setting, k-means clusters without labels. The category is never an input.
5. **Scores** (:class:`~.anomaly_map.HgadAnomalyMapGenerator`): the per-dimension
   log-likelihood of every pixel under its image's component and the negative entropy of
   the posterior over components, each turned into an anomaly map, multiplied, smoothed.

Example:
    >>> import torch
    >>> model = HgadModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=1, position_channels=8,
    ...                   num_components=2, num_intra_centers=2, map_size=32, blur_sigma=1.0)
    >>> output = model.eval()(torch.rand(2, 3, 64, 64))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))
"""

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_vqflow.components.backbone import FeatureExtractor
from anomalib_vqflow.components.flows import AFFINE_CLAMPING, MlpSubnet, conditional_flow
from anomalib_vqflow.components.kmeans import kmeans, squared_distances
from anomalib_vqflow.components.positional import positional_encoding_2d
from anomalib_vqflow.components.priors import HierarchicalGaussianMixture

from .anomaly_map import HgadAnomalyMapGenerator

# Stride of the backbone stage HGAD taps (index 3 of tf_efficientnet_b6), used when ``layer`` is not given.
PAPER_STRIDE = 16


class HgadEncoding(NamedTuple):
    """Everything a training step needs from one forward pass.

    Attributes:
        latents: Latents of every level, ``(N * H_l * W_l, D)`` rows (image-major, then row, then column).
        log_jacobians: Log-Jacobian of every row of every level, ``(N * H_l * W_l,)``.
        components: Component of every image, ``(N,)``: from its own descriptor (what
            :meth:`HgadModel.encode` returns), or its category's in labelled training.
        sizes: Feature map size ``(H_l, W_l)`` of every level.

    Example:
        >>> HgadEncoding._fields
        ('latents', 'log_jacobians', 'components', 'sizes')
    """

    latents: list[torch.Tensor]
    log_jacobians: list[torch.Tensor]
    components: torch.Tensor
    sizes: list[tuple[int, int]]


def pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` maps as ``(N * H * W, C)`` rows, image-major."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def per_pixel(values: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """Repeat one value per image ``(N,)`` for each of its ``num_pixels`` rows, ``(N * num_pixels,)``."""
    return values.unsqueeze(1).expand(-1, num_pixels).reshape(-1)


class ComponentAssigner(nn.Module):
    """Nearest-centroid choice of an image's mixture component from its L2-normalised descriptor.

    Args:
        num_components: Centroids ``K``.
        channels: Descriptor dimension.

    Example:
        >>> assigner = ComponentAssigner(num_components=2, channels=3)
        >>> _ = assigner.centroids.copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
        >>> assigner(torch.tensor([[0.1, 0.0, 0.9], [0.8, 0.1, 0.0]])).tolist()
        [0, 1]
    """

    def __init__(self, num_components: int, channels: int) -> None:
        super().__init__()
        self.num_components = num_components
        self.register_buffer("centroids", torch.zeros(num_components, channels))
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid of every descriptor ``(N, C)``, ``(N,)``."""
        return squared_distances(descriptors, self.centroids).argmin(dim=1)

    def fit_clusters(self, descriptors: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Label-free: the k-means centroids of the descriptors."""
        centroids, _ = kmeans(descriptors, self.num_components, generator=generator)
        self.centroids.copy_(centroids)
        self.fitted.fill_(True)

    def fit_class_means(self, descriptors: torch.Tensor, labels: torch.Tensor) -> None:
        """Labelled: the mean descriptor of every class (labels ``0..K-1``, each present)."""
        counts = torch.bincount(labels, minlength=self.num_components)
        if bool((counts == 0).any()):
            msg = f"Every class needs training images for its centroid; images per class: {counts.tolist()}."
            raise ValueError(msg)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, descriptors.to(self.centroids))
        self.centroids.copy_(sums / counts.unsqueeze(1))
        self.fitted.fill_(True)


class FeatureStandardizer(nn.Module):
    """Per-level, per-channel standardisation of feature maps with statistics of the training pixels.

    Args:
        num_levels: Feature levels.
        channels: Channels of every level.

    Example:
        >>> standardizer = FeatureStandardizer(num_levels=1, channels=2)  # mean 0, std 1 until fitted
        >>> features = [torch.randn(1, 2, 3, 3)]
        >>> torch.equal(standardizer(features)[0], features[0])
        True
    """

    def __init__(self, num_levels: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_levels, channels))
        self.register_buffer("std", torch.ones(num_levels, channels))

    @staticmethod
    def moments(features: list[torch.Tensor]) -> torch.Tensor:
        """Pixel count, channel sums and channel sums of squares of every level, ``(L, 3, C)``, float64 on the CPU."""
        rows = [pixel_rows(feature).cpu().double() for feature in features]
        return torch.stack(
            [torch.stack([torch.full_like(r[0], len(r)), r.sum(dim=0), r.pow(2).sum(dim=0)]) for r in rows]
        )

    def fit(self, moments: torch.Tensor) -> None:
        """Set mean and standard deviation from summed :meth:`moments` of the training images."""
        count, total, squares = moments.unbind(dim=1)
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0.0)
        self.mean.copy_(mean)
        self.std.copy_(variance.sqrt().clamp_min(1e-6))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standardise every level's ``(N, C, H, W)`` map."""
        return [
            (feature - mean[:, None, None]) / std[:, None, None]
            for feature, mean, std in zip(features, self.mean, self.std, strict=True)
        ]


class HgadModel(nn.Module):
    """HGAD: per-pixel conditional flows on an image pyramid with hierarchical Gaussian mixture priors.

    Args:
        backbone: timm model name.
        layer: timm feature index of the stage to tap; ``None`` picks the stage at stride 16.
        pre_trained: Load ImageNet weights (offline for tf_efficientnet_lite0/1/2).
        backbone_weights: Local weight file for the backbone, instead of downloading.
        pyramid_levels: Levels of the image pyramid (sizes ``1, 1/2, 1/4, ...`` of the input).
        num_blocks: Coupling blocks of every level's flow.
        position_channels: Channels of the positional-encoding condition (multiple of 4).
        num_components: Mixture components ``K`` (classes or clusters).
        num_intra_centers: Centres of every component, its main centre included.
        clamp: Affine clamping of the couplings.
        map_size: Side of the map the scores are computed and smoothed on (paper: 256).
        blur_sigma: Standard deviation, in pixels of that map, of the Gaussian smoothing (paper: 4).

    Example:
        >>> model = HgadModel(backbone="tf_efficientnet_lite0", layer=2, pre_trained=False, num_blocks=1,
        ...                   position_channels=8, num_components=2, num_intra_centers=2, map_size=64)
        >>> encoding = model.train()(torch.rand(2, 3, 64, 64))  # training: latents of the three pyramid levels
        >>> [tuple(latent.shape) for latent in encoding.latents], encoding.sizes  # one row per pixel
        ([(128, 40), (32, 40), (8, 40)], [(8, 8), (4, 4), (2, 2)])
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b6",
        layer: int | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        pyramid_levels: int = 3,
        num_blocks: int = 12,
        position_channels: int = 256,
        num_components: int = 15,
        num_intra_centers: int = 10,
        clamp: float = AFFINE_CLAMPING,
        map_size: int = 256,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if pyramid_levels < 1:
            msg = f"pyramid_levels must be at least 1, got {pyramid_levels}."
            raise ValueError(msg)
        layers = None if layer is None else [layer]
        self.feature_extractor = FeatureExtractor.of_model(
            backbone, layers, (PAPER_STRIDE,), pre_trained, backbone_weights
        )
        channels = self.feature_extractor.out_channels[0]
        self.channels = channels
        self.pyramid_levels = pyramid_levels
        self.position_channels = position_channels
        self.flows = nn.ModuleList(
            conditional_flow(
                channels,
                position_channels,
                num_blocks,
                clamp,
                subnet_constructor=MlpSubnet,
                permute_soft=True,
                spatial=False,
            )
            for _ in range(pyramid_levels)
        )
        self.priors = nn.ModuleList(
            HierarchicalGaussianMixture(num_components, channels, num_intra_centers) for _ in range(pyramid_levels)
        )
        self.standardizer = FeatureStandardizer(pyramid_levels, channels)
        self.component_assigner = ComponentAssigner(num_components, channels)
        self.anomaly_map_generator = HgadAnomalyMapGenerator(pyramid_levels, map_size, blur_sigma)

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of every pyramid level, finest first, before standardisation (what a cache keeps)."""
        height, width = images.shape[-2:]
        features = []
        for level in range(self.pyramid_levels):
            resized = images
            if level:
                size = (height // 2**level, width // 2**level)
                resized = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
            features.append(self.feature_extractor(resized)[0])
        return features

    @staticmethod
    def descriptors(features: torch.Tensor) -> torch.Tensor:
        """L2-normalised global average of a level's features, ``(N, C)``: what picks an image's component."""
        return F.normalize(features.mean(dim=(2, 3)), dim=1)

    def encode(self, images: torch.Tensor, features: list[torch.Tensor] | None = None) -> HgadEncoding:
        """Latent rows and log-Jacobians of every level, and every image's component."""
        if features is None:
            features = self.frozen_features(images)
        components = self.component_assigner(self.descriptors(features[0]))
        latents, log_jacobians, sizes = [], [], []
        for flow, feature in zip(self.flows, self.standardizer(features), strict=True):
            batch_size, _, height, width = feature.shape
            condition = positional_encoding_2d(self.position_channels, height, width).to(feature)
            condition = pixel_rows(condition.unsqueeze(0).expand(batch_size, -1, -1, -1))
            latent, log_jacobian = flow(pixel_rows(feature), c=[condition])
            latents.append(latent)
            log_jacobians.append(log_jacobian)
            sizes.append((height, width))
        return HgadEncoding(latents, log_jacobians, components, sizes)

    def score_maps(self, encoding: HgadEncoding) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-dimension log-likelihood under each image's component and negative entropy, ``(N, 1, H_l, W_l)`` maps."""
        log_likelihoods, negative_entropies = [], []
        for prior, latent, log_jacobian, (height, width) in zip(
            self.priors, encoding.latents, encoding.log_jacobians, encoding.sizes, strict=True
        ):
            rows = per_pixel(encoding.components, height * width)
            log_likelihood = prior.log_likelihood(latent, log_jacobian, rows) / self.channels
            log_likelihoods.append(log_likelihood.view(-1, 1, height, width))
            negative_entropies.append(prior.negative_entropy(latent).view(-1, 1, height, width))
        return log_likelihoods, negative_entropies

    def forward(
        self, images: torch.Tensor, features: list[torch.Tensor] | None = None
    ) -> HgadEncoding | InferenceBatch:
        """Return an :class:`HgadEncoding` in training mode, an ``InferenceBatch`` in eval mode.

        ``features``: the images' :meth:`frozen_features`, when already known (a feature cache).
        """
        encoding = self.encode(images, features)
        if self.training:
            return encoding
        log_likelihoods, negative_entropies = self.score_maps(encoding)
        pred_score, anomaly_map = self.anomaly_map_generator(log_likelihoods, negative_entropies, images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
