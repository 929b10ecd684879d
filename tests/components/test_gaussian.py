"""The shared Gaussian negative log-likelihood against torch.distributions."""

import math

import torch

from anomalib_vqflow.components.gaussian import negative_log_likelihood, negative_log_likelihood_maps


def test_negative_log_likelihood_is_the_standard_normal_density_less_its_constant() -> None:
    generator = torch.Generator().manual_seed(3)
    latents = [torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 6, 2, 1, generator=generator)]
    log_jacobian = torch.tensor([0.5, -2.0])
    normal = torch.distributions.Normal(0.0, 1.0)
    dimensions = sum(latent[0].numel() for latent in latents)
    log_density = sum(normal.log_prob(latent).sum(dim=(1, 2, 3)) for latent in latents)
    expected = -log_density - 0.5 * dimensions * math.log(2 * math.pi) - log_jacobian
    torch.testing.assert_close(negative_log_likelihood(latents, log_jacobian), expected)
    fine_map = -normal.log_prob(latents[0]).sum(dim=1, keepdim=True) - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(negative_log_likelihood_maps(latents)[0], fine_map)
