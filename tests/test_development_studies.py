"""Helpers of the development studies: hand-computed statistics and scoring variants."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from development_study import nll_map, position_statistics
from uniad_study import channel_spread, scorings, spearman

from anomalib_vqflow.models.uniad.anomaly_map import UniAdAnomalyMapGenerator


def test_spearman_matches_the_textbook_formula() -> None:
    # Ranks 1 2 3 4 against 1 3 2 4: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12 / 60.
    assert math.isclose(spearman([0.1, 0.2, 0.3, 0.4], [5.0, 7.0, 6.0, 9.0]), 0.8)
    assert math.isclose(spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]), -1.0)


def test_uniad_variants_separate_error_from_feature_size() -> None:
    target = torch.arange(1.0, 9.0).view(1, 2, 2, 2)
    record = ("tile", 0, 2 * target, target, torch.zeros(2, 2, dtype=torch.bool))
    model = SimpleNamespace(model=SimpleNamespace(anomaly_map_generator=UniAdAnomalyMapGenerator(pool_size=1)))
    results = scorings(model, record, spread=torch.full((1, 2, 1, 1), 2.0))
    norm = target.norm(dim=1)[0]
    # A reconstruction twice the target errs by the target itself: the error is the feature energy.
    torch.testing.assert_close(results["error"][1], norm)
    torch.testing.assert_close(results["feature energy"][1], norm)
    torch.testing.assert_close(results["channel-standardised error"][1], norm / 2)
    torch.testing.assert_close(results["relative error"][1], torch.ones(2, 2))
    torch.testing.assert_close(results["direction error"][1], torch.zeros(2, 2), atol=1e-6, rtol=0)
    assert math.isclose(results["error"][0], float(norm.max()), rel_tol=1e-6)


def test_channel_spread_is_each_channels_deviation_over_all_positions_and_images() -> None:
    # Channel 0 holds 0, 2 over both images' positions; channel 1 is constant (floored, not 0).
    first = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    second = torch.tensor([[[[2.0, 0.0]], [[1.0, 1.0]]]])
    records = [("tile", 0, features, features, torch.zeros(1, 2, dtype=torch.bool)) for features in (first, second)]
    spread = channel_spread(records)
    assert spread.shape == (1, 2, 1, 1)  # broadcasts against (1, C, h, w) features
    torch.testing.assert_close(spread.flatten(), torch.tensor([math.sqrt(4 / 3), 1e-6]))


def test_position_statistics_per_pixel_and_per_prototype() -> None:
    # One scale of one channel, 1 x 2 pixels: nll = 0.5 z^2 per pixel.
    def record(z: list[float], prototype: int) -> tuple:
        return ("tile", 0, [torch.tensor(z).view(1, 1, 1, 2)], torch.zeros(1, 2, dtype=torch.bool), prototype)

    records = [record([0.0, 2.0], 0)] * 4 + [record([2.0, 0.0], 0)] * 4 + [record([1.0, 1.0], 1)] * 3
    torch.testing.assert_close(nll_map(records[0][2], (1, 2)), torch.tensor([[0.0, 2.0]]))
    statistics = position_statistics(records)
    mean, _ = statistics[None]
    torch.testing.assert_close(mean, torch.tensor([[(8.0 + 1.5) / 11, (8.0 + 1.5) / 11]]))
    assert set(statistics) == {None, 0}  # prototype 1 has fewer than 8 images: no statistics of its own
    own_mean, own_std = statistics[0]
    torch.testing.assert_close(own_mean, torch.tensor([[1.0, 1.0]]))
    # Values 0 and 2, four of each: unbiased variance 8 / 7.
    torch.testing.assert_close(own_std, torch.full((1, 2), math.sqrt(8 / 7)))


def test_hgad_terms_take_the_models_own_score_and_its_factors() -> None:
    from development_study import hgad_terms

    from anomalib_vqflow.models import Hgad

    torch.manual_seed(0)
    model = Hgad(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        num_components=2,
        num_intra_centers=2,
        num_blocks=1,
        position_channels=8,
        pyramid_levels=2,
        map_size=32,
        blur_sigma=1.0,
        pre_processor=Hgad.configure_pre_processor(image_size=(64, 64)),
    ).eval()
    model.model.anomaly_map_generator.set_references(torch.tensor([-1.0, -1.0]), torch.tensor([0.0, 0.0]))
    mask = torch.zeros(64, 64)
    mask[8:16, 8:16] = 1
    items = [SimpleNamespace(image=torch.rand(3, 64, 64), gt_mask=mask, category="tile", gt_label=1)]
    ((category, label, scored_mask, variants),) = list(hgad_terms(model, items))
    assert (category, label, int(scored_mask.sum())) == ("tile", 1, 64)
    image = model.pre_processor.transform(items[0].image.unsqueeze(0))
    output = model.model(image)
    assert math.isclose(variants["paper: likelihood x entropy"][0], float(output.pred_score[0]), rel_tol=1e-5)
    torch.testing.assert_close(variants["paper: likelihood x entropy"][1], output.anomaly_map[0, 0])
    assert set(variants) == {"paper: likelihood x entropy", "likelihood term only", "entropy term only", "nll top3%"}
    # nll: the full log-likelihood of every level (not per dimension), upsampled, summed, negated.
    encoding = model.model.encode(image)
    levels = []
    for prior, latent, log_jacobian, (height, width) in zip(
        model.model.priors, encoding.latents, encoding.log_jacobians, encoding.sizes, strict=True
    ):
        level = prior.log_likelihood(latent, log_jacobian, encoding.components.expand(height * width))
        level = level.view(1, 1, height, width)
        levels.append(F.interpolate(level, size=(64, 64), mode="bilinear", align_corners=True))
    nll = -sum(levels)[0, 0]
    torch.testing.assert_close(variants["nll top3%"][1], nll, rtol=1e-4, atol=1e-3)
    assert math.isclose(variants["nll top3%"][0], float(nll.flatten().topk(122).values.mean()), rel_tol=1e-4)
