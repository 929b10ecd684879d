"""The prototype prior: exact log-likelihood against a brute-force Gaussian, the official form, inversion."""

import torch
from torch.distributions import Normal

from anomalib_vqflow.components.priors import ConceptGaussianPrior


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
