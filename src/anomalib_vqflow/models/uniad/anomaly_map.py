"""UniAD's scoring: the reconstruction error per position, upsampled; the image score is its smoothed peak.

The anomaly map is the L2 norm over channels of ``reconstruction - target`` on the feature
grid (stride 16), upsampled bilinearly (``align_corners=True``, as the official
``UpsamplingBilinear2d``) to the input size. The image score is the maximum of that map
after a ``pool_size x pool_size`` average pooling with stride 1 (UniAD: 16 px at 224 px), which
is robust to single hot pixels; the mean of the map collapses on small defects (UniAD issue #6).
No Gaussian smoothing, as in the official evaluation. Every image is scored on its own.
Upsampling and box filter are both linear and separable, so both run as matrix products on
the feature grid (:mod:`~anomalib_vqflow.components.resampling`): the map is ``R E C^T`` and its
box-filtered version ``(B R) E (B C)^T`` with ``B`` the row (column) averages; the same values as
``F.interpolate`` and ``avg_pool2d`` up to rounding, without the 256 x 256 passes that made them
the exported CPU model's most expensive part after the transformer.

Example:
    >>> import torch
    >>> generator = UniAdAnomalyMapGenerator(pool_size=4)
    >>> score, anomaly_map = generator(torch.zeros(2, 8, 4, 4), torch.ones(2, 8, 4, 4), (32, 32))
    >>> score, anomaly_map.shape
    (tensor([2.8284, 2.8284]), torch.Size([2, 1, 32, 32]))
"""

import torch
from torch import nn

from anomalib_vqflow.components.resampling import interpolation_weights, resample_sum


def box_weights(size: int, kernel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(size - kernel + 1, size)`` weights of the means of ``kernel`` neighbours, ``avg_pool1d`` with stride 1.

    Example:
        >>> box_weights(4, 2)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    starts = torch.arange(size - kernel + 1)[:, None]
    taps = torch.arange(size)[None, :]
    return ((taps >= starts) & (taps < starts + kernel)).to(dtype) / kernel


class UniAdAnomalyMapGenerator(nn.Module):
    """Anomaly map from the reconstruction error; image score as the peak of its box-filtered version.

    Args:
        pool_size: Side in pixels of the average pooling before the maximum (UniAD: 16 at 224 px);
            images smaller than it are pooled over their whole side.

    Example:
        >>> import torch
        >>> target = torch.zeros(1, 8, 4, 4)
        >>> reconstruction = target.clone()
        >>> reconstruction[0, :, 1, 2] = 1.0  # one position reconstructed wrongly
        >>> score, anomaly_map = UniAdAnomalyMapGenerator(pool_size=4)(reconstruction, target, (16, 16))
        >>> anomaly_map.shape, bool(score > 0)
        (torch.Size([1, 1, 16, 16]), True)
    """

    def __init__(self, pool_size: int = 16) -> None:
        super().__init__()
        if pool_size < 1:
            msg = f"pool_size must be a positive number of pixels, got pool_size={pool_size}."
            raise ValueError(msg)
        self.pool_size = pool_size

    def forward(
        self, reconstruction: torch.Tensor, target: torch.Tensor, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pred_score (N,), anomaly_map (N, 1, H, W))`` for ``(N, C, h, w)`` features at ``image_size``."""
        error = (reconstruction - target).pow(2).sum(dim=1, keepdim=True).sqrt()
        anomaly_map = resample_sum([error], image_size, align_corners=True)
        kernel = min(self.pool_size, *image_size)
        rows, columns = (
            box_weights(size, kernel, error.dtype) @ interpolation_weights(size, cells, True, dtype=error.dtype)
            for size, cells in zip(image_size, error.shape[-2:], strict=True)
        )
        pooled = rows.to(error.device) @ error @ columns.to(error.device).T
        return pooled.flatten(start_dim=1).amax(dim=1), anomaly_map
