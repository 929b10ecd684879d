"""How close the exported OpenVINO model scores to PyTorch, at the model's input size and at other sizes.

Anomalib's exported pre-processing resizes without antialiasing (ONNX export cannot), while
its training and test loops resize with it (in the datamodule); on images already at the input size the two paths agree
(the tests check a relative difference of at most 1e-3), on larger images they differ. This
script trains a plugin model briefly on the demo data (128 px images) with a smaller input
size, so that the pre-processing downsamples, exports it to OpenVINO (f32) without the
post-processor (raw outputs, which the clamping of the post-processor would otherwise hide)
and reports, over all test images, the largest relative difference of ``pred_score`` and
``anomaly_map`` (max |OpenVINO - PyTorch| / max |PyTorch|, per image) and the image AUROC
of both paths::

    python benchmarks/export_parity.py --model ms_flow --image-size 96 --max-epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchvision.transforms.v2.functional import resize

from anomalib_vqflow.cli import build_from_config, config_path, openvino_inferencer
from anomalib_vqflow.evaluation import auroc


def relative_difference(actual: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference divided by the largest absolute reference value."""
    return float(np.abs(actual - reference).max() / max(np.abs(reference).max(), 1e-12))


def main() -> int:
    """Train, export and compare; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ms_flow", help="list_models() name of a plugin model")
    parser.add_argument("--image-size", type=int, default=96, help="model input size (demo images are 128 px)")
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    seed_everything(args.seed)
    model, datamodule, trainer_settings = build_from_config(config_path(args.model))
    model.pre_processor = type(model).configure_pre_processor(image_size=(args.image_size, args.image_size))
    trainer_settings["max_epochs"] = args.max_epochs
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False, **trainer_settings)
        engine.fit(model=model, datamodule=datamodule)
        # Raw outputs on both sides: the post-processor's clamping to [0, 1] would hide differences.
        model.post_processor = None
        exported = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=folder)
        inferencer = openvino_inferencer(exported, cache_folder=Path(folder))
        model.eval()
        rows = {"input size": [], "native size": []}
        scores = {"torch": [], "openvino native": []}
        labels = []
        size = [args.image_size, args.image_size]
        samples = datamodule.test_data.samples
        for image_path, label in zip(samples.image_path, samples.label_index, strict=True):
            # Read the file itself: after fitting, the datamodule's items are already resized to the input size.
            native = read_image(image_path, as_tensor=True).unsqueeze(0)
            resized = resize(native, size, antialias=True)
            with torch.no_grad():
                # What Anomalib's test loop scores: its datamodule resizes with antialiasing.
                expected = model(resized)
            for key, image in (("native size", native), ("input size", resized)):
                prediction = inferencer.predict(image.squeeze(0))
                rows[key].append(
                    (
                        relative_difference(np.asarray(prediction.pred_score), expected.pred_score.numpy()),
                        relative_difference(np.asarray(prediction.anomaly_map).squeeze(), expected.anomaly_map.numpy()),
                    )
                )
                if key == "native size":
                    scores["openvino native"].append(float(np.asarray(prediction.pred_score).squeeze()))
            scores["torch"].append(float(expected.pred_score))
            labels.append(int(label))
    print(f"model {args.model}, input {args.image_size} px, demo test images of 128 px, {len(labels)} images")
    print("| images given to OpenVINO | max rel. diff pred_score | max rel. diff anomaly_map |")
    print("|---|---:|---:|")
    for key, values in rows.items():
        worst = np.max(np.asarray(values), axis=0)
        print(f"| {key} | {worst[0]:.2e} | {worst[1]:.2e} |")
    print(f"image AUROC (raw scores): PyTorch test loop {auroc(scores['torch'], labels):.4f}, ", end="")
    print(f"OpenVINO on native-size images {auroc(scores['openvino native'], labels):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
