"""What two or more models share, each piece once.

- :mod:`.backbone`: frozen multi-stage timm feature extractor with offline weights;
- :mod:`.positional`: 2-D sinusoidal positional encoding;
- :mod:`.flows`: coupling subnets, per-scale parallel flows, the fusion coupling;
- :mod:`.gaussian`: the standard normal's negative log-density of latents (losses and scores);
- :mod:`.quantizers`: EMA vector quantizers (VQ-Flow's codebooks);
- :mod:`.kmeans`: k-means and squared distances (codebooks, mixture priors, HGAD's components);
- :mod:`.priors`: concept-conditioned Gaussians (VQ-Flow) and hierarchical Gaussian mixtures (HGAD);
- :mod:`.resampling`: bilinear resampling (and sums of resampled maps) as matrix products;
- :mod:`.scoring`: per-scale likelihoods to anomaly maps and image scores.
"""

from .backbone import FeatureExtractor, layers_for_strides
from .flows import ConvLayerNormSubnet, FusionCoupling, MlpSubnet, ParallelFlows, conditional_flow
from .gaussian import negative_log_likelihood, negative_log_likelihood_maps
from .kmeans import kmeans, squared_distances
from .positional import positional_encoding_2d
from .priors import ConceptGaussianPrior, HierarchicalGaussianMixture
from .quantizers import QuantizerOutput, VectorQuantizer, codebook_statistics, residual_quantize
from .resampling import interpolation_weights, resample_sum
from .scoring import (
    AnomalyMapGenerator,
    AnomalyMapMode,
    additive_anomaly_map,
    cell_centred_sum,
    cell_centred_upsample,
    joint_log_likelihood,
    log_likelihood_maps,
    multiplicative_anomaly_map,
    multiplicative_image_score,
    top_k_mean,
)
from .weights import OFFLINE_BACKBONES

__all__ = [
    "OFFLINE_BACKBONES",
    "AnomalyMapGenerator",
    "AnomalyMapMode",
    "ConceptGaussianPrior",
    "ConvLayerNormSubnet",
    "FeatureExtractor",
    "FusionCoupling",
    "HierarchicalGaussianMixture",
    "MlpSubnet",
    "ParallelFlows",
    "QuantizerOutput",
    "VectorQuantizer",
    "additive_anomaly_map",
    "cell_centred_sum",
    "cell_centred_upsample",
    "codebook_statistics",
    "conditional_flow",
    "interpolation_weights",
    "joint_log_likelihood",
    "kmeans",
    "layers_for_strides",
    "log_likelihood_maps",
    "multiplicative_anomaly_map",
    "multiplicative_image_score",
    "negative_log_likelihood",
    "negative_log_likelihood_maps",
    "positional_encoding_2d",
    "resample_sum",
    "residual_quantize",
    "squared_distances",
    "top_k_mean",
]
