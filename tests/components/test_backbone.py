"""Tests for the frozen timm feature extractor: weight sources, stage selection, freezing, export."""

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data
from torch import nn

from anomalib_vqflow.components.backbone import FeatureExtractor, layers_for_strides
from anomalib_vqflow.components.weights import OFFLINE_BACKBONES, cache_packaged_weights, packaged_lite_state_dict

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def imagenet_batch(image: np.ndarray, size: int = 224) -> torch.Tensor:
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    batch = nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
    return (batch - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def lite0_classifier() -> nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(packaged_lite_state_dict("tf_efficientnet_lite0"))
    return model.eval()


@pytest.mark.parametrize("backbone", OFFLINE_BACKBONES)
def test_packaged_weights_fit_full_timm_model_exactly(backbone: str) -> None:
    model = timm.create_model(backbone, pretrained=False)
    result = model.load_state_dict(packaged_lite_state_dict(backbone), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


@pytest.mark.parametrize(
    ("image", "expected_top1"),
    [(data.coffee(), {ESPRESSO, CUP, COFFEE_MUG}), (data.chelsea(), set(CATS))],
    ids=["coffee", "chelsea"],
)
def test_packaged_lite0_classifies_sample_photos(
    lite0_classifier: nn.Module, image: np.ndarray, expected_top1: set[int]
) -> None:
    # Observed: coffee -> [967 espresso, 968 cup, 504 coffee mug, ...], chelsea -> [285 Egyptian cat, 281, 282, ...].
    with torch.no_grad():
        probabilities = lite0_classifier(imagenet_batch(image)).softmax(dim=-1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] in expected_top1, top5
    assert probabilities[top5[0]] > 0.5
    assert len(expected_top1 & set(top5)) >= 2, top5


def test_extractor_features_match_packaged_full_model(lite0_classifier: nn.Module) -> None:
    extractor = FeatureExtractor("tf_efficientnet_lite0", strides=(4, 8, 16))
    images = imagenet_batch(data.coffee(), size=256)
    with torch.no_grad():
        expected = lite0_classifier.forward_intermediates(images, indices=[1, 2, 3], intermediates_only=True)
    for feature, reference in zip(extractor(images), expected, strict=True):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)


def test_lite0_strides_and_channels() -> None:
    extractor = FeatureExtractor("tf_efficientnet_lite0", strides=(4, 8, 16))
    assert extractor.layers == [1, 2, 3]
    assert extractor.strides == [4, 8, 16]
    assert extractor.out_channels == [24, 40, 112]
    features = extractor(torch.rand(2, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(2, 24, 64, 64), (2, 40, 32, 32), (2, 112, 16, 16)]


@pytest.mark.parametrize(
    ("backbone", "strides", "layers"),
    [
        ("tf_efficientnet_lite0", (4, 8, 16), [1, 2, 3]),
        ("wide_resnet50_2", (4, 8, 16), [1, 2, 3]),
        ("convnextv2_base", (4, 8, 16), [0, 1, 2]),
        ("tf_efficientnet_b6", (8, 16, 32), [2, 3, 4]),
        ("efficientnet_b4", (2, 16), [0, 3]),
    ],
)
def test_layers_for_strides(backbone: str, strides: tuple[int, ...], layers: list[int]) -> None:
    assert layers_for_strides(backbone, strides) == layers


def test_unknown_stride_names_backbone_stride_and_choices() -> None:
    with pytest.raises(ValueError, match=r"'tf_efficientnet_lite0'.*stride 64.*available strides: \[2, 4, 8, 16, 32\]"):
        FeatureExtractor("tf_efficientnet_lite0", strides=(4, 64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs `layers`"),
        ({"layers": [1, 7]}, "feature indices 0..4"),
        ({"layers": [2, 1]}, "shallowest first"),
        ({"layers": [1, 2], "strides": (4, 16)}, "not the requested strides"),
    ],
)
def test_invalid_stage_selection(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureExtractor("tf_efficientnet_lite0", pre_trained=False, **kwargs)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        FeatureExtractor("resnet18", strides=(4, 8), weights=path)


def test_weights_with_pre_trained_false_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pre_trained=False"):
        FeatureExtractor("resnet18", strides=(4, 8), pre_trained=False, weights=tmp_path / "w.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)

    extractor = FeatureExtractor("resnet18", strides=(4, 8, 16), weights=path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(images, indices=[1, 2, 3], intermediates_only=True)
    for feature, reference in zip(extractor(images), expected, strict=True):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)


def test_weights_missing_stage_keys_are_rejected(tmp_path: Path) -> None:
    state_dict = timm.create_model("resnet18", pretrained=False).state_dict()
    del state_dict["layer2.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state_dict, path)
    with pytest.raises(RuntimeError, match=r"layer2\.0\.conv1\.weight"):
        FeatureExtractor("resnet18", strides=(4, 8), weights=path)


def test_no_packaged_weights_and_no_network_raises_actionable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment at import time, and an empty cache rules out weights cached earlier.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError, match=r"(?s)'resnet18'.*weights=.*HF_HUB_OFFLINE=1.*tf_efficientnet_lite0"):
        FeatureExtractor("resnet18", strides=(4, 8, 16), pre_trained=True)


def test_cached_packaged_weights_reach_timm_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError, match="cache"):
        timm.create_model("tf_efficientnet_lite0", pretrained=True)

    written = cache_packaged_weights("tf_efficientnet_lite0")
    assert written is not None
    assert written.is_relative_to(tmp_path / "hub")
    assert not list(written.parent.glob("*.partial"))
    # What Anomalib's built-in models call: timm's own pretrained path, which now finds the packaged weights.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True)
    expected = packaged_lite_state_dict("tf_efficientnet_lite0")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())
    # Weights already cached (timm's own download, or an earlier call) are left alone.
    assert cache_packaged_weights("tf_efficientnet_lite0") is None


def test_caching_unpackaged_backbone_names_the_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'resnet18'.*tf_efficientnet_lite0"):
        cache_packaged_weights("resnet18", cache_dir=tmp_path)


def test_extractor_is_frozen() -> None:
    extractor = FeatureExtractor("tf_efficientnet_lite0", strides=(8, 16))
    parent = nn.Sequential(extractor)
    parent.train()
    assert not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())
    features = extractor(torch.rand(1, 3, 64, 64, requires_grad=True))
    assert not any(feature.requires_grad for feature in features)


class _ExportWrapper(nn.Module):
    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(images))


def test_onnx_export_matches_openvino(tmp_path: Path) -> None:
    openvino = pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    model = _ExportWrapper(FeatureExtractor("tf_efficientnet_lite0", strides=(4, 8, 16))).eval()
    images = imagenet_batch(data.coffee(), size=256)
    onnx_path = tmp_path / "lite0.onnx"
    torch.onnx.export(model, (images,), onnx_path, dynamo=True)

    compiled = openvino.Core().compile_model(
        openvino.convert_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    results = compiled([images.numpy()])
    expected = model(images)
    assert len(compiled.outputs) == len(expected)
    for output, reference in zip(compiled.outputs, expected, strict=True):
        reference_np = reference.numpy()
        np.testing.assert_allclose(results[output], reference_np, rtol=1e-4, atol=1e-4 * np.abs(reference_np).max())
