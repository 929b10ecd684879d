"""``anomalib-vqflow``: the plugin's own command, for what the stock ``anomalib`` command does not do.

``anomalib-vqflow demo`` runs the whole job on the embedded demo data with no network:
generate the data, train one unified model with its offline CPU config, print the
per-category table, export the model to OpenVINO, score a few test images with the
exported model alone and save pictures of their anomaly maps.

``anomalib-vqflow configs`` prints the folder of the packaged configs
(``configs/model/<name>.yaml`` and ``<name>_cpu.yaml``), for ``anomalib train --config``.

``anomalib-vqflow weights tf_efficientnet_lite0`` puts the packaged ImageNet weights where
Anomalib's built-in models (PaDiM, PatchCore, STFPM, ...) look for them, so that they run offline
(:func:`~anomalib_vqflow.components.weights.cache_packaged_weights`).

Training, testing and exporting otherwise go through the stock command, which sees the
plugin's models and datamodules by their short names::

    anomalib train --model MsFlow --data MultiClassMVTecAD --data.root ./datasets/MVTecAD
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(model_name: str, variant: str = "cpu") -> Path:
    """Return the packaged config of ``model_name`` (a ``list_models()`` name); ``variant`` is ``"cpu"`` or ``"paper"``.

    >>> config_path("ms_flow").name
    'ms_flow_cpu.yaml'
    """
    file_name = f"{model_name}_cpu.yaml" if variant == "cpu" else f"{model_name}.yaml"
    path = CONFIG_DIR / "model" / file_name
    if not path.is_file():
        available = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        msg = f"No config {path}; available configs: {available}."
        raise FileNotFoundError(msg)
    return path


def _save_picture(path: Path, image: object, anomaly_map: object, score: float, mask: object | None) -> None:
    """Save image | anomaly map | ground truth side by side."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", image, None), (f"anomaly map (score {score:.3f})", anomaly_map, "jet")]
    if mask is not None:
        panels.append(("ground truth", mask, "gray"))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, data, colormap) in zip(axes, panels, strict=True):
        axis.imshow(data, cmap=colormap)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def openvino_inferencer(exported: Path, cache_folder: Path) -> Any:
    """Anomalib's ``OpenVINOInferencer`` on the CPU in f32, with its compiled-model cache in ``cache_folder``.

    f32 so that scores match PyTorch's (OpenVINO picks bf16 on CPUs that have it). The
    inferencer writes its cache to ``./openvino_cache``, so it is created from ``cache_folder``.
    """
    from anomalib.deploy import OpenVINOInferencer

    working_folder = Path.cwd()
    os.chdir(cache_folder)
    try:
        return OpenVINOInferencer(path=exported, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    finally:
        os.chdir(working_folder)


def build_from_config(config: Path, model_overrides: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Instantiate the ``model`` and ``data`` sections of an ``anomalib`` CLI config; return them and ``trainer``.

    The same parser machinery as the ``anomalib`` command, so a config means the same thing here.
    ``model_overrides`` replace model ``init_args``; string values are read as YAML (``"[1, 2]"``).
    """
    import yaml
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule
    from jsonargparse import ArgumentParser

    settings = yaml.safe_load(config.read_text())
    for name, value in (model_overrides or {}).items():
        settings["model"]["init_args"][name] = yaml.safe_load(value) if isinstance(value, str) else value
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibModule, "model", fail_untyped=False)
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    parsed = parser.parse_object({"model": settings["model"], "data": settings["data"]})
    instances = parser.instantiate_classes(parsed)
    return instances.model, instances.data, settings.get("trainer", {})


def run_demo(output: Path, model_name: str = "ms_flow", max_epochs: int | None = None, num_pictures: int = 8) -> Path:
    """Train, test, export and score on the demo data with the model's CPU config; return the run folder."""
    import numpy as np
    import yaml
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything
    from PIL import Image

    config = config_path(model_name)
    seed_everything(yaml.safe_load(config.read_text()).get("seed_everything", 0), workers=True)
    model, datamodule, trainer_settings = build_from_config(config)
    if max_epochs is not None:
        trainer_settings["max_epochs"] = max_epochs
    engine = Engine(default_root_dir=output, logger=False, **trainer_settings)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)
    run_folder = Path(engine.trainer.default_root_dir)

    exported = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=run_folder)
    print(f"OpenVINO model: {exported}")
    picture_folder = run_folder / "openvino_pictures"
    picture_folder.mkdir(parents=True, exist_ok=True)
    samples = datamodule.test_data.samples
    per_category = max(num_pictures // samples.category.nunique(), 1)
    defects = samples[samples.label_index == 1].groupby("category").head(per_category)
    inferencer = openvino_inferencer(exported, cache_folder=run_folder)
    for sample in defects.head(num_pictures).itertuples():
        prediction = inferencer.predict(sample.image_path)
        image = np.asarray(Image.open(sample.image_path).convert("RGB"))
        anomaly_map = np.asarray(prediction.anomaly_map).squeeze()
        mask = np.asarray(Image.open(sample.mask_path)) if sample.mask_path else None
        score = float(np.asarray(prediction.pred_score).squeeze())
        target = picture_folder / f"{sample.category}_{sample.label}_{Path(sample.image_path).stem}.png"
        _save_picture(target, image, anomaly_map, score, mask)
        print(f"{sample.category:>10} {sample.label:>8} {Path(sample.image_path).name}: score {score:.3f} -> {target}")
    return run_folder


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalib-vqflow`` command."""
    parser = argparse.ArgumentParser(prog="anomalib-vqflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train, test, export and score on the embedded demo data")
    demo.add_argument("--model", default="ms_flow", help="list_models() name of the plugin model (default: ms_flow)")
    demo.add_argument("--output", type=Path, default=Path("results"), help="results folder (default: ./results)")
    demo.add_argument("--max-epochs", type=int, default=None, help="override the config's max_epochs")
    commands.add_parser("configs", help="print the folder of the packaged configs")
    weights = commands.add_parser("weights", help="cache packaged backbone weights for Anomalib's built-in models")
    weights.add_argument("backbones", nargs="+", help="tf_efficientnet_lite0, tf_efficientnet_lite1 or ..._lite2")
    args = parser.parse_args(argv)
    if args.command == "configs":
        print(CONFIG_DIR)
        return 0
    if args.command == "weights":
        from anomalib_vqflow.components.weights import cache_packaged_weights

        for backbone in args.backbones:
            written = cache_packaged_weights(backbone)
            print(f"{backbone}: {written or 'already in the Hugging Face cache'}")
        return 0
    run_folder = run_demo(args.output, model_name=args.model, max_epochs=args.max_epochs)
    print(f"Done. Results, metrics tables and pictures: {run_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
