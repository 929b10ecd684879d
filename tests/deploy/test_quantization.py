"""Backbone-only INT8: finding the backbone in an exported graph, and what the plugin refuses."""

import numpy as np
import openvino as ov
import pytest
from anomalib.deploy import CompressionType
from openvino import opset13 as ops

from anomalib_vqflow.deploy.quantization import backbone_operations, head_ignored_scope
from anomalib_vqflow.models import MsFlow


def two_stage_graph(backbone_weight_name: str) -> ov.Model:
    """image -> conv (backbone weight) -> relu -> conv (head weight) -> score."""
    rng = np.random.default_rng(0)
    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    weight = ops.constant(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), name=backbone_weight_name)
    features = ops.relu(ops.convolution(image, weight, [1, 1], [0, 0], [0, 0], [1, 1], name="stem"), name="act")
    head_weight = ops.constant(rng.normal(size=(1, 4, 1, 1)).astype(np.float32), name="model.flow.weight")
    score = ops.convolution(features, head_weight, [1, 1], [0, 0], [0, 0], [1, 1], name="head")
    return ov.Model([score], [image])


def test_backbone_is_what_reads_its_weights_and_everything_upstream() -> None:
    graph = two_stage_graph("model.feature_extractor.stem.weight")
    assert backbone_operations(graph) == {"image", "stem"}
    ignored = set(head_ignored_scope(graph).names)
    assert {"act", "head"} <= ignored
    assert not ignored & {"image", "stem"}


def test_a_graph_without_backbone_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.feature_extractor\."):
        backbone_operations(two_stage_graph("renamed.weight"))


def test_int8_acq_is_refused_because_it_tunes_on_test_images() -> None:
    model = MsFlow(backbone="tf_efficientnet_lite0", pre_trained=False)
    with pytest.raises(ValueError, match="test images"):
        model._compress_ov_model(two_stage_graph("x"), CompressionType.INT8_ACQ, None)
