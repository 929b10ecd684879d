"""HGAD's anomaly map: low likelihood under the image's component times uncertainty between components.

Per level ``l`` two per-pixel normality maps come from the flows (:mod:`.torch_model`):

- the per-dimension log-likelihood ``log p(x) / D`` under the intra-class mixture of the
  image's component (flow log-Jacobian included);
- the negative entropy ``sum_k p_k log p_k`` of the posterior over components.

Each is turned into an anomaly map as HGAD does: per level ``exp(map_l - reference_l)``,
upsampled to ``map_size`` and summed over levels, then subtracted from its largest value;
the two anomaly maps are multiplied, smoothed with a Gaussian (sigma 4 px at 256 px), and
the image score is the map's maximum. The map is returned at the input size. The levels are
upsampled and summed as matrix products (:func:`~anomalib_vqflow.components.resampling.resample_sum`:
the same values as one ``F.interpolate`` per level, at a fraction of its cost in an exported graph).

The Gaussian is applied as two 1-D passes (:class:`SeparableGaussianBlur`): the same
kernel and reflect padding as Anomalib's ``GaussianBlur2d``, equal up to rounding, but
``2k`` instead of ``k^2`` operations per pixel (at 256 px and sigma 4 the 33 x 33 kernel
was the exported CPU model's most expensive layer).

Difference from the official code: it normalises by the largest log-likelihood and the
largest negative entropy *over all test images of the category under test*, and subtracts
the largest summed map over them, so that an image's score depends on the other test
images (and on knowing their category). Here the references are the largest values over
the training pixels of the last training epoch (buffers, fitted while training, part of
the exported model), the largest summed value is taken as the number of levels (every
level at its reference), and the anomaly maps are clipped at zero, so every image is
scored on its own.

Example:
    >>> import torch
    >>> generator = HgadAnomalyMapGenerator(num_levels=2, map_size=32, blur_sigma=1.0)
    >>> maps = [-torch.rand(2, 1, 8, 8), -torch.rand(2, 1, 4, 4)]
    >>> score, anomaly_map = generator(maps, maps, (64, 64))
    >>> score.shape, anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import get_gaussian_kernel1d
from torch import nn

from anomalib_vqflow.components.resampling import resample_sum

# exp(20) already turns a level's normality far past any reference; larger exponents would overflow float32.
_MAX_EXPONENT = 20.0


def anomaly_from_normality(maps: Sequence[torch.Tensor], references: torch.Tensor, size: int) -> torch.Tensor:
    """``max(0, L - sum_l up(exp(map_l - reference_l)))`` at ``size x size`` for ``L`` per-level normality maps."""
    exponentials = [
        torch.exp((normality - reference).clamp(max=_MAX_EXPONENT))
        for normality, reference in zip(maps, references, strict=True)
    ]
    return (len(maps) - resample_sum(exponentials, (size, size), align_corners=True)).clamp(min=0.0)


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of ``(N, 1, H, W)`` maps as a horizontal then a vertical 1-D convolution.

    The kernel (side ``2 * int(4 sigma + 0.5) + 1``, normalised) and the reflect padding are
    those of Anomalib's ``GaussianBlur2d``, whose 2-D kernel is the outer product of this one.

    Args:
        sigma: Standard deviation in pixels.

    Example:
        >>> impulse = torch.zeros(1, 1, 17, 17)
        >>> impulse[0, 0, 8, 8] = 1.0
        >>> smoothed = SeparableGaussianBlur(sigma=1.0)(impulse)  # a 9 x 9 kernel, normalised
        >>> round(float(smoothed.sum()), 6), int(smoothed.argmax())
        (1.0, 144)
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        kernel = get_gaussian_kernel1d(compute_kernel_size(sigma), sigma).view(1, 1, 1, -1)
        # Derived from sigma, so not part of the checkpoint.
        self.register_buffer("kernel", kernel, persistent=False)
        self.padding = kernel.shape[-1] // 2

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth every map; the output has the input's size."""
        rows = F.conv2d(F.pad(maps, (self.padding, self.padding, 0, 0), mode="reflect"), self.kernel)
        return F.conv2d(F.pad(rows, (0, 0, self.padding, self.padding), mode="reflect"), self.kernel.transpose(2, 3))


class HgadAnomalyMapGenerator(nn.Module):
    """Image score and anomaly map from the per-level log-likelihood and negative-entropy maps.

    Args:
        num_levels: Pyramid levels.
        map_size: Side of the square map the scores are computed and smoothed on (paper: 256).
        blur_sigma: Standard deviation in pixels of ``map_size`` of the Gaussian smoothing (paper: 4; 0 for none).

    Example:
        >>> generator = HgadAnomalyMapGenerator(num_levels=1, map_size=16, blur_sigma=0.0)
        >>> at_reference = [torch.zeros(1, 1, 4, 4)]  # every pixel as likely as the training references
        >>> score, anomaly_map = generator(at_reference, at_reference, (32, 32))
        >>> score.tolist(), anomaly_map.shape
        ([0.0], torch.Size([1, 1, 32, 32]))
    """

    def __init__(self, num_levels: int, map_size: int = 256, blur_sigma: float = 4.0) -> None:
        super().__init__()
        if blur_sigma < 0 or map_size < compute_kernel_size(blur_sigma):
            msg = (
                f"Need blur_sigma >= 0 and a map_size larger than the blur kernel (8 sigma), "
                f"got map_size={map_size}, blur_sigma={blur_sigma}."
            )
            raise ValueError(msg)
        self.map_size = map_size
        self.blur = SeparableGaussianBlur(blur_sigma) if blur_sigma > 0 else nn.Identity()
        self.register_buffer("reference_log_likelihood", torch.zeros(num_levels))
        self.register_buffer("reference_negative_entropy", torch.zeros(num_levels))

    def set_references(self, log_likelihood: torch.Tensor, negative_entropy: torch.Tensor) -> None:
        """Set the per-level references ``(L,)`` the normality maps are measured against."""
        self.reference_log_likelihood.copy_(log_likelihood)
        self.reference_negative_entropy.copy_(negative_entropy)

    def forward(
        self,
        log_likelihoods: Sequence[torch.Tensor],
        negative_entropies: Sequence[torch.Tensor],
        size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pred_score (N,), anomaly_map (N, 1, *size))``."""
        likelihood_map = anomaly_from_normality(log_likelihoods, self.reference_log_likelihood, self.map_size)
        entropy_map = anomaly_from_normality(negative_entropies, self.reference_negative_entropy, self.map_size)
        anomaly_map = self.blur(likelihood_map * entropy_map)
        pred_score = anomaly_map.amax(dim=(1, 2, 3))
        if tuple(size) == anomaly_map.shape[-2:]:
            # The same values: resampling to its own size is the identity, which an export would still compute.
            return pred_score, anomaly_map
        return pred_score, F.interpolate(anomaly_map, size=tuple(size), mode="bilinear", align_corners=False)
