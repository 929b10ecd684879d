"""Accuracy of trained models deployed with OpenVINO: inference precision and FP16 / INT8 compression against FP32.

Each trained checkpoint (``--checkpoints name=path``, e.g. from ``benchmarks/unified.py``'s
runs) is exported to OpenVINO without Anomalib's post-processor (metrics need the raw
scores; the post-processor's clamping creates ties) in these variants:

- ``fp32``: the reference, compiled with ``INFERENCE_PRECISION_HINT=f32``;
- ``fp32, CPU default``: the same file compiled with OpenVINO's default precision, which is
  bf16 on CPUs with bf16 arithmetic (AVX-512 BF16, AMX) and f32 elsewhere (the table says
  which it ran in);
- ``fp16``: weights stored in half precision (``CompressionType.FP16``);
- ``int8 weights``: weights compressed to 8 bits (``CompressionType.INT8``, NNCF);
- ``int8 ptq``: post-training quantization of weights and activations
  (``CompressionType.INT8_PTQ``, NNCF), calibrated on the validation split, i.e. good
  *training* images: no test image is seen before scoring.

The plugin's models apply both INT8 variants to the backbone only
(:mod:`anomalib_vqflow.deploy.quantization`); a variant that fails is listed with its error.

Every variant scores every test image (at the model's input size, as the PyTorch test loop
feeds them) and the per-category table is computed from its raw outputs with the plugin's
evaluation. The output lists the mean image / pixel AUROC and AUPRO, the pooled image
AUROC, the largest per-category change of image AUROC against fp32, and the batch-1 speed
of each variant on this CPU. Needs ``nncf`` (``pip install anomalib-vqflow[compression]``)::

    python benchmarks/deploy_accuracy.py --demo --roots ../shared/data \\
        --checkpoints ms_flow=benchmarks/results/demo_magnetic_tile/runs/MsFlow/.../model.ckpt \\
        --output benchmarks/results/deploy_accuracy
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.models import get_model
from torchvision.transforms.v2 import Resize

from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.evaluation import compute_metrics_table

sys.path.insert(0, str(Path(__file__).parent))
from edge_speed import cpu_name
from unified import add_data_arguments, combined_root, data_roots

# (label, compression type, compile with OpenVINO's default precision instead of f32)
VARIANTS = (
    ("fp32", None, False),
    ("fp32, CPU default precision", None, True),
    ("fp16", CompressionType.FP16, False),
    ("int8 weights", CompressionType.INT8, False),
    ("int8 ptq", CompressionType.INT8_PTQ, False),
)


def score_test_set(compiled: ov.CompiledModel, datamodule: MultiClassMVTecAD) -> dict[str, Any]:
    """Raw scores and maps of every test image, with labels, masks and categories; and the batch-1 time per image."""
    request = compiled.create_infer_request()
    scores, maps, labels, masks, categories = [], [], [], [], []
    start = time.perf_counter()
    for item in datamodule.test_data:
        outputs = request.infer([item.image.unsqueeze(0).numpy()])
        named = {key.get_any_name(): value for key, value in outputs.items()}
        scores.append(float(np.asarray(named["pred_score"]).squeeze()))
        maps.append(np.asarray(named["anomaly_map"]).squeeze())
        labels.append(int(item.gt_label))
        masks.append(np.zeros_like(maps[-1], dtype=bool) if item.gt_mask is None else item.gt_mask.numpy().squeeze())
        categories.append(item.category)
    seconds = (time.perf_counter() - start) / len(scores)
    return {
        "table": compute_metrics_table(scores, labels, categories, np.stack(maps), np.stack(masks)),
        "milliseconds_per_image": 1000 * seconds,
    }


def evaluate(name: str, checkpoint: Path, datamodule: MultiClassMVTecAD, folder: Path) -> list[dict[str, Any]]:
    """Export one checkpoint in every variant and score the test set with each."""
    model_class = type(get_model(name, pre_trained=False))
    model = model_class.load_from_checkpoint(checkpoint, weights_only=True).eval()
    # Resize validation and test images to the model's input size in the datasets, as Anomalib's engine
    # does when it runs the model; as the datamodule's own augmentations, so that the setup which
    # INT8 PTQ runs on it keeps them (the calibration images and every variant's test images alike).
    (resize,) = extract_transforms_by_type(model.pre_processor.transform, Resize)
    datamodule.val_augmentations = datamodule.test_augmentations = resize
    datamodule.setup()
    raw = copy.deepcopy(model)
    raw.post_processor = None
    engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False)
    core = ov.Core()
    rows, reference, exports = [], None, {}
    for label, compression, default_precision in VARIANTS:
        config = {} if default_precision else {"INFERENCE_PRECISION_HINT": "f32"}
        try:
            # The default-precision variant compiles the f32 file again, it does not export it again.
            if compression not in exports:
                exports[compression] = engine.export(
                    model=raw,
                    export_type=ExportType.OPENVINO,
                    export_root=folder / label.replace(" ", "_").replace(",", ""),
                    compression_type=compression,
                    datamodule=datamodule if compression == CompressionType.INT8_PTQ else None,
                )
            exported = exports[compression]
            compiled = core.compile_model(str(exported), "CPU", config)
        # A compression that breaks the graph is a result to report, not a reason to stop the others.
        except Exception as error:
            reason = str(error).strip().splitlines()
            rows.append(
                {
                    "model": name,
                    "variant": label,
                    "failed": next((line for line in reason if "Check" in line), reason[-1]),
                }
            )
            print(f"{name} {label}: failed", flush=True)
            continue
        result = score_test_set(compiled, datamodule)
        table = result["table"]
        if reference is None:
            reference = table
        changes = [table[c]["image_AUROC"] - reference[c]["image_AUROC"] for c in table.categories]
        rows.append(
            {
                "model": name,
                "variant": label,
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "image_AUROC": table["mean"]["image_AUROC"],
                "pixel_AUROC": table["mean"]["pixel_AUROC"],
                "AUPRO": table["mean"]["AUPRO"],
                "pooled_image_AUROC": table["pooled"]["image_AUROC"],
                "largest_category_image_AUROC_change": max(changes, key=abs),
                "per_category_image_AUROC": {c: table[c]["image_AUROC"] for c in table.categories},
                "batch1_images_per_second": round(1000 / result["milliseconds_per_image"], 1),
                "size_mib": round(exported.with_suffix(".bin").stat().st_size / 2**20, 2),
            }
        )
        print(f"{name} {label}: {rows[-1]['image_AUROC']:.4f} image AUROC", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per model and variant, percentages."""
    lines = [
        "| model | variant | runs in | image AUROC | pixel AUROC | AUPRO | pooled image AUROC "
        "| largest category change (image AUROC) | b1 img/s | weights MiB |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['model']} | {row['variant']} | failed: {row['failed'][:120]} |")
            continue
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['inference_precision']} | {100 * row['image_AUROC']:.1f} "
            f"| {100 * row['pixel_AUROC']:.1f} | {100 * row['AUPRO']:.1f} | {100 * row['pooled_image_AUROC']:.1f} "
            f"| {100 * row['largest_category_image_AUROC_change']:+.1f} | {row['batch1_images_per_second']} "
            f"| {row['size_mib']} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Evaluate every checkpoint in every variant; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="list_models() name=checkpoint path")
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=9826, help="seed of the validation split (as in training)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    roots = data_roots(parser, args)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = combined_root(roots, None, Path(folder) / "unified")
        for entry in args.checkpoints:
            name, _, path = entry.partition("=")
            # A datamodule per model: each resizes to its own model's input size.
            datamodule = MultiClassMVTecAD(
                root=root, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=args.seed
            )
            rows += evaluate(name, Path(path), datamodule, Path(folder) / name)
    machine = f"{cpu_name()}, torch {torch.__version__}, OpenVINO {ov.__version__}"
    text = f"Command: `{' '.join(sys.argv)}`\n\nMachine: {machine}\n\n{markdown(rows)}\n"
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "deploy_accuracy.json").write_text(
            json.dumps({"command": " ".join(sys.argv), "machine": machine, "rows": rows}, indent=2) + "\n"
        )
        (args.output / "deploy_accuracy.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
