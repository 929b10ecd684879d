"""HGAD's own pieces: the loss terms by hand, the anomaly map, label-free and labelled components, paper size."""

import math
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models.components.filters import GaussianBlur2d

from anomalib_vqflow.components.priors import HierarchicalGaussianMixture
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.models import Hgad
from anomalib_vqflow.models.hgad.anomaly_map import HgadAnomalyMapGenerator, SeparableGaussianBlur
from anomalib_vqflow.models.hgad.loss import HgadLoss, mutual_information, smoothed_one_hot
from anomalib_vqflow.models.hgad.torch_model import FeatureStandardizer, HgadModel


def _tiny_model(**kwargs: object) -> Hgad:
    arguments = {
        "backbone": "tf_efficientnet_lite0",
        "layer": 2,
        "pre_trained": False,
        "num_components": 2,
        "num_intra_centers": 3,
        "num_blocks": 1,
        "position_channels": 8,
        "map_size": 32,
        "blur_sigma": 1.0,
    }
    return Hgad(**(arguments | kwargs))


def test_mutual_information_on_a_hand_example() -> None:
    """z on centre 0, centre 1 at distance 2, equal weights: MI = log 2 - log(1 + e^-2) for class 0."""
    distances = torch.tensor([[0.0, 4.0]])
    log_weights = torch.log(torch.tensor([0.5, 0.5]))
    log_posterior = -math.log(1 + math.exp(-2))  # log softmax_0([log .5, -2 + log .5])
    exact = mutual_information(distances, log_weights, smoothed_one_hot(torch.tensor([0]), 2, 0.0))
    assert exact.item() == pytest.approx(math.log(2) + log_posterior)
    smoothed = mutual_information(distances, log_weights, smoothed_one_hot(torch.tensor([0]), 2, 0.02))
    by_hand = 0.99 * (math.log(2) + log_posterior) + 0.01 * (math.log(2) - 2 + log_posterior)
    assert smoothed.item() == pytest.approx(by_hand)


def test_mutual_information_leaves_the_weights_alone() -> None:
    logits = torch.zeros(2, requires_grad=True)
    distances = torch.tensor([[1.0, 3.0]], requires_grad=True)
    targets = smoothed_one_hot(torch.tensor([1]), 2, 0.02)
    mutual_information(distances, torch.log_softmax(logits, dim=0), targets).sum().backward()
    assert logits.grad is None
    assert distances.grad is not None
    assert distances.grad[0, 1] < 0, "maximising pulls z towards its own centre"


def test_loss_terms_by_hand() -> None:
    """One latent, two components in two dimensions, no intra-class offsets: every term from its formula."""
    prior = HierarchicalGaussianMixture(num_components=2, channels=2, num_intra_centers=2)
    with torch.no_grad():
        prior.centers.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        prior.center_offsets.zero_()
    latent, log_jacobian = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    terms = HgadLoss(mutual_information_weight=100.0, label_smoothing=0.0)(
        prior, latent, log_jacobian, torch.tensor([0]), intra=True
    )
    # d = (0, 2); equal weights 1/2; both intra centres of component 0 sit on (1, 0).
    mixture = math.log(0.5 * 1 + 0.5 * math.exp(-1))
    assert terms["likelihood"].item() == pytest.approx(-(mixture + 0.5) / 2)
    p0 = 1 / (1 + math.exp(-1))
    assert terms["entropy"].item() == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)))
    assert terms["mutual_information"].item() == pytest.approx(math.log(p0) - math.log(0.5))
    assert terms["intra_likelihood"].item() == pytest.approx(-(0.0 + 0.5) / 2)
    log_likelihood = -math.log(2 * math.pi) + 0.0 + 0.5
    assert terms["likelihood_sigmoid"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-log_likelihood / 2))))
    expected = (
        terms["likelihood"]
        - 100 * terms["mutual_information"]
        + terms["entropy"]
        + terms["intra_likelihood"]
        + terms["likelihood_sigmoid"]
    )
    assert terms["loss"].item() == pytest.approx(expected.item())
    inter_only = HgadLoss()(prior, latent, log_jacobian, torch.tensor([0]), intra=False)
    assert "intra_likelihood" not in inter_only
    assert "likelihood_sigmoid" not in inter_only


def test_anomaly_map_is_zero_at_the_references_and_rises_where_likelihood_drops() -> None:
    generator = HgadAnomalyMapGenerator(num_levels=2, map_size=16, blur_sigma=0.0)
    generator.set_references(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0]))
    log_likelihoods = [torch.full((1, 1, 4, 4), -1.0), torch.full((1, 1, 2, 2), -2.0)]
    uncertain = [torch.full((1, 1, 4, 4), -0.5), torch.full((1, 1, 2, 2), -0.5)]
    score, anomaly_map = generator(log_likelihoods, uncertain, (16, 16))
    assert score.item() == pytest.approx(0.0, abs=1e-6)
    assert anomaly_map.abs().max().item() == pytest.approx(0.0, abs=1e-6)
    log_likelihoods[0][..., 0, 0] = -4.0
    score, anomaly_map = generator(log_likelihoods, uncertain, (16, 16))
    assert score.item() > 0.0
    assert anomaly_map[0, 0, 0, 0] == anomaly_map.max(), "the least likely corner is the most anomalous"
    # Both factors matter: with fully confident posteriors (negative entropy 0) nothing is anomalous.
    confident = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    assert generator(log_likelihoods, confident, (16, 16))[0].item() == pytest.approx(0.0, abs=1e-6)


def test_scores_of_an_image_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    model = HgadModel(
        backbone="tf_efficientnet_lite0", layer=2, pre_trained=False, num_blocks=1, position_channels=8,
        num_components=2, num_intra_centers=2, map_size=32, blur_sigma=1.0,
    ).eval()  # fmt: skip
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        together = model(images)
        alone = model(images[:1])
    torch.testing.assert_close(alone.pred_score, together.pred_score[:1])
    torch.testing.assert_close(alone.anomaly_map, together.anomaly_map[:1])


def _two_groups(size: int = 8) -> tuple[torch.Tensor, list[str]]:
    """Descriptors of two well-separated groups, as unit vectors, named by their category."""
    generator = torch.Generator().manual_seed(0)
    first = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(size, 4, generator=generator)
    second = torch.tensor([0.0, 0.0, 1.0, 0.0]) + 0.05 * torch.randn(size, 4, generator=generator)
    descriptors = torch.nn.functional.normalize(torch.cat([first, second]), dim=1)
    return descriptors, ["wood"] * size + ["bottle"] * size


def _model_with_descriptor_size(labels: str, channels: int = 4, num_components: int = 2) -> Hgad:
    model = _tiny_model(labels=labels, num_components=num_components)
    model.model.component_assigner.centroids = torch.zeros(num_components, channels)
    return model


def test_label_free_components_follow_the_images() -> None:
    """labels='none': k-means finds the two groups without their names, and new images go to their group."""
    descriptors, categories = _two_groups()
    model = _model_with_descriptor_size("none")
    torch.manual_seed(0)
    model.fit_components(descriptors, categories=[])
    assigner = model.model.component_assigner
    assignments = assigner(descriptors)
    assert len(set(assignments[:8].tolist())) == 1
    assert len(set(assignments[8:].tolist())) == 1
    assert assignments[0] != assignments[8]
    assert model.component_health == {"components_used": 2.0}
    assert model.category_index == {}, "no category is read without labels"
    new_images = torch.nn.functional.normalize(torch.tensor([[0.0, 0.1, 1.0, 0.0], [1.0, 0.0, 0.1, 0.0]]), dim=1)
    torch.testing.assert_close(assigner(new_images), torch.stack([assignments[8], assignments[0]]))
    centroids = assigner.centroids.clone()
    torch.manual_seed(0)
    model.fit_components(descriptors, list(reversed(categories)))
    torch.testing.assert_close(assigner.centroids, centroids, rtol=0, atol=0, msg="categories must fit nothing")
    assert model.component_health["component_purity"] == pytest.approx(1.0)


def test_labelled_components_number_sorted_categories_and_pick_the_nearest_class_mean() -> None:
    descriptors, categories = _two_groups()
    model = _model_with_descriptor_size("dataset")
    model.fit_components(descriptors, categories)
    assert model.category_index == {"bottle": 0, "wood": 1}
    torch.testing.assert_close(model.model.component_assigner.centroids[1], descriptors[:8].mean(dim=0))
    assert model.model.component_assigner(descriptors).tolist() == [1] * 8 + [0] * 8
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    restored = _model_with_descriptor_size("dataset")
    restored.on_load_checkpoint(checkpoint)
    assert restored.category_index == model.category_index


def test_labelled_components_need_categories_and_their_number() -> None:
    descriptors, categories = _two_groups()
    with pytest.raises(ValueError, match="carry none"):
        _model_with_descriptor_size("dataset").fit_components(descriptors, categories=[])
    with pytest.raises(ValueError, match="set num_components=2"):
        _model_with_descriptor_size("dataset", num_components=3).fit_components(descriptors, categories)
    with pytest.raises(ValueError, match="labels must be"):
        _tiny_model(labels="oracle")


def test_labelled_training_stops_before_a_step_when_the_components_do_not_match(
    demo_root: Path,
    tmp_path: Path,
) -> None:
    model = _tiny_model(labels="dataset", num_components=3, pre_processor=Hgad.configure_pre_processor((64, 64)))
    datamodule = MultiClassMVTecAD(root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"2 categories \['brick', 'coffee'\]; set num_components=2"):
        engine.fit(model=model, datamodule=datamodule)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_paper_architecture_has_the_counted_size() -> None:
    """tf_efficientnet_b6 stage 3 (200 channels), 3 x 12 blocks with 256-channel conditions, 15 x 10 centres.

    The spec counts about 14.3M flow parameters and about 30k centre parameters per level.
    """
    model = HgadModel(pre_trained=False)
    flows = sum(p.numel() for p in model.flows.parameters() if p.requires_grad)
    priors = sum(p.numel() for p in model.priors.parameters())
    assert model.channels == 200
    assert 14.2e6 < flows < 14.4e6
    assert priors == 3 * (15 * 200 + 15 * 9 * 200 + 15 + 15 * 10)


def test_standardizer_fits_the_moments_of_all_training_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [[3.0 + 5.0 * torch.randn(2, 4, 6, 6, generator=generator)] for _ in range(3)]
    standardizer = FeatureStandardizer(num_levels=1, channels=4)
    standardizer.fit(torch.stack([FeatureStandardizer.moments(batch) for batch in batches]).sum(dim=0))
    pixels = torch.cat([batch[0] for batch in batches]).permute(1, 0, 2, 3).reshape(4, -1)
    torch.testing.assert_close(standardizer.mean[0], pixels.mean(dim=1))
    torch.testing.assert_close(standardizer.std[0], pixels.std(dim=1, unbiased=False))
    (standardised,) = standardizer(batches[0])
    assert standardised.shape == (2, 4, 6, 6)
    torch.testing.assert_close(
        standardised, (batches[0][0] - pixels.mean(dim=1)[:, None, None]) / standardizer.std[0][:, None, None]
    )


def test_labelled_training_resumes_with_its_components_and_categories(demo_root: Path, tmp_path: Path) -> None:
    """A resumed run neither refits the components nor forgets the category numbering of its checkpoint."""
    datamodule = MultiClassMVTecAD(root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0)

    def fit(max_epochs: int, ckpt_path: Path | None = None) -> Hgad:
        model = _tiny_model(labels="dataset", pre_trained=True, pre_processor=Hgad.configure_pre_processor((64, 64)))
        engine = Engine(max_epochs=max_epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
        engine.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        return model

    first = fit(max_epochs=1)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    # Mark the checkpoint's fitted state: a refit from the data would overwrite the marks.
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"]["model.component_assigner.centroids"] += 1.0
    state["state_dict"]["model.standardizer.std"] *= 2.0
    torch.save(state, checkpoint)
    resumed = fit(max_epochs=2, ckpt_path=checkpoint)
    assert resumed.category_index == first.category_index == {"brick": 0, "coffee": 1}
    assert resumed.component_health == first.component_health
    assert first.component_health["component_purity"] == pytest.approx(1.0)
    torch.testing.assert_close(resumed.model.component_assigner.centroids, first.model.component_assigner.centroids + 1)
    torch.testing.assert_close(resumed.model.standardizer.std, 2 * first.model.standardizer.std)
    assert resumed.trainer.current_epoch == 2


def test_blur_must_fit_in_the_map() -> None:
    with pytest.raises(ValueError, match="map_size larger than the blur kernel"):
        HgadAnomalyMapGenerator(num_levels=3, map_size=32, blur_sigma=4.0)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_separable_blur_equals_anomalibs_two_dimensional_blur(sigma: float) -> None:
    maps = torch.rand(2, 1, 40, 36, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    maps[0, 0, 3, 30] = 50.0  # a peak near the border, where the reflect padding matters
    expected = GaussianBlur2d(sigma=sigma, channels=1).double()(maps)
    # The 2-D kernel is the float32 outer product of the 1-D one: equal up to float32 rounding of its entries.
    torch.testing.assert_close(SeparableGaussianBlur(sigma).double()(maps), expected, rtol=1e-6, atol=1e-9)
    assert "blur.kernel" not in HgadAnomalyMapGenerator(num_levels=1, map_size=64, blur_sigma=sigma).state_dict()
