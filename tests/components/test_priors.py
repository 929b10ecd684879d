"""The priors: VQ-Flow's prototype Gaussian and HGAD's hierarchical mixture, against brute-force densities."""

import math

import pytest
import torch
from torch.distributions import Normal

from anomalib_vqflow.components.priors import ConceptGaussianPrior, HierarchicalGaussianMixture


def _random_prior(log_det: bool = True) -> ConceptGaussianPrior:
    torch.manual_seed(0)
    prior = ConceptGaussianPrior(prototype_channels=4, channels=[3, 2], log_det=log_det)
    for parameter in prior.parameters():
        torch.nn.init.normal_(parameter)
    return prior


def test_log_likelihood_matches_brute_force_gaussian() -> None:
    # float64: random heads give scales far from 1, and the check is about the formula, not rounding.
    prior = _random_prior().double()
    prototype = torch.randn(2, 4, dtype=torch.float64)
    latents = [torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 2, 2, 3, dtype=torch.float64)]
    standardised, log_det = prior(latents, prototype)
    standard = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    via_prior = sum(standard.log_prob(z).sum(dim=(1, 2, 3)) for z in standardised) + log_det
    brute_force = torch.zeros(2, dtype=torch.float64)
    for n in range(2):
        for level, latent in enumerate(latents):
            mean = prior.mean_heads[level](prototype[n])
            scale = torch.sqrt(prior.scale_heads[level](prototype[n]) ** 2 + 1e-8)
            for c in range(latent.shape[1]):
                brute_force[n] += Normal(mean[c], scale[c]).log_prob(latent[n, c]).sum()
    torch.testing.assert_close(via_prior, brute_force, rtol=1e-12, atol=1e-9)


def test_official_form_standardises_alike_without_log_det() -> None:
    exact, official = _random_prior(log_det=True), _random_prior(log_det=False)
    prototype = torch.randn(2, 4)
    latents = [torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)]
    exact_latents, exact_log_det = exact(latents, prototype)
    official_latents, official_log_det = official(latents, prototype)
    for a, b in zip(exact_latents, official_latents, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.all(official_log_det == 0)
    assert torch.all(exact_log_det != 0)


def test_inverse_and_standard_normal_start() -> None:
    prior = _random_prior()
    prototype = torch.randn(3, 4)
    latents = [torch.randn(3, 3, 2, 2), torch.randn(3, 2, 1, 1)]
    restored = prior.inverse(prior(latents, prototype)[0], prototype)
    for latent, back in zip(latents, restored, strict=True):
        torch.testing.assert_close(back, latent, rtol=1e-5, atol=1e-5)
    fresh = ConceptGaussianPrior(prototype_channels=4, channels=[3, 2])
    standardised, log_det = fresh(latents, prototype)
    torch.testing.assert_close(standardised[0], latents[0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(log_det, torch.zeros(3), rtol=0, atol=1e-6)


def _random_mixture() -> HierarchicalGaussianMixture:
    torch.manual_seed(0)
    mixture = HierarchicalGaussianMixture(num_components=3, channels=4, num_intra_centers=3).double()
    with torch.no_grad():
        for parameter in mixture.parameters():
            parameter.add_(torch.randn_like(parameter))
    return mixture


def test_mixture_log_likelihood_matches_brute_force_sum() -> None:
    """log p(x) = log sum_m w_ym N(z; mu_ym, I) + log|det J|, summed term by term with torch.distributions."""
    mixture = _random_mixture()
    latents = torch.randn(5, 4, dtype=torch.float64)
    log_jacobian = torch.randn(5, dtype=torch.float64)
    components = torch.tensor([0, 2, 1, 2, 0])
    via_mixture = mixture.log_likelihood(latents, log_jacobian, components)
    for row in range(5):
        k = int(components[row])
        weights = torch.softmax(mixture.intra_logits[k], dim=0)
        centres = [mixture.centers[k]] + [mixture.centers[k] + mixture.center_offsets[k, j] for j in range(2)]
        density = sum(
            weight * Normal(centre, torch.ones(4, dtype=torch.float64)).log_prob(latents[row]).sum().exp()
            for weight, centre in zip(weights, centres, strict=True)
        )
        expected = density.log() + log_jacobian[row]
        assert via_mixture[row].item() == pytest.approx(expected.item(), rel=1e-12)


def test_negative_entropy_matches_brute_force_and_its_bounds() -> None:
    mixture = _random_mixture()
    latents = torch.randn(7, 4, dtype=torch.float64)
    negative_entropy = mixture.negative_entropy(latents)
    for row in range(7):
        distances = torch.stack([(latents[row] - centre).pow(2).sum() for centre in mixture.centers])
        posterior = torch.softmax(-0.5 * distances, dim=0)
        assert negative_entropy[row].item() == pytest.approx((posterior * posterior.log()).sum().item(), rel=1e-12)
    assert bool((negative_entropy <= 0).all())
    assert bool((negative_entropy >= -math.log(3) - 1e-12).all())


def test_component_centres_start_equidistant_and_intra_centres_leave_them_alone() -> None:
    mixture = HierarchicalGaussianMixture(num_components=4, channels=10, num_intra_centers=3)
    distances = torch.cdist(mixture.centers, mixture.centers)
    off_diagonal = distances[~torch.eye(4, dtype=torch.bool)]
    # Two identity blocks (8 of 10 dimensions) scaled by 5 / sqrt(20 // 4): every pair sqrt(2 * 2) * 5 / sqrt(5) apart.
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, math.sqrt(4) * 5 / math.sqrt(5)))
    mixture.intra_log_density(torch.randn(6, 10), torch.tensor([0, 1, 2, 3, 0, 1])).sum().backward()
    assert mixture.centers.grad is None, "intra-class centres hang off the main centres without gradient"
    assert mixture.center_offsets.grad is not None
    assert mixture.intra_logits.grad is not None


def test_mixture_needs_fewer_components_than_dimensions() -> None:
    with pytest.raises(ValueError, match="num_components"):
        HierarchicalGaussianMixture(num_components=5, channels=4)
