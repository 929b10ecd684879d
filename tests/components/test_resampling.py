"""Bilinear resampling as matrix products: the values of ``F.interpolate``, for sums of maps of any sizes."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_vqflow.components.resampling import interpolation_weights, resample_sum


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("size_in", "size_out"), [((32, 32), (256, 256)), ((8, 5), (64, 48)), ((16, 16), (7, 9))])
def test_resampling_is_interpolate(align_corners: bool, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    maps = torch.randn(3, 2, *size_in, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(maps, size=size_out, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(resample_sum([maps], size_out, align_corners), expected, rtol=1e-5, atol=1e-5)


def test_a_sum_of_maps_is_the_sum_of_their_interpolations() -> None:
    generator = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 1, cells, cells, generator=generator) for cells in (32, 16, 8)]
    expected = sum(F.interpolate(m, size=(256, 256), mode="bilinear", align_corners=False) for m in maps)
    torch.testing.assert_close(resample_sum(maps, (256, 256)), expected, rtol=1e-5, atol=1e-5)


def test_a_shift_takes_later_outputs_and_holds_the_last() -> None:
    plain = interpolation_weights(8, 2)
    shifted = interpolation_weights(8, 2, shift=3)
    torch.testing.assert_close(shifted, plain[[3, 4, 5, 6, 7, 7, 7, 7]])


def test_every_output_is_a_weighted_mean_of_two_neighbours() -> None:
    weights = interpolation_weights(50, 7, align_corners=True)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(50))
    assert int((weights > 0).sum(dim=1).max()) <= 2
