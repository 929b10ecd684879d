"""VQ-Flow's scoring: MSFlow's maps, then a concept-aware calibration per prototype.

The image score and the anomaly map come from the fused latents exactly as in MSFlow
(:class:`~anomalib_vqflow.components.scoring.AnomalyMapGenerator`: top-k mean of the
multiplicative map for detection, additive map for localization).

Why calibrate: one unified model scores every category on its own scale. A good "gravel"
image may score higher than a defective "coffee" image, so a single threshold, or metrics
pooled over categories, fail even when each category on its own is well separated. VQ-Flow
assigns every image a prototype without labels, and the prototypes follow the concepts
(categories). :class:`ConceptCalibration` standardises scores and maps per prototype,
``(x - mean_k) / std_k``, with statistics of good images only (the validation split taken
from the training images), so that one threshold fits every concept. A prototype that too
few good images chose falls back to the statistics of all of them. The calibration is part
of the model's forward, so exported models carry it.

Example:
    >>> import torch
    >>> calibration = ConceptCalibration(num_prototypes=2, min_images=1)
    >>> scores, maps = torch.tensor([1.0, 3.0, 10.0, 30.0]), torch.ones(4, 1, 2, 2)
    >>> prototypes = torch.tensor([0, 0, 1, 1])
    >>> calibration.fit(scores, *image_moments(maps), prototypes)
    >>> calibration(torch.tensor([3.0, 30.0]), torch.ones(2, 1, 2, 2), torch.tensor([0, 1]))[0]
    tensor([1., 1.])
"""

import torch
from torch import nn

# Scales below this share of the location's magnitude (plus one) are treated as no spread at all.
_RELATIVE_SCALE_FLOOR = 1e-6


def image_moments(anomaly_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean and mean square of ``(N, 1, H, W)`` maps: all the pixel statistics calibration needs."""
    flat = anomaly_maps.flatten(start_dim=1)
    return flat.mean(dim=1), flat.pow(2).mean(dim=1)


def _location_scale(means: torch.Tensor, squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    location = means.mean()
    variance = (squares.mean() - location.pow(2)).clamp_min(0.0)
    return location, variance.sqrt().clamp_min(_RELATIVE_SCALE_FLOOR * (location.abs() + 1.0))


class ConceptCalibration(nn.Module):
    """Standardise image scores and anomaly maps with the statistics of the image's prototype.

    Until :meth:`fit` is called it is the identity.

    Args:
        num_prototypes: Number of prototypes.
        min_images: Good images a prototype needs for statistics of its own.

    Example:
        >>> import torch
        >>> calibration = ConceptCalibration(num_prototypes=2)  # the identity until fitted
        >>> score, anomaly_map = calibration(torch.tensor([3.0]), torch.ones(1, 1, 2, 2), torch.tensor([0]))
        >>> score.tolist(), anomaly_map.flatten().tolist()
        ([3.0], [1.0, 1.0, 1.0, 1.0])
    """

    def __init__(self, num_prototypes: int, min_images: int = 3) -> None:
        super().__init__()
        self.min_images = min_images
        self.register_buffer("score_location", torch.zeros(num_prototypes))
        self.register_buffer("score_scale", torch.ones(num_prototypes))
        self.register_buffer("map_location", torch.zeros(num_prototypes))
        self.register_buffer("map_scale", torch.ones(num_prototypes))
        self.register_buffer("images_per_prototype", torch.zeros(num_prototypes, dtype=torch.long))

    @property
    def fitted(self) -> bool:
        """Whether statistics were fitted."""
        return bool(self.images_per_prototype.sum() > 0)

    @torch.no_grad()
    def fit(
        self,
        pred_scores: torch.Tensor,
        map_means: torch.Tensor,
        map_squares: torch.Tensor,
        prototypes: torch.Tensor,
    ) -> None:
        """Fit the statistics of every prototype from good images: scores, per-image map moments, prototypes.

        Raises:
            ValueError: With fewer than ``min_images`` images in all.
        """
        if pred_scores.numel() < self.min_images:
            msg = f"Concept calibration needs min_images={self.min_images} good images, got {pred_scores.numel()}."
            raise ValueError(msg)
        scores = pred_scores.double()
        fallback_scores = _location_scale(scores, scores.pow(2))
        fallback_maps = _location_scale(map_means.double(), map_squares.double())
        for prototype in range(len(self.score_location)):
            chosen = prototypes == prototype
            count = int(chosen.sum())
            self.images_per_prototype[prototype] = count
            if count >= self.min_images:
                score_stats = _location_scale(scores[chosen], scores[chosen].pow(2))
                map_stats = _location_scale(map_means[chosen].double(), map_squares[chosen].double())
            else:
                score_stats, map_stats = fallback_scores, fallback_maps
            self.score_location[prototype], self.score_scale[prototype] = score_stats
            self.map_location[prototype], self.map_scale[prototype] = map_stats

    def forward(
        self,
        pred_score: torch.Tensor,
        anomaly_map: torch.Tensor,
        prototypes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the calibrated ``(pred_score (N,), anomaly_map (N, 1, H, W))``."""
        score = (pred_score - self.score_location[prototypes]) / self.score_scale[prototypes]
        location = self.map_location[prototypes].view(-1, 1, 1, 1)
        scale = self.map_scale[prototypes].view(-1, 1, 1, 1)
        return score, (anomaly_map - location) / scale
