"""Accuracy against speed for variants of a model's CPU config, to size its flows for edge CPUs.

Each variant overrides one constructor argument of ``configs/model/<model>_cpu.yaml``; it is
trained unified on a development copy of the embedded demo data (generated with another
seed than the data the README reports on) with the config's budget, tested (mean image and
pixel AUROC over categories, from raw scores), exported to OpenVINO and timed at batch 1
(f32, one image at the config's input size, after warm-up), next to the bare backbone::

    python benchmarks/config_tradeoff.py --model ms_flow --argument condition_channels --values 16 32 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.data import DemoMultiClass, default_demo_root


def images_per_second(compiled: ov.CompiledModel, size: int, repeats: int = 50) -> float:
    """Batch-1 throughput of a compiled OpenVINO model on random input, after 5 warm-up runs."""
    request = compiled.create_infer_request()
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for _ in range(5):
        request.infer([image])
    start = time.perf_counter()
    for _ in range(repeats):
        request.infer([image])
    return repeats / (time.perf_counter() - start)


def compile_f32(path: Path) -> ov.CompiledModel:
    """Compile for the CPU in f32 (OpenVINO picks bf16 by default where the CPU has it)."""
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def backbone_images_per_second(model: torch.nn.Module, size: int, folder: Path) -> float:
    """Throughput of the model's feature extractor alone, exported the same way."""
    path = folder / "backbone.onnx"
    torch.onnx.export(model.model.feature_extractor, (torch.rand(1, 3, size, size),), str(path), dynamo=True)
    return images_per_second(compile_f32(path), size)


def main() -> int:
    """Run every variant and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ms_flow")
    parser.add_argument("--argument", default="condition_channels", help="constructor argument to vary")
    parser.add_argument("--values", nargs="+", default=["16", "32", "64"], help="values (YAML/JSON literals)")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=9826)
    parser.add_argument("--generator-seed", type=int, default=1, help="seed of the development demo images")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    results = []
    for value in args.values:
        seed_everything(args.seed)
        model, config_data, trainer_settings = build_from_config(config_path(args.model), {args.argument: value})
        # A demo data set of its own (other images than the reported benchmark's), so that no
        # setting is chosen on the images the README's tables are computed from.
        datamodule = DemoMultiClass(
            root=default_demo_root().with_name(f"demo_dev_{args.generator_seed}"),
            generator_seed=args.generator_seed,
            train_batch_size=config_data.train_batch_size,
            eval_batch_size=config_data.eval_batch_size,
            num_workers=config_data.num_workers,
            seed=args.seed,
        )
        if args.max_epochs is not None:
            trainer_settings["max_epochs"] = args.max_epochs
        size = int(model.input_size[0])
        with tempfile.TemporaryDirectory() as folder:
            engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False, **trainer_settings)
            start = time.perf_counter()
            engine.fit(model=model, datamodule=datamodule)
            fit_seconds = time.perf_counter() - start
            engine.test(model=model, datamodule=datamodule)
            table = model.evaluator.table
            exported = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=folder)
            model_rate = images_per_second(compile_f32(exported), size)
            backbone_rate = backbone_images_per_second(model, size, Path(folder))
        results.append(
            {
                args.argument: value,
                "image_AUROC": table["mean"]["image_AUROC"],
                "pixel_AUROC": table["mean"]["pixel_AUROC"],
                "pooled_image_AUROC": table["pooled"]["image_AUROC"],
                "pooled_pixel_AUROC": table["pooled"]["pixel_AUROC"],
                "codebook_health": getattr(model, "codebook_health", None),
                "component_health": getattr(model, "component_health", None),
                "fit_seconds": round(fit_seconds, 1),
                "openvino_images_per_second": round(model_rate, 1),
                "backbone_images_per_second": round(backbone_rate, 1),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
    print(
        f"| {args.argument} | image AUROC | pixel AUROC | pooled image / pixel | fit s | OpenVINO img/s "
        "| backbone img/s | ratio | params |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        ratio = row["openvino_images_per_second"] / row["backbone_images_per_second"]
        print(
            f"| {row[args.argument]} | {100 * row['image_AUROC']:.1f} | {100 * row['pixel_AUROC']:.1f} "
            f"| {100 * row['pooled_image_AUROC']:.1f} / {100 * row['pooled_pixel_AUROC']:.1f} "
            f"| {row['fit_seconds']} | {row['openvino_images_per_second']} | {row['backbone_images_per_second']} "
            f"| {ratio:.2f} | {row['trainable_parameters']:,} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
