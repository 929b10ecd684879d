"""From flow latents to anomaly maps and image scores, as MSFlow and VQ-Flow score.

Per scale, the log-likelihood of every pixel is ``-0.5 * mean_c(z^2)`` (the log-Jacobian
is left out at test time, as in the official code). Two aggregations follow:

- the **additive** map, for localization: per scale ``exp(logp - max_image(logp))``,
  upsampled and summed over scales, then ``max_image(map) - map``;
- the **multiplicative** map, for detection: the per-scale log-likelihoods upsampled and
  summed (a product of likelihoods), ``P = exp(sum - max_image(sum))``, then ``1 - P``;
  the image score is the mean of its top ``top_k`` share of pixels (MSFlow: 3%), reported
  as ``-log(1 - score)`` (:func:`multiplicative_image_score`): the same ranking without the
  float32 saturation at 1.0.

All normalisation is per image, so the scores never depend on other test images.
:class:`AnomalyMapGenerator` ties the two together and picks which map becomes Anomalib's
``anomaly_map``.

Its third mode, ``"nll"``, normalises nothing per image. The image score is the mean of the
top ``top_k`` share of the negative log-likelihood of every position's whole latent,
``0.5 * sum_c(z^2)`` per scale (the Gaussian log-density up to a constant, not the channel
mean), summed over scales: all the evidence the flow has. The anomaly map standardises each
scale's negative log-likelihood by what the flow predicts for a normal position,
``(sum_c(z^2) - C) / sqrt(2 C)`` (a chi-square variable's z-score), and sums over scales.
Why per-image normalisation goes: it gives every image's least likely pixel the same value,
however likely it is, so a good image's most unusual pixel ranks with a real defect (pixel
AUROC across images), and a defect of a few pixels next to unusual but normal texture loses
image AUROC. Why the channel sum for the score: the mean over the 24 channels of a fine scale
is as loud as the mean over the 112 of a coarse one but far noisier. Why the standardised map:
summed, the coarse scales' many channels blur the map (AUPRO falls), while standardised, each
scale adds noise of the same size and the fine scale still localizes. Measured on development
data in the ``_cpu`` configs' comments.

In ``"nll"`` mode every scale is also upsampled with its cells where they are in the image
(:func:`cell_centred_upsample`): a flow scale is a backbone stage average-pooled by 2, so its
cell ``j`` is centred on the stage's cell ``2j``, a quarter of the scale's stride from the cell's
corner. MSFlow's ``align_corners=True`` (kept by ``"add"`` and ``"mul"``) stretches the coarse
maps to the image corners, and ``align_corners=False`` puts every value half a stride in;
either way a 32-px cell's value lands up to 8 px from where it was seen, which a defect of a few
pixels does not survive (AUPRO, measured in the ``_cpu`` configs' comments).

Example:
    >>> import torch
    >>> latents = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    >>> log_likelihoods = log_likelihood_maps(latents)
    >>> additive_anomaly_map(log_likelihoods, (32, 32)).shape
    torch.Size([2, 1, 32, 32])
    >>> score = multiplicative_image_score(joint_log_likelihood(log_likelihoods, (32, 32)), top_k=0.03)
    >>> score.shape
    torch.Size([2])
"""

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from .gaussian import negative_log_likelihood_maps
from .resampling import resample_sum


def log_likelihood_maps(latents: Sequence[torch.Tensor], channel_mean: bool = True) -> list[torch.Tensor]:
    """Per-pixel log-likelihood ``-0.5 * mean_c(z^2)`` of each ``(N, C, H, W)`` latent, as ``(N, 1, H, W)``.

    ``channel_mean=False``: ``-0.5 * sum_c(z^2)``, the standard normal log-density of the
    pixel's whole latent up to its constant.
    """
    if channel_mean:
        return [-0.5 * latent.pow(2).mean(dim=1, keepdim=True) for latent in latents]
    return [-scale_map for scale_map in negative_log_likelihood_maps(latents)]


def _image_max(maps: torch.Tensor) -> torch.Tensor:
    return maps.amax(dim=(-2, -1), keepdim=True)


def additive_anomaly_map(log_likelihoods: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Sum over scales of per-image normalised likelihoods, turned into an anomaly map ``(N, 1, H, W)``."""
    likelihood = resample_sum([torch.exp(lp - _image_max(lp)) for lp in log_likelihoods], size, align_corners=True)
    return _image_max(likelihood) - likelihood


# Cell j of a stage average-pooled by 2 (kernel 3, stride 2, padding 1) covers the stage's cells
# 2j - 1 .. 2j + 1, so its centre is the stage's cell 2j: a quarter of the pooled stride into the cell.
POOLED_CELL_CENTRE = 0.25


def _cell_shifts(maps: Sequence[torch.Tensor], size: tuple[int, int], cell_centre: float) -> list[tuple[int, int]]:
    return [
        (round(size[0] / m.shape[-2] * (0.5 - cell_centre)), round(size[1] / m.shape[-1] * (0.5 - cell_centre)))
        for m in maps
    ]


def cell_centred_upsample(
    maps: torch.Tensor, size: tuple[int, int], cell_centre: float = POOLED_CELL_CENTRE
) -> torch.Tensor:
    """Bilinear upsampling of ``(N, C, h, w)`` maps to ``size``, cell ``j`` at pixel ``P * (j + cell_centre) - 0.5``.

    ``P`` is the stride, ``size / h`` per axis, and ``cell_centre`` the centre's place in its cell
    as a share of the stride (``0.5``: the middle, as ``align_corners=False`` assumes; the
    default: a cell average-pooled by 2 from a backbone stage). Outside the outermost centres
    the border cells' values hold. Built as ``align_corners=False`` shifted by a whole number
    of pixels, the last ones held (:func:`~.resampling.resample_sum`'s shifts).

    Example:
        >>> cell_centred_upsample(torch.tensor([[[[0.0, 4.0]]]]), (1, 8))  # centres at pixels 0.5 and 4.5
        tensor([[[[0.0000, 0.5000, 1.5000, 2.5000, 3.5000, 4.0000, 4.0000, 4.0000]]]])
    """
    return cell_centred_sum([maps], size, cell_centre)


def cell_centred_sum(
    maps: Sequence[torch.Tensor], size: tuple[int, int], cell_centre: float = POOLED_CELL_CENTRE
) -> torch.Tensor:
    """Sum over ``(N, C, h_l, w_l)`` maps of their :func:`cell_centred_upsample` to ``size``, ``(N, C, *size)``."""
    return resample_sum(maps, size, shifts=_cell_shifts(maps, size, cell_centre))


def joint_log_likelihood(log_likelihoods: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Sum over scales of the upsampled log-likelihoods (the log of their product), ``(N, 1, H, W)``."""
    return resample_sum(log_likelihoods, size, align_corners=True)


def standardised_scale_maps(
    negative_log_likelihoods: Sequence[torch.Tensor], channels: Sequence[int]
) -> list[torch.Tensor]:
    """Per-pixel ``(sum_c(z^2) - C) / sqrt(2 C)`` from each scale's ``0.5 * sum_c(z^2)`` and ``C``.

    0 mean and unit spread where the flow fits (the z-score of a chi-square variable).
    """
    return [
        (2.0 * nll - count) / math.sqrt(2.0 * count)
        for nll, count in zip(negative_log_likelihoods, channels, strict=True)
    ]


def multiplicative_anomaly_map(joint: torch.Tensor) -> torch.Tensor:
    """Normalise the joint likelihood per image, ``P = exp(joint - max)``, and return ``1 - P`` in ``[0, 1]``."""
    return 1.0 - torch.exp(joint - _image_max(joint))


def _top_k_count(num_pixels: int, top_k: float) -> int:
    return max(1, int(num_pixels * top_k))


def top_k_mean(anomaly_map: torch.Tensor, top_k: float) -> torch.Tensor:
    """Mean of the highest ``top_k`` share (0 < top_k <= 1) of each image's pixels, as ``(N,)``."""
    flat = anomaly_map.flatten(start_dim=1)
    return flat.topk(_top_k_count(flat.shape[1], top_k), dim=1).values.mean(dim=1)


def multiplicative_image_score(joint: torch.Tensor, top_k: float) -> torch.Tensor:
    """MSFlow's image score, ``top_k_mean(multiplicative_anomaly_map)``, as ``-log(1 - score)``, computed stably.

    With ``P = exp(joint - max_image(joint))``, the paper's score is ``1 - mean(P over the k
    least likely pixels)``. In float32, ``1 - exp(x)`` is exactly 1 for ``x < -17``, so clearly
    anomalous images (and every image of a barely trained model) tie at 1.0 and ranking
    metrics lose them. ``-log(mean P) = log k - logsumexp(lowest k of joint - max)`` is a
    strictly increasing function of the paper's score (same ranking, same AUROC, AP and
    F1-max) that keeps its resolution.
    """
    relative = (joint - _image_max(joint)).flatten(start_dim=1)
    k = _top_k_count(relative.shape[1], top_k)
    lowest = -(-relative).topk(k, dim=1).values
    return math.log(k) - torch.logsumexp(lowest, dim=1)


class AnomalyMapMode(str, Enum):
    """Which aggregation of the scales becomes ``anomaly_map``: MSFlow localizes with ``add``; ``nll`` is unnormalised.

    Example:
        >>> AnomalyMapMode("mul") is AnomalyMapMode.MUL
        True
    """

    ADD = "add"
    MUL = "mul"
    NLL = "nll"


class AnomalyMapGenerator(nn.Module):
    """Turn latents into the image score (top-k mean of the multiplicative map, log form) and the anomaly map.

    Args:
        top_k: Share of pixels averaged for the image score (MSFlow: 0.03).
        mode: Aggregation used for ``anomaly_map``: ``"add"`` (MSFlow's localization map) or ``"mul"``; or
            ``"nll"``: the top-k mean of the negative log-likelihood (channels summed) as the image score
            and the per-scale standardised negative log-likelihood as the map, no per-image normalisation,
            every scale upsampled with its cells where they are (:func:`cell_centred_upsample`).

    Example:
        >>> import torch
        >>> generator = AnomalyMapGenerator(top_k=0.1, mode="mul")
        >>> score, anomaly_map = generator([torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)], (32, 32))
        >>> score.shape, anomaly_map.shape
        (torch.Size([2]), torch.Size([2, 1, 32, 32]))
    """

    def __init__(self, top_k: float = 0.03, mode: AnomalyMapMode | str = AnomalyMapMode.ADD) -> None:
        super().__init__()
        if not 0.0 < top_k <= 1.0:
            msg = f"top_k is a share of pixels in (0, 1], got top_k={top_k}."
            raise ValueError(msg)
        self.top_k = top_k
        self.mode = AnomalyMapMode(mode)

    def forward(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pred_score (N,), anomaly_map (N, 1, H, W))`` at image size ``size``."""
        if self.mode == AnomalyMapMode.NLL:
            scale_maps = negative_log_likelihood_maps(latents)
            standardised = standardised_scale_maps(scale_maps, [latent.shape[1] for latent in latents])
            # Score and map upsampled together: one resampling of both channels instead of two.
            pairs = [torch.cat(pair, dim=1) for pair in zip(scale_maps, standardised, strict=True)]
            both = cell_centred_sum(pairs, size)
            return top_k_mean(both[:, :1], self.top_k), both[:, 1:]
        log_likelihoods = log_likelihood_maps(latents)
        joint = joint_log_likelihood(log_likelihoods, size)
        pred_score = multiplicative_image_score(joint, self.top_k)
        if self.mode == AnomalyMapMode.MUL:
            return pred_score, multiplicative_anomaly_map(joint)
        return pred_score, additive_anomaly_map(log_likelihoods, size)
