"""Train plugin models in the unified setting on one set of categories and write the per-category tables.

One model per entry of ``--models`` is trained on the good training images of *all* the
categories together (no labels), with that model's packaged config
(``configs/model/<name>_cpu.yaml`` by default, ``--variant paper`` for the paper's), then
tested; the per-category table (metrics from raw scores, computed by
``anomalib_vqflow.evaluation``) is written for each model, with the settings, the fit wall
time, the peak memory and the test throughput. Validation (Anomalib's thresholds and
normalisation) uses good training images only; no epoch or threshold is chosen on test
results: the last epoch is tested once.

Categories may come from several MVTec-layout folders (``--roots``); ``--demo`` adds the
embedded demo categories. A model entry may override constructor arguments of its config,
``name:argument=value,argument=value`` (values are YAML), and is reported under that label.
The development set of this project is::

    python benchmarks/unified.py --demo --roots ../shared/data --models ms_flow vq_flow hgad \
        hgad:labels=dataset,num_components=5 --output benchmarks/results/demo_magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.data import DemoMultiClass, MultiClassMVTecAD, discover_categories


def combined_root(roots: list[Path], categories: list[str] | None, folder: Path) -> Path:
    """Link the category folders of several roots side by side in ``folder``, so one datamodule sees them all."""
    folder.mkdir(parents=True, exist_ok=True)
    for root in roots:
        for category in discover_categories(root):
            if categories and category not in categories:
                continue
            link = folder / category
            if link.exists():
                msg = f"Category {category!r} is in more than one root (second: {root})."
                raise ValueError(msg)
            link.symlink_to(root.resolve() / category, target_is_directory=True)
    return folder


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--roots`` (MVTec-layout folders) and ``--demo`` (the embedded demo categories)."""
    parser.add_argument("--roots", type=Path, nargs="*", default=[], help="MVTec-layout folders of categories")
    parser.add_argument("--demo", action="store_true", help="add the embedded demo categories")


def data_roots(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Path]:
    """The folders that ``--roots`` and ``--demo`` name (the demo data generated if needed); a usage error if none."""
    roots = list(args.roots)
    if args.demo:
        demo = DemoMultiClass()
        demo.prepare_data()
        roots.append(demo.root)
    if not roots:
        parser.error("give --roots and/or --demo")
    return roots


def peak_memory_mib() -> tuple[float, float]:
    """Peak resident memory so far, in MiB: of this process, and of its largest finished child (data workers)."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def parse_model_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """``"hgad:labels=dataset,num_components=5"`` -> ``("hgad", {"labels": "dataset", "num_components": 5})``."""
    name, _, arguments = entry.partition(":")
    overrides = {}
    for assignment in filter(None, arguments.split(",")):
        key, separator, value = assignment.partition("=")
        if not separator:
            msg = f"Model entry {entry!r}: expected argument=value, got {assignment!r}."
            raise ValueError(msg)
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def run_model(entry: str, variant: str, root: Path, output: Path, seed: int, max_epochs: int | None) -> dict[str, Any]:
    """Train and test one model entry (a name with optional overrides); return its table and measurements."""
    name, overrides = parse_model_entry(entry)
    label = entry.replace(":", "_").replace(",", "_").replace("=", "-")
    config = config_path(name, variant)
    seed_everything(seed, workers=True)
    model, config_data, trainer_settings = build_from_config(config, overrides)
    if max_epochs is not None:
        trainer_settings["max_epochs"] = max_epochs
    datamodule = MultiClassMVTecAD(
        root=root,
        train_batch_size=config_data.train_batch_size,
        eval_batch_size=config_data.eval_batch_size,
        num_workers=config_data.num_workers,
        seed=seed,
    )
    engine = Engine(default_root_dir=output / "runs", logger=False, enable_progress_bar=False, **trainer_settings)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    engine.test(model=model, datamodule=datamodule)
    test_seconds = time.perf_counter() - start
    table = model.evaluator.table
    table.write(output / label)
    extra_tables = {}
    calibration = getattr(model.model, "concept_calibration", None)
    if calibration is not None:
        # The same trained model scored with the per-prototype calibration switched the other way.
        model.model.concept_calibration = not calibration
        # Refit the post-processor's normalisation and thresholds on the switched scores.
        engine.validate(model=model, datamodule=datamodule)
        engine.test(model=model, datamodule=datamodule)
        model.model.concept_calibration = calibration
        variant = "without" if calibration else "with"
        extra_tables[f"{variant} concept calibration"] = model.evaluator.table.to_markdown()
        model.evaluator.table.write(output / f"{label}_{variant}_calibration")
    main_process, largest_worker = peak_memory_mib()
    return {
        "model": label,
        "config": str(config.relative_to(config.parents[2])),
        "overrides": overrides,
        "max_epochs": trainer_settings.get("max_epochs"),
        "train_images": len(datamodule.train_data),
        "validation_images": len(datamodule.val_data),
        "test_images": len(datamodule.test_data),
        "fit_seconds": round(fit_seconds, 1),
        "test_images_per_second": round(len(datamodule.test_data) / test_seconds, 2),
        "peak_rss_main_process_mib": round(main_process, 1),
        "peak_rss_largest_data_worker_mib": round(largest_worker, 1),
        "codebook_health": getattr(model, "codebook_health", None),
        "component_health": getattr(model, "component_health", None),
        "table": table.to_markdown(),
        "extra_tables": extra_tables,
    }


def main() -> int:
    """Parse the arguments, run every model, write ``summary.json`` and ``summary.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--categories", nargs="*", default=None, help="restrict to these categories")
    parser.add_argument(
        "--models", nargs="+", default=["ms_flow"], help="list_models() names, each optionally name:argument=value,..."
    )
    parser.add_argument("--variant", choices=["cpu", "paper"], default="cpu", help="config variant")
    parser.add_argument("--max-epochs", type=int, default=None, help="override every config's max_epochs")
    parser.add_argument("--seed", type=int, default=9826)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/unified"))
    args = parser.parse_args()

    roots = data_roots(parser, args)
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        root = combined_root(roots, args.categories, Path(folder) / "unified")
        results = [run_model(m, args.variant, root, args.output, args.seed, args.max_epochs) for m in args.models]
    processor = platform.processor() or platform.machine()
    machine = f"{processor}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    summary = {"command": " ".join(sys.argv), "machine": machine, "seed": args.seed, "results": results}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"Command: `{summary['command']}`", f"Machine: {machine}", ""]
    for result in results:
        settings = {k: v for k, v in result.items() if k not in ("table", "extra_tables")}
        lines += [f"## {result['model']}", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).strip(), "```", ""]
        lines += [result["table"], ""]
        for title, extra in result["extra_tables"].items():
            lines += [f"### {result['model']} {title}", "", extra, ""]
    (args.output / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
