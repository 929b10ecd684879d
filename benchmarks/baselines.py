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

Every other Anomalib image model (Dinomaly, INP-Former, UniNet, EfficientAd, ...) is built by its
:func:`builtin_image_models` name with its own defaults (backbone, weights, input size), so a user
with network can run it next to the plugin's models; without network its weights cannot be fetched,
and it is reported as unavailable with the reason.

    >>> model = build_baseline("padim", image_size=64)
    >>> type(model).__name__, model.model.feature_extractor.layers
    ('Padim', ['blocks.1', 'blocks.2', 'blocks.4'])
    >>> sorted(builtin_image_models())[:3]
    ['anomalydino', 'anomalyvfm', 'cfa']
"""

from __future__ import annotations

import inspect
from typing import Any

import anomalib.models.image
import timm
from anomalib.models import AnomalibModule

from anomalib_vqflow.components.weights import OFFLINE_BACKBONES, cache_packaged_weights

# The models the plugin puts on its offline backbone; every other one keeps its own.
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


def builtin_image_models() -> dict[str, type[AnomalibModule]]:
    """Anomalib's image models by key: the class name in lower case (``padim``, ``efficientad``, ``inpformer``)."""
    return {name.lower(): getattr(anomalib.models.image, name) for name in anomalib.models.image.__all__}


def baseline_backbone(name: str, backbone: str) -> str | None:
    """The backbone ``name`` is built on when ``backbone`` is asked for; ``None`` where the model keeps its own.

    Fastflow gets its own ResNet-18 (it builds no other CNN).
    """
    if name == "fastflow":
        return FASTFLOW_BACKBONE
    return backbone if name in BASELINE_STRIDES else None


def build_baseline(
    name: str, backbone: str = "tf_efficientnet_lite0", image_size: int = 256, **model_arguments: Any
) -> AnomalibModule:
    """Anomalib's ``name`` model (a :func:`builtin_image_models` key) with ImageNet weights.

    PaDiM, PatchCore, CFLOW, STFPM and Fastflow get ``backbone`` (Fastflow its own) and
    ``image_size``; every other model keeps its own backbone and input size. ``model_arguments`` go
    to the model's constructor (``coreset_sampling_ratio=0.01``, ``post_processor=False``, say).

    Raises:
        ValueError: For a name that is not an Anomalib image model.
        BaselineUnavailableError: If the model's weights are neither packaged nor downloadable.
    """
    models = builtin_image_models()
    if name not in models:
        msg = f"Unknown Anomalib image model {name!r}; available: {sorted(models)}."
        raise ValueError(msg)
    model_class = models[name]
    refused = sorted(set(model_arguments) - set(inspect.signature(model_class.__init__).parameters))
    if refused:
        msg = f"{model_class.__name__} takes no {refused}: it cannot be scored from raw outputs like the others here."
        raise BaselineUnavailableError(msg)
    arguments: dict[str, Any] = {}
    backbone = baseline_backbone(name, backbone)
    if backbone is not None:
        if backbone in OFFLINE_BACKBONES:
            cache_packaged_weights(backbone)
        arguments["backbone"] = backbone
        if name in BASELINE_STRIDES:
            arguments["layers"] = stage_names(backbone, BASELINE_STRIDES[name])
        if name == "padim":
            # 100 of the 176 lite0 channels, PaDiM's choice for ResNet-18 (Anomalib has no default for other backbones).
            arguments["n_features"] = 100
        arguments["pre_processor"] = model_class.configure_pre_processor(image_size=(image_size, image_size))
    try:
        return model_class(**arguments, **model_arguments)
    except OSError as err:
        # huggingface_hub's offline and HTTP errors and urllib's are OSErrors.
        weights = backbone or default_backbone(model_class)
        what = f"the pretrained weights of {weights!r}" if weights else "its pretrained weights"
        msg = f"{model_class.__name__} needs {what} from the network (Hugging Face Hub or a URL): {err}"
        raise BaselineUnavailableError(msg) from err


def default_backbone(model_class: type[AnomalibModule]) -> str | None:
    """The backbone a built-in model builds by default, to name in messages (``None`` if it has no such argument).

    >>> from anomalib.models import Dinomaly
    >>> default_backbone(Dinomaly)
    'vit_base_patch14_reg4_dinov2'
    """
    parameters = inspect.signature(model_class.__init__).parameters
    for name in ("backbone", "encoder_name", "teacher_backbone", "rgb_backbone"):
        if name in parameters and isinstance(parameters[name].default, str):
            return parameters[name].default
    return None
