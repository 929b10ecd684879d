"""Bilinear resampling as two matrix products: the anomaly maps' upsampling, cheap in an exported CPU graph.

Bilinear interpolation (``F.interpolate(mode="bilinear")``, no antialiasing) is linear and
separable: a ``(h, w)`` map ``M`` resampled to ``(H, W)`` is ``R M C^T``, with ``R`` the
``(H, h)`` weights of the rows (two non-zero taps per output row) and ``C`` the ``(W, w)``
weights of the columns. A sum over maps of different sizes, as the models add their scales
and pyramid levels, is then one product per map and a single vertical one for all of them:

    sum_l R_l M_l C_l^T = [R_1 ... R_L] @ stack_rows(M_1 C_1^T, ..., M_L C_L^T)

The weights depend only on the sizes, so an export with a fixed input size holds them as
constants. Why not ``F.interpolate``: OpenVINO runs one ``Interpolate`` per map and scale, and
on a 2-core CPU the six 256 x 256 upsamplings of MsFlow's scoring took 2.2 ms against 0.7 ms
for the products (``TopK`` included in both); the products are the same values up to float32
rounding (PyTorch computes the source places in float32, these weights in float64: differences of
about 1e-5 of the map's range at most). Weights follow PyTorch's source-index arithmetic
(``align_corners`` as ``F.interpolate``), so the results match it for any sizes, upsampling
or downsampling without antialiasing.

Example:
    >>> import torch
    >>> import torch.nn.functional as F  # noqa: N812
    >>> maps = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)]
    >>> expected = sum(F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False) for m in maps)
    >>> torch.allclose(resample_sum(maps, (32, 32)), expected, atol=1e-6)
    True
"""

from collections.abc import Sequence

import torch


def interpolation_weights(
    size_out: int, size_in: int, align_corners: bool = False, shift: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(size_out, size_in)`` weights of linear interpolation along one axis, as ``F.interpolate`` computes it.

    ``shift``: output ``i`` takes the interpolated value at ``min(i + shift, size_out - 1)`` (a
    shift towards the start with the last value held, as :func:`~.scoring.cell_centred_upsample`).

    Example:
        >>> interpolation_weights(4, 2)  # align_corners=False: source places -0.25, 0.25, 0.75, 1.25
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]])
    """
    target = (torch.arange(size_out) + shift).clamp(0, size_out - 1).to(torch.float64)
    if align_corners:
        source = target * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        source = ((target + 0.5) * (size_in / size_out) - 0.5).clamp(min=0.0)
    lower = source.floor().clamp(max=size_in - 1)
    upper_share = source - lower
    upper = (lower + 1).clamp(max=size_in - 1)
    taps = torch.arange(size_in, dtype=torch.float64)
    weights = (taps == lower[:, None]) * (1.0 - upper_share[:, None]) + (taps == upper[:, None]) * upper_share[:, None]
    return weights.to(dtype)


def resample_sum(
    maps: Sequence[torch.Tensor],
    size: tuple[int, int],
    align_corners: bool = False,
    shifts: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``sum_l bilinear(maps_l, size)`` for ``(N, C, h_l, w_l)`` maps, as ``(N, C, *size)``, by matrix products.

    ``shifts``: per map, the ``(rows, columns)`` shift of :func:`interpolation_weights`.
    """
    if not maps:
        msg = "resample_sum needs at least one map."
        raise ValueError(msg)
    shifts = shifts or [(0, 0)] * len(maps)
    dtype = maps[0].dtype
    row_weights, horizontal = [], []
    for scale_map, (shift_y, shift_x) in zip(maps, shifts, strict=True):
        height, width = scale_map.shape[-2:]
        columns = interpolation_weights(size[1], width, align_corners, shift_x, dtype).to(scale_map.device)
        horizontal.append(scale_map @ columns.T)
        row_weights.append(interpolation_weights(size[0], height, align_corners, shift_y, dtype))
    rows = torch.cat(row_weights, dim=1).to(maps[0].device)
    return rows @ torch.cat(horizontal, dim=-2)
