"""Train the plugin's and Anomalib's models in the unified setting on the same data and compare them per category.

Every model of ``--models`` is trained on the good training images of *all* the categories
together (no labels), tested once, and scored per category from its raw outputs by
``anomalib_vqflow.evaluation`` (Anomalib's own evaluator would see post-processed scores; here the
built-in models run without a post-processor). Each run happens in a fresh process, so its peak
memory is its own and a model that fails is reported while the others go on.

Rules, the same for every model and written into the output:

- the same categories, input size (``--image-size``, the ``_cpu`` configs' 256), training images
  and seed; the validation split comes from good training images, never from the test set;
- the plugin's models use their packaged config (``configs/model/<name>_cpu.yaml``, or the
  paper's with ``--variant paper``); PaDiM, PatchCore, CFLOW and STFPM use their defaults on the
  offline backbone (``--backbone``) through :mod:`baselines`, any other Anomalib image model
  (``--models Dinomaly``, by class or ``list_models()`` name) its own defaults and weights; all with
  the data settings of the VqFlow config and the same epoch cap (``--max-epochs``, by default that
  config's). A model whose weights cannot be fetched is listed as not run, with the reason;
- training budget: at most ``--fit-minutes`` of training wall time per model (``0``: none), or
  the epoch cap, whichever ends first; PaDiM and PatchCore need one pass over the data;
- the last weights are tested once: no epoch, threshold or setting is chosen on test results.

Outputs in ``--output``: ``results.json`` (everything), ``metrics.csv`` (one row per model, seed
and category), ``summary.md`` (the rules, an overview with means and costs, per-category tables),
``image_auroc_per_category.png`` and ``anomaly_maps.png`` (the first defective test image of every
category, by file name, under every model). Checkpoints go to ``<output>/runs`` (not committed).
The committed CPU comparison::

    python benchmarks/unified.py --demo --roots ../shared/data --output benchmarks/results/unified_cpu

A model entry may override constructor arguments, ``name:argument=value,argument=value`` (values
are YAML), and is reported under that label.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.data import DemoMultiClass, MultiClassMVTecAD, discover_categories
from anomalib_vqflow.data.dataset import make_category_samples
from anomalib_vqflow.evaluation.per_category import SUMMARY_ROWS, MetricsTable

PLUGIN_MODELS = {"vqflow": "vq_flow", "msflow": "ms_flow", "hgad": "hgad", "uniad": "uni_ad"}
DEFAULT_MODELS = ["VqFlow", "MsFlow", "Hgad", "UniAd", "Patchcore", "Padim", "Cflow", "Fastflow", "Stfpm"]
# PatchCore's greedy coreset picks one patch per pass over all training patches (~1,000 per image at 256 px; a pass
# takes 0.5 s on a 2-core CPU for ~900 images): its default 10% would take hours there, 0.1% takes about 8 minutes.
BUILTIN_OVERRIDES: dict[str, dict[str, Any]] = {"patchcore": {"coreset_sampling_ratio": 0.001}}
DATA_SETTINGS = ("train_batch_size", "eval_batch_size", "num_workers")
OVERVIEW_COLUMNS = ("image_AUROC", "pixel_AUROC", "AUPRO", "image_AP", "pixel_AP", "image_F1max")


@dataclass
class RunSettings:
    """What one model run needs; sent to its worker process."""

    entry: str
    variant: str
    root: Path
    runs: Path
    seed: int
    max_epochs: int | None
    fit_minutes: float
    image_size: int
    backbone: str
    grid_images: list[str] = field(default_factory=list)
    curve_epochs: list[int] = field(default_factory=list)


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


TEST_HALVES = ("dev", "report")
HALF_RULES = {
    "all": "all of them.",
    "dev": "the development half (even positions of the sorted file names), on which settings may be chosen.",
    "report": "the reported half (odd positions of the sorted file names); no setting was chosen on it.",
}


def halved_root(root: Path, half: str, folder: Path) -> Path:
    """A copy of ``root`` (links) whose categories keep one fixed half of their test images, chosen by file name.

    In every ``<category>/test/<label>/`` folder, the files at even positions of the sorted names
    (``000.png``, ``002.png``, ...) are the development half (``"dev"``), on which settings may be
    chosen; the others are the reported half (``"report"``), which no choice ever looks at.
    Training images and masks are linked as they are.
    """
    if half not in TEST_HALVES:
        msg = f"half must be one of {TEST_HALVES}, got {half!r}."
        raise ValueError(msg)
    for category in discover_categories(root):
        source = root.resolve() / category
        target = folder / category
        target.mkdir(parents=True)
        for part in source.iterdir():
            if part.name != "test":
                (target / part.name).symlink_to(part, target_is_directory=part.is_dir())
        for label in sorted(path for path in (source / "test").iterdir() if path.is_dir()):
            (target / "test" / label.name).mkdir(parents=True)
            for position, image in enumerate(sorted(label.iterdir())):
                if (position % 2 == 0) == (half == "dev"):
                    (target / "test" / label.name / image.name).symlink_to(image)
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


def parse_model_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """``"Hgad:labels=dataset,num_components=5"`` -> ``("hgad", {"labels": "dataset", "num_components": 5})``.

    The name is a plugin model or any Anomalib image model, by class name or ``list_models()`` name,
    case-insensitive, with or without underscores (``VqFlow``, ``vq_flow``, ``Dinomaly``, ``inp_former``).
    """
    from baselines import builtin_image_models

    name, _, arguments = entry.partition(":")
    key = name.lower().replace("_", "")
    if key not in PLUGIN_MODELS and key not in builtin_image_models():
        known = sorted({*PLUGIN_MODELS.values(), *builtin_image_models()})
        msg = f"Unknown model {name!r} in {entry!r}; the plugin's and Anomalib's image models: {known}."
        raise ValueError(msg)
    overrides = {}
    for assignment in filter(None, arguments.split(",")):
        argument, separator, value = assignment.partition("=")
        if not separator:
            msg = f"Model entry {entry!r}: expected argument=value, got {assignment!r}."
            raise ValueError(msg)
        overrides[argument] = yaml.safe_load(value)
    return key, overrides


def entry_label(entry: str) -> str:
    """A file-name-safe label for a model entry."""
    return entry.replace(":", "_").replace(",", "_").replace("=", "-")


def grid_samples(root: Path) -> list[tuple[str, str]]:
    """``(image, mask or "")`` of the first defective test image of every category, by file name.

    Read from the datamodule's own sample table, so the masks are the ones the metrics use; chosen
    before any model is run.
    """
    grid = []
    for category in discover_categories(root):
        samples = make_category_samples(root, category)
        defects = samples[(samples.split == "test") & (samples.label_index == 1)].sort_values("image_path")
        if len(defects):
            grid.append((str(defects.image_path.iloc[0]), str(defects.mask_path.iloc[0] or "")))
    return grid


def build_model(settings: RunSettings) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model of ``settings.entry``, its data settings, its trainer settings and a record of what was built."""
    from anomalib_vqflow.evaluation import UnifiedEvaluator

    key, overrides = parse_model_entry(settings.entry)
    flagship = yaml.safe_load(config_path(PLUGIN_MODELS["vqflow"], settings.variant).read_text())
    data = {name: flagship["data"]["init_args"][name] for name in DATA_SETTINGS}
    if key in PLUGIN_MODELS:
        config = config_path(PLUGIN_MODELS[key], settings.variant)
        # No test pictures, as for Anomalib's models: drawing them would count in the test throughput.
        model, config_data, trainer = build_from_config(config, {"visualizer": False, **overrides})
        data = {name: getattr(config_data, name) for name in data}
        record = {"config": str(config.relative_to(config.parents[2])), "overrides": overrides}
    else:
        from baselines import baseline_backbone, build_baseline

        arguments = {**BUILTIN_OVERRIDES.get(key, {}), **overrides}
        model = build_baseline(
            key,
            backbone=settings.backbone,
            image_size=settings.image_size,
            evaluator=UnifiedEvaluator(),
            post_processor=False,
            visualizer=False,
            **arguments,
        )
        trainer = {"max_epochs": flagship["trainer"]["max_epochs"]}
        backbone = baseline_backbone(key, settings.backbone) or "the model's own"
        record = {"anomalib_model": type(model).__name__, "backbone": backbone}
        record["arguments"] = arguments
    if settings.max_epochs is not None:
        trainer["max_epochs"] = settings.max_epochs
    if settings.fit_minutes > 0:
        trainer["max_time"] = datetime.timedelta(minutes=settings.fit_minutes)
    return model, data, trainer, record


@torch.no_grad()
def anomaly_maps(model: Any, paths: list[str]) -> list[np.ndarray]:
    """The model's raw anomaly map of each image, at the model's input size."""
    from anomalib.data.utils import read_image

    model.eval()
    maps = []
    for path in paths:
        image = read_image(path, as_tensor=True).unsqueeze(0).to(model.device)
        output = model.model(model.pre_processor.transform(image))
        maps.append(output.anomaly_map.float().cpu().numpy().squeeze())
    return maps


def curve_checkpoints(epochs: list[int], folder: Path) -> tuple[Any, list[tuple[int, float, Path]]]:
    """A Lightning callback that writes a checkpoint at each of ``epochs`` before the last, and the list it fills.

    Each entry is ``(epoch, seconds from the start of fit to the end of that epoch, path)``: a
    later test of the checkpoint gives one point of the quality-against-time curve (the last
    epoch's point is the run's own test). Built here because Lightning is imported in the worker.
    """
    from lightning.pytorch import Callback

    points: list[tuple[int, float, Path]] = []

    class _Checkpoints(Callback):
        def on_fit_start(self, *_: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, _module: Any) -> None:
            epoch = trainer.current_epoch + 1
            if epoch in epochs and epoch < trainer.max_epochs:
                seconds = time.perf_counter() - self.start
                path = folder / f"epoch_{epoch}.ckpt"
                trainer.save_checkpoint(path)
                points.append((epoch, round(seconds, 1), path))

    return _Checkpoints(), points


def run_model(settings: RunSettings) -> dict[str, Any]:
    """Train and test one model entry in this (fresh) process; return its table and measurements."""
    import warnings

    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    sys.path.insert(0, str(Path(__file__).parent))
    warnings.filterwarnings("ignore")
    # A spawned process makes spawn its default, and the data loaders would then start every
    # worker of every epoch as a fresh interpreter (seconds each): fork, as `anomalib train` does.
    multiprocessing.set_start_method("fork", force=True)
    seed_everything(settings.seed, workers=True)
    model, data, trainer_settings, record = build_model(settings)
    datamodule = MultiClassMVTecAD(root=settings.root, seed=settings.seed, **data)
    label = entry_label(settings.entry)
    folder = settings.runs / f"{label}_seed{settings.seed}"
    curve_callback, curve_points = curve_checkpoints(settings.curve_epochs, folder / "curve")
    engine = Engine(
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        callbacks=[curve_callback] if settings.curve_epochs else [],
        **trainer_settings,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    trainer = engine.trainer
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    start = time.perf_counter()
    engine.test(model=model, datamodule=datamodule)
    test_seconds = time.perf_counter() - start
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    table = model.evaluator.table.to_dict()
    maps = anomaly_maps(model, settings.grid_images)
    epochs_trained = round(batches / max(trainer.num_training_batches, 1), 2)
    # Every curve point tested once, after training; the last one is the run's own table.
    curve = []
    for epoch, seconds, path in curve_points:
        if epoch < epochs_trained:
            engine.test(model=model, datamodule=datamodule, ckpt_path=path)
            curve.append({"epoch": epoch, "fit_seconds": seconds, "table": model.evaluator.table.to_dict()})
    curve.append({"epoch": epochs_trained, "fit_seconds": round(fit_seconds, 1), "table": table})
    return {
        "model": label,
        "seed": settings.seed,
        **record,
        "data": data,
        "max_epochs": trainer_settings.get("max_epochs"),
        "fit_minutes_budget": settings.fit_minutes or None,
        "epochs_trained": epochs_trained,
        "train_images": len(datamodule.train_data),
        "validation_images": len(datamodule.val_data),
        "test_images": len(datamodule.test_data),
        "fit_seconds": round(fit_seconds, 1),
        "test_images_per_second": round(len(datamodule.test_data) / test_seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_data_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "peak_gpu_mib": None if gpu_peak is None else round(gpu_peak, 1),
        "table": table,
        "anomaly_maps": maps,
        "curve": curve,
    }


def run_in_fresh_process(settings: RunSettings) -> dict[str, Any]:
    """:func:`run_model` in a new process; a failure becomes a ``skipped`` record with the reason."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(run_model, settings).result()
        except Exception as err:  # Any failure of one model is reported, and the others still run.
            print(f"{settings.entry} (seed {settings.seed}) did not run: {err}", file=sys.stderr)
            reason = f"{type(err).__name__}: {err}"
            return {"model": entry_label(settings.entry), "seed": settings.seed, "skipped": reason}


def _mean_and_spread(values: list[float]) -> str:
    """``"95.1"`` for one value, ``"95.1 ± 0.4"`` (sample standard deviation) for several, in percent."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _cost(values: list[float], digits: int = 0) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.{digits}f}" if values else "n/a"


def by_model(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs that produced a table, grouped by model label in the order they ran."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if "table" in result:
            grouped.setdefault(result["model"], []).append(result)
    return grouped


def metric_table(grouped: dict[str, list[dict[str, Any]]], metric: str) -> list[str]:
    """Markdown: categories (and the mean) down, models across, one metric."""
    rows = next(iter(grouped.values()))[0]["table"]["rows"]
    lines = ["| category | " + " | ".join(grouped) + " |", "|:---|" + "---:|" * len(grouped)]
    for row in [name for name in rows if name != "pooled"]:
        cells = [_mean_and_spread([run["table"]["rows"][row][metric] for run in runs]) for runs in grouped.values()]
        label = f"**{row}**" if row in SUMMARY_ROWS else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def overview_table(grouped: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown: one row per model, mean over categories of every metric, and the costs."""
    header = [*OVERVIEW_COLUMNS, "epochs", "fit s", "test img/s", "peak RSS MiB"]
    lines = ["| model | " + " | ".join(header) + " |", "|:---|" + "---:|" * len(header)]
    for label, runs in grouped.items():
        metrics = [_mean_and_spread([run["table"]["rows"]["mean"][c] for run in runs]) for c in OVERVIEW_COLUMNS]
        costs = [
            _cost([run["epochs_trained"] for run in runs], 1),
            _cost([run["fit_seconds"] for run in runs]),
            _cost([run["test_images_per_second"] for run in runs], 1),
            _cost([run["peak_rss_mib"] for run in runs]),
        ]
        lines.append(f"| {label} | " + " | ".join(metrics + costs) + " |")
    return lines


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    """One row per model, seed and table row (categories, mean, pooled), metrics as fractions."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "seed", "category", *MetricsTable.COLUMNS])
        for run in results:
            for row, values in run.get("table", {}).get("rows", {}).items():
                writer.writerow([run["model"], run["seed"], row, *(values[c] for c in MetricsTable.COLUMNS)])


def plot_image_auroc(grouped: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Grouped bars: image AUROC per category (and the mean) for every model, mean over seeds."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in next(iter(grouped.values()))[0]["table"]["rows"] if r != "pooled"]
    width = 0.8 / len(grouped)
    figure, axis = plt.subplots(figsize=(max(8, 1.4 * len(rows) * len(grouped) / 4), 4.5))
    for index, (label, runs) in enumerate(grouped.items()):
        values = [100 * statistics.mean(run["table"]["rows"][row]["image_AUROC"] for run in runs) for row in rows]
        axis.bar(np.arange(len(rows)) + (index - (len(grouped) - 1) / 2) * width, values, width, label=label)
    axis.set_xticks(np.arange(len(rows)), rows)
    axis.set_ylabel("image AUROC (%)")
    axis.set_ylim(40, 100)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.set_title("Unified setting: one model over all categories")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_anomaly_maps(grouped: dict[str, list[dict[str, Any]]], grid: list[tuple[str, str]], path: Path) -> None:
    """Rows: the grid images; columns: image, ground truth, each model's map (first seed).

    Each model's maps share one colour scale (its minimum to maximum over the grid images), as one
    threshold of a unified model would see them.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = 2 + len(grouped)
    figure, axes = plt.subplots(len(grid), columns, figsize=(1.6 * columns, 1.6 * len(grid)), squeeze=False)
    for row, (image_path, mask_path) in enumerate(grid):
        image = Image.open(image_path).convert("RGB")
        mask = Image.open(mask_path).convert("L") if mask_path else Image.new("L", image.size)
        axes[row, 0].imshow(image)
        axes[row, 1].imshow(mask, cmap="gray")
        axes[row, 0].set_ylabel(Path(image_path).parents[2].name, fontsize="small")
        for column, runs in enumerate(grouped.values(), start=2):
            maps = runs[0]["anomaly_maps"]
            low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
            axes[row, column].imshow(maps[row], cmap="jet", vmin=low, vmax=high)
    for column, title in enumerate(["image", "ground truth", *grouped]):
        axes[0, column].set_title(title, fontsize="small")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


CURVE_METRICS = ("image_AUROC", "pixel_AUROC", "AUPRO")


def write_curve(grouped: dict[str, list[dict[str, Any]]], output: Path) -> list[str]:
    """``curve.csv`` and ``curve.png`` (first seed): quality against training time; returns the Markdown table.

    One row per model and tested checkpoint: the epochs trained, the training minutes to reach
    them, the mean over categories and the magnetic tile's value (where that category is present).
    """
    rows = []
    for label, runs in grouped.items():
        for point in runs[0]["curve"]:
            table = point["table"]["rows"]
            rows.append(
                {
                    "model": label,
                    "epoch": point["epoch"],
                    "fit_minutes": round(point["fit_seconds"] / 60, 2),
                    **{f"mean_{m}": table["mean"][m] for m in CURVE_METRICS},
                    **{f"magnetic_tile_{m}": table.get("magnetic_tile", {}).get(m) for m in CURVE_METRICS},
                }
            )
    with (output / "curve.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_curve(rows, output / "curve.png")
    header = ["model", "epoch", "fit min", *(f"mean {m}" for m in CURVE_METRICS), "magnetic_tile image_AUROC"]
    lines = ["## Quality against training time (%)", "", "| " + " | ".join(header) + " |", "|:---|" + "---:|" * 6]
    for row in rows:
        values = [row[f"mean_{m}"] for m in CURVE_METRICS] + [row["magnetic_tile_image_AUROC"]]
        cells = ["n/a" if v is None else f"{100 * v:.1f}" for v in values]
        lines.append(f"| {row['model']} | {row['epoch']:g} | {row['fit_minutes']:.1f} | " + " | ".join(cells) + " |")
    return [*lines, "", "![quality against training time](curve.png)", ""]


def plot_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean and magnetic tile image AUROC against training minutes; one-pass models as single marks."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for label in dict.fromkeys(row["model"] for row in rows):
        points = [row for row in rows if row["model"] == label]
        minutes = [row["fit_minutes"] for row in points]
        for axis, key in zip(axes, ("mean_image_AUROC", "magnetic_tile_image_AUROC"), strict=True):
            values = [None if row[key] is None else 100 * row[key] for row in points]
            style = "o-" if len(points) > 1 else "*"
            axis.plot(minutes, values, style, label=label, markersize=6 if len(points) > 1 else 12)
    for axis, title in zip(axes, ("mean over categories", "magnetic_tile"), strict=True):
        axis.set_title(f"image AUROC, {title}")
        axis.set_xlabel("training minutes (fit)")
        axis.set_ylabel("image AUROC (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def rules(args: argparse.Namespace) -> list[str]:
    """The budget rules of this run, as Markdown bullets."""
    budget = f"at most {args.fit_minutes:g} min of training wall time" if args.fit_minutes else "no time limit"
    epochs = f"--max-epochs {args.max_epochs}" if args.max_epochs else "the VqFlow config's max_epochs"
    return [
        f"- Config variant `{args.variant}`; input {args.image_size} px (Anomalib models other than PaDiM, PatchCore, "
        f"CFLOW, STFPM and Fastflow: their own); seeds {args.seeds}.",
        f"- Training budget per model: {budget}, or the epoch cap, whichever ends first. Epoch cap: the "
        f"plugin's models their config's max_epochs; Anomalib's models {epochs}. PaDiM and PatchCore: one pass.",
        f"- PaDiM, PatchCore, CFLOW, STFPM: their defaults on `{args.backbone}` with ImageNet weights "
        f"(Fastflow only builds ResNets and ViTs: `resnet18`); other Anomalib models: their own defaults; "
        f"overrides {BUILTIN_OVERRIDES}, no post-processor.",
        "- Validation split: good training images. The last weights are tested once; metrics from raw scores.",
        f"- Test images of the `--roots` categories: {HALF_RULES[args.test_half]}",
        *(
            [f"- Curve: checkpoints written at epochs {args.curve_epochs}, each tested once after training."]
            if args.curve_epochs
            else []
        ),
    ]


def write_outputs(
    args: argparse.Namespace, results: list[dict[str, Any]], root: Path, grid: list[tuple[str, str]]
) -> str:
    """Write ``results.json``, ``metrics.csv``, ``summary.md`` and the two figures; return the Markdown."""
    output = args.output
    grouped = by_model(results)
    machine = machine_description()
    stored = [{k: v for k, v in result.items() if k != "anomaly_maps"} for result in results]
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "rules": rules(args),
        "anomaly_map_images": [str(Path(image).relative_to(root)) for image, _ in grid],
        "results": stored,
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(results, output / "metrics.csv")
    lines = [f"Command: `{summary['command']}`", "", f"Machine: {machine}", "", "## Rules", "", *rules(args), ""]
    skipped = [result for result in results if "skipped" in result]
    if skipped:
        lines += ["## Not run", ""] + [f"- {r['model']} (seed {r['seed']}): {r['skipped']}" for r in skipped] + [""]
    if grouped:
        plot_image_auroc(grouped, output / "image_auroc_per_category.png")
        plot_anomaly_maps(grouped, grid, output / "anomaly_maps.png")
        lines += ["## Overview (mean over categories, %)", "", *overview_table(grouped), ""]
        for metric in ("image_AUROC", "pixel_AUROC", "AUPRO"):
            lines += [f"## {metric} per category (%)", "", *metric_table(grouped, metric), ""]
        if args.curve_epochs:
            lines += write_curve(grouped, output)
        lines += ["## Every model's full table (first seed)", ""]
        for label, runs in grouped.items():
            table = MetricsTable(rows=runs[0]["table"]["rows"], fpr_limit=runs[0]["table"]["fpr_limit"])
            lines += [f"### {label}", "", table.to_markdown(), ""]
    markdown = "\n".join(lines)
    (output / "summary.md").write_text(markdown)
    return markdown


def main() -> int:
    """Parse the arguments, run every model and seed, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--categories", nargs="*", default=None, help="restrict to these categories")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model names, each optionally name:arg=v")
    parser.add_argument("--variant", choices=["cpu", "paper"], default="cpu", help="plugin config variant")
    parser.add_argument("--max-epochs", type=int, default=None, help="epoch cap for every model")
    parser.add_argument("--fit-minutes", type=float, default=3.0, help="training wall-time budget per model; 0: none")
    parser.add_argument("--image-size", type=int, default=256, help="input size of Anomalib's models")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="backbone of Anomalib's models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[9826])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/unified"))
    parser.add_argument(
        "--curve-epochs", type=int, nargs="*", default=[], help="also test the checkpoints written at these epochs"
    )
    parser.add_argument(
        "--test-half",
        choices=["all", *TEST_HALVES],
        default="all",
        help="test the --roots categories on one fixed half of their test images (see halved_root)",
    )
    args = parser.parse_args()
    for entry in args.models:
        parse_model_entry(entry)

    roots = data_roots(parser, args)
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if args.test_half != "all":
            halves = {
                root: halved_root(root, args.test_half, Path(folder) / f"half_{i}") for i, root in enumerate(args.roots)
            }
            roots = [halves.get(root, root) for root in roots]
        root = combined_root(roots, args.categories, Path(folder) / "unified")
        grid = grid_samples(root)
        for seed in args.seeds:
            for entry in args.models:
                settings = RunSettings(
                    entry=entry,
                    variant=args.variant,
                    root=root,
                    runs=args.output / "runs",
                    seed=seed,
                    max_epochs=args.max_epochs,
                    fit_minutes=args.fit_minutes,
                    image_size=args.image_size,
                    backbone=args.backbone,
                    grid_images=[image for image, _ in grid],
                    curve_epochs=args.curve_epochs,
                )
                print(f"Running {entry} with seed {seed}: {asdict(settings)}", flush=True)
                results.append(run_in_fresh_process(settings))
        markdown = write_outputs(args, results, root, grid)
    print(markdown)
    return 0


def machine_description() -> str:
    """Processor, threads, torch version and GPU, if any."""
    processor = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{processor}, {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}"


if __name__ == "__main__":
    sys.exit(main())
