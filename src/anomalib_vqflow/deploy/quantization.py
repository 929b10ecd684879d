"""INT8 compression of the backbone alone: the plugin's heads stay in floating point.

Anomalib's ``CompressionType.INT8_PTQ`` quantizes the whole exported graph. A flow's score is a
log-likelihood: small differences of sums of squared latents, which the couplings compute
through ``exp`` of their scale networks. With 8-bit activations in the heads that signal drowns:
MsFlow's mean image AUROC on the development set fell from 94.0 (f32) to 50.7, chance level
(``benchmarks/deploy_accuracy.py``). The backbone is where INT8 pays (most of the convolutions)
and where it is harmless (ImageNet features are made for it), so the plugin's models quantize
the backbone only: :func:`head_ignored_scope` keeps everything else out of NNCF's reach.

The backbone is found in the OpenVINO graph by its weights: every operation that reads a
constant named after the torch module (``model.feature_extractor.``), and everything upstream
of those operations (the pre-processing and the backbone's layers whose folded weights lost
their names). What is left is the head. HGAD's export has no such names (it runs the backbone
on every level of its image pyramid, and the exporter renames the shared weights): INT8 is
refused for it with an error; FP16 works.

Example:
    >>> import numpy as np
    >>> import openvino as ov
    >>> from openvino import opset13 as ops
    >>> image = ops.parameter([1, 4], np.float32, name="image")
    >>> weight = ops.constant(np.ones((4, 4), np.float32), name="model.feature_extractor.weight")
    >>> features = ops.matmul(image, weight, False, False, name="backbone")
    >>> score = ops.matmul(features, ops.constant(np.ones((4, 1), np.float32)), False, False, name="head")
    >>> sorted(backbone_operations(ov.Model([score], [image])))
    ['backbone', 'image']
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "model.feature_extractor."
# NNCF's own recommendation for the size of a calibration set.
RECOMMENDED_CALIBRATION_IMAGES = 300


def backbone_operations(model: ov.Model, prefix: str = BACKBONE_WEIGHTS) -> set[str]:
    """Names of the operations (constants aside) that compute the backbone's features in an exported graph.

    Raises:
        ValueError: no operation reads a weight whose name starts with ``prefix``.
    """
    readers = [
        operation
        for operation in model.get_ordered_ops()
        if any(
            port.get_source_output().get_node().get_type_name() == "Constant"
            and port.get_source_output().get_node().get_friendly_name().startswith(prefix)
            for port in operation.inputs()
        )
    ]
    if not readers:
        msg = (
            f"No operation of the exported graph reads a weight named {prefix}*: cannot tell the backbone apart, "
            "and INT8 would quantize the head as well (compress to FP16 instead)."
        )
        raise ValueError(msg)
    found: set[str] = set()
    pending = readers
    while pending:
        operation = pending.pop()
        if operation.get_type_name() == "Constant" or operation.get_friendly_name() in found:
            continue
        found.add(operation.get_friendly_name())
        pending.extend(port.get_source_output().get_node() for port in operation.inputs())
    return found


def head_ignored_scope(model: ov.Model, prefix: str = BACKBONE_WEIGHTS) -> Any:
    """NNCF's ``IgnoredScope`` of every operation that is not the backbone's."""
    import nncf

    backbone = backbone_operations(model, prefix)
    head = [
        operation.get_friendly_name()
        for operation in model.get_ordered_ops()
        if operation.get_type_name() != "Constant" and operation.get_friendly_name() not in backbone
    ]
    return nncf.IgnoredScope(names=head, validate=False)


def calibration_dataset(model: ov.Model, datamodule: AnomalibDataModule | None) -> Any:
    """Wrap the validation images as NNCF's calibration set (in this plugin's data, good training images).

    Raises:
        ValueError: no datamodule.
    """
    import nncf

    if datamodule is None:
        msg = "INT8 post-training quantization calibrates on the validation images: pass a datamodule."
        raise ValueError(msg)
    datamodule.setup("fit")
    batch = model.input(0).partial_shape[0]
    if batch.is_static:
        datamodule.eval_batch_size = batch.get_length()
    dataloader = datamodule.val_dataloader()
    if len(dataloader.dataset) < RECOMMENDED_CALIBRATION_IMAGES:
        logger.warning(
            "INT8 calibration on %d validation images; NNCF recommends %d or more.",
            len(dataloader.dataset),
            RECOMMENDED_CALIBRATION_IMAGES,
        )
    return nncf.Dataset(dataloader, lambda batch: batch.image)
