"""Anomalib's built-in models on the plugin's offline backbones, for the benchmarks' comparisons.

Anomalib's ``TimmFeatureExtractor`` fetches ImageNet weights by timm name (``pretrained=True``)
and cannot read a local file. For ``tf_efficientnet_lite0/1/2`` the plugin's packaged weights are
put where timm looks for them first, the Hugging Face cache
(:func:`anomalib_vqflow.components.backbone.cache_packaged_weights`), so every built-in model,
STFPM's teacher included, gets them through its own unchanged code. Each model taps the stages at
the strides its paper taps on a ResNet (PaDiM and STFPM ``layer1-3``: 4, 8, 16; PatchCore
``layer2-3``: 8, 16; CFLOW ``layer2-4``: 8, 16, 32) and gets the same input size as the plugin's
models (PatchCore without its centre crop). Fastflow builds only ResNet-18, Wide-ResNet-50 and two
vision transformers; it gets ``resnet18`` from the Hub, and is unavailable without network.

    >>> model = build_baseline("padim", image_size=64)
    >>> type(model).__name__, model.model.feature_extractor.layers
    ('Padim', ['blocks.1', 'blocks.2', 'blocks.4'])
"""

from __future__ import annotations

from typing import Any

import timm
from anomalib.models import AnomalibModule, Cflow, Fastflow, Padim, Patchcore, Stfpm

from anomalib_vqflow.components.weights import OFFLINE_BACKBONES, cache_packaged_weights

BASELINES: dict[str, type[AnomalibModule]] = {
    "padim": Padim,
    "patchcore": Patchcore,
    "cflow": Cflow,
    "fastflow": Fastflow,
    "stfpm": Stfpm,
}
BASELINE_STRIDES = {"padim": (4, 8, 16), "patchcore": (8, 16), "cflow": (8, 16, 32), "stfpm": (4, 8, 16)}
FASTFLOW_BACKBONE = "resnet18"


class BaselineUnavailableError(RuntimeError):
    """A built-in model that cannot be built here (its backbone's weights cannot be fetched)."""


def stage_names(backbone: str, strides: tuple[int, ...]) -> list[str]:
    """timm module names of the deepest stage at each stride (the names Anomalib's ``layers`` take)."""
    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.info
    deepest = {stage["reduction"]: stage["module"] for stage in info}
    missing = [stride for stride in strides if stride not in deepest]
    if missing:
        msg = f"Backbone {backbone!r} has no stage at strides {missing}; it has {sorted(deepest)}."
        raise ValueError(msg)
    return [deepest[stride] for stride in strides]


def baseline_backbone(name: str, backbone: str) -> str:
    """The backbone ``name`` is built on when ``backbone`` is asked for (Fastflow's own, if it cannot take it)."""
    return FASTFLOW_BACKBONE if name == "fastflow" else backbone


def build_baseline(
    name: str, backbone: str = "tf_efficientnet_lite0", image_size: int = 256, **model_arguments: Any
) -> AnomalibModule:
    """Anomalib's ``name`` model on ``backbone`` with ImageNet weights, at ``image_size``.

    ``model_arguments`` go to the model's constructor (``coreset_sampling_ratio=0.01``,
    ``post_processor=False``, say).

    Raises:
        ValueError: For another model name.
        BaselineUnavailableError: If the backbone's weights are neither packaged nor downloadable.
    """
    if name not in BASELINES:
        msg = f"Unknown baseline {name!r}; available: {sorted(BASELINES)}."
        raise ValueError(msg)
    backbone = baseline_backbone(name, backbone)
    if backbone in OFFLINE_BACKBONES:
        cache_packaged_weights(backbone)
    arguments: dict[str, Any] = {"backbone": backbone}
    if name in BASELINE_STRIDES:
        arguments["layers"] = stage_names(backbone, BASELINE_STRIDES[name])
    if name == "padim":
        # 100 of the 176 lite0 channels, PaDiM's choice for ResNet-18 (Anomalib has no default for other backbones).
        arguments["n_features"] = 100
    model_class = BASELINES[name]
    arguments["pre_processor"] = model_class.configure_pre_processor(image_size=(image_size, image_size))
    try:
        return model_class(**arguments, **model_arguments)
    except OSError as err:
        # huggingface_hub's offline and HTTP errors are OSErrors.
        msg = f"{model_class.__name__} needs ImageNet weights for {backbone!r} from the Hugging Face Hub: {err}"
        raise BaselineUnavailableError(msg) from err
