"""Scoring functions against hand computations."""

import math

import pytest
import torch

from anomalib_vqflow.components.positional import positional_encoding_2d
from anomalib_vqflow.components.scoring import (
    AnomalyMapGenerator,
    additive_anomaly_map,
    cell_centred_upsample,
    joint_log_likelihood,
    log_likelihood_maps,
    multiplicative_anomaly_map,
    multiplicative_image_score,
    top_k_mean,
)


def test_log_likelihood_is_minus_half_mean_square() -> None:
    latent = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    (log_likelihood,) = log_likelihood_maps([latent])
    torch.testing.assert_close(log_likelihood, torch.tensor([[[[-2.5, -1.0]]]]))


def test_maps_by_hand_on_one_scale() -> None:
    log_likelihood = torch.tensor([[[[0.0, -1.0], [-2.0, 0.0]]]])
    additive = additive_anomaly_map([log_likelihood], (2, 2))
    expected_likelihood = torch.exp(log_likelihood)  # max is 0 already
    torch.testing.assert_close(additive, 1.0 - expected_likelihood)
    multiplicative = multiplicative_anomaly_map(joint_log_likelihood([log_likelihood, log_likelihood], (2, 2)))
    torch.testing.assert_close(multiplicative, 1.0 - torch.exp(2 * log_likelihood))


def test_maps_are_normalised_per_image() -> None:
    log_likelihood = torch.tensor([[[[0.0, -1.0]]], [[[-10.0, -11.0]]]])
    additive = additive_anomaly_map([log_likelihood], (1, 2))
    torch.testing.assert_close(additive[0], additive[1])


def test_top_k_mean() -> None:
    anomaly_map = torch.arange(100.0).reshape(1, 1, 10, 10)
    assert top_k_mean(anomaly_map, 0.03).item() == 98.0  # mean of 97, 98, 99
    assert top_k_mean(anomaly_map, 0.001).item() == 99.0  # at least one pixel


def test_positional_encoding_values() -> None:
    encoding = positional_encoding_2d(8, height=3, width=5)
    # Column x, frequency 1: sin(x) on channel 0, cos(x) on channel 1; rows likewise from channel 4.
    assert encoding[0, 2, 3].item() == pytest.approx(math.sin(3.0), abs=1e-7)
    assert encoding[1, 0, 4].item() == pytest.approx(math.cos(4.0), abs=1e-7)
    assert encoding[4, 2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-7)
    assert encoding[6, 2, 1].item() == pytest.approx(math.sin(2.0 * 10000 ** (-2 / 4)), abs=1e-6)
    assert torch.equal(encoding[:4, 0], encoding[:4, 2]), "column channels do not depend on the row"


def test_image_score_ranks_as_the_paper_score_without_saturating() -> None:
    generator = torch.Generator().manual_seed(0)
    mild = [-0.5 * torch.rand(4, 1, 4, 4, generator=generator), -0.5 * torch.rand(4, 1, 2, 2, generator=generator)]
    joint = joint_log_likelihood(mild, (8, 8))
    paper = top_k_mean(multiplicative_anomaly_map(joint), 0.1)
    stable = multiplicative_image_score(joint, 0.1)
    torch.testing.assert_close(stable, -torch.log(1 - paper), rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.argsort(stable), torch.argsort(paper))
    # Far from the image's best pixel the paper's float32 score is exactly 1 for both images;
    # the stable form still tells them apart.
    strong = [torch.zeros(2, 1, 4, 4)]
    strong[0][0, 0, 0, 0] = -40.0
    strong[0][1, 0, 0, 0] = -60.0
    joint = joint_log_likelihood(strong, (4, 4))
    assert torch.equal(top_k_mean(multiplicative_anomaly_map(joint), 1 / 16), torch.ones(2))
    stable = multiplicative_image_score(joint, 1 / 16)
    torch.testing.assert_close(stable, torch.tensor([40.0, 60.0]))


def test_nll_mode_keeps_likelihoods_comparable_across_images() -> None:
    # Two images, one scale of 1 x 2 pixels, one channel: z^2 is 0, 2 (image 0) and 20, 22 (image 1).
    latents = [torch.tensor([[[[0.0, math.sqrt(2.0)]]], [[[math.sqrt(20.0), math.sqrt(22.0)]]]])]
    score, anomaly_map = AnomalyMapGenerator(top_k=0.5, mode="nll")(latents, (1, 2))
    torch.testing.assert_close(score, torch.tensor([1.0, 11.0]))  # top half: the worst pixel's 0.5 z^2
    # The map: (z^2 - C) / sqrt(2 C) with C = 1.
    expected = (torch.tensor([[[[0.0, 2.0]]], [[[20.0, 22.0]]]]) - 1.0) / math.sqrt(2.0)
    torch.testing.assert_close(anomaly_map, expected)
    # Per image, the paper's maps give both images the same map.
    _, additive = AnomalyMapGenerator(top_k=0.5, mode="add")(latents, (1, 2))
    torch.testing.assert_close(additive[0], additive[1])


def centred_by_grid_sample(scale_map: torch.Tensor, size: int, cell_centre: float) -> torch.Tensor:
    """Bilinear interpolation read at each pixel's place in cell units, ``(x + 0.5) / P - cell_centre``."""
    cells = scale_map.shape[-1]
    place = (torch.arange(size) + 0.5) / (size / cells) - cell_centre
    coordinate = place / (cells - 1) * 2 - 1  # grid_sample's [-1, 1] with align_corners=True: cell centres
    grid_y, grid_x = torch.meshgrid(coordinate, coordinate, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).expand(scale_map.shape[0], -1, -1, -1)
    return torch.nn.functional.grid_sample(scale_map, grid, mode="bilinear", padding_mode="border", align_corners=True)


@pytest.mark.parametrize(("cells", "cell_centre"), [(4, 0.25), (2, 0.25), (8, 0.5), (4, 0.0)])
def test_cell_centred_upsample_puts_each_cell_at_its_centre(cells: int, cell_centre: float) -> None:
    scale_map = torch.randn(2, 1, cells, cells, generator=torch.Generator().manual_seed(cells))
    upsampled = cell_centred_upsample(scale_map, (32, 32), cell_centre)
    torch.testing.assert_close(upsampled, centred_by_grid_sample(scale_map, 32, cell_centre))


def test_cell_centred_upsample_by_hand() -> None:
    # Stride 4 (2 cells to 8 pixels); a pooled cell's centre 4 * (j + 1/4) - 0.5: pixels 0.5 and 4.5.
    expected = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 4.0, 4.0, 4.0])
    row = cell_centred_upsample(torch.tensor([[[[0.0, 4.0]]]]), (1, 8))
    torch.testing.assert_close(row, expected.view(1, 1, 1, 8))
    column = cell_centred_upsample(torch.tensor([[[[0.0], [4.0]]]]), (8, 1))
    torch.testing.assert_close(column, expected.view(1, 1, 8, 1))


def test_nll_mode_scores_the_gaussian_negative_log_density_and_maps_standardised_scales() -> None:
    generator = torch.Generator().manual_seed(5)
    latents = [torch.randn(2, 24, 4, 4, generator=generator), torch.randn(2, 112, 2, 2, generator=generator)]
    score, anomaly_map = AnomalyMapGenerator(top_k=1.0, mode="nll")(latents, (16, 16))

    def upsampled(scale_map: torch.Tensor) -> torch.Tensor:
        return centred_by_grid_sample(scale_map, 16, cell_centre=0.25)

    normal = torch.distributions.Normal(0.0, 1.0)
    fine = -normal.log_prob(latents[0]).sum(dim=1, keepdim=True) - 12 * math.log(2 * math.pi)
    coarse = -normal.log_prob(latents[1]).sum(dim=1, keepdim=True) - 56 * math.log(2 * math.pi)
    # Channels are summed, not averaged: the coarse scale's 112 channels weigh 112/24 times the fine scale's 24.
    torch.testing.assert_close(score, (upsampled(fine) + upsampled(coarse)).mean(dim=(1, 2, 3)))
    # Where the flow fits, each standardised scale has mean 0 and spread 1 (a chi-square's z-score).
    standardised = [(2 * fine - 24) / math.sqrt(48), (2 * coarse - 112) / math.sqrt(224)]
    torch.testing.assert_close(anomaly_map, upsampled(standardised[0]) + upsampled(standardised[1]))
    many = AnomalyMapGenerator(mode="nll")([torch.randn(64, 24, 16, 16, generator=generator)], (16, 16))[1]
    assert abs(float(many.mean())) < 0.02
    assert abs(float(many.std()) - 1.0) < 0.02
