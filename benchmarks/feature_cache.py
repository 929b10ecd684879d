"""Epoch time with and without the frozen-feature cache, and its size per 1,000 images, for every plugin model.

Each model is built from its ``_cpu`` config (256 px) and trained ``--epochs`` epochs on the
training images of ``--root`` (every category found), once with ``feature_cache=False`` and
once with the default cache, in the same process, with the config's batch size and loader
workers. Reported: the cache's fill pass, the mean time of the training epochs (validation
included, as Lightning runs it), and the bytes the cache holds per image.

    python benchmarks/feature_cache.py --root ../shared/data --output benchmarks/results/feature_cache
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.data import MultiClassMVTecAD

MODELS = ("ms_flow", "vq_flow", "hgad", "uni_ad")


class EpochTimer(Callback):
    """Wall time of every training epoch, validation included, and of the start of training (the cache's fill)."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.fill_seconds = 0.0
        self._start = 0.0

    def on_fit_start(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, *_: Any) -> None:
        now = time.perf_counter()
        if not self.epochs:
            self.fill_seconds = now - self._start
        self._start = now

    def on_train_epoch_end(self, *_: Any) -> None:
        self.epochs.append(time.perf_counter() - self._start)


def run(name: str, root: Path, epochs: int, cache: bool, folder: Path) -> dict[str, Any]:
    """Train one model ``epochs`` epochs with or without the cache; its timings and cache size."""
    seed_everything(9826)
    model, data, trainer_settings = build_from_config(config_path(name), {"visualizer": False, "feature_cache": cache})
    datamodule = MultiClassMVTecAD(
        root=root,
        train_batch_size=data.train_batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        seed=9826,
    )
    timer = EpochTimer()
    trainer_settings["max_epochs"] = epochs
    sizes = []

    class CacheSize(Callback):
        def on_train_epoch_end(self, _trainer: Any, module: Any) -> None:
            if module.feature_store is not None:
                store = module.feature_store
                sizes.append((store.bytes_in_memory + store.bytes_on_disk) / len(store))

    engine = Engine(
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        callbacks=[timer, CacheSize()],
        **trainer_settings,
    )
    engine.fit(model=model, datamodule=datamodule)
    return {
        "model": name,
        "cache": cache,
        "train_images": len(datamodule.train_data),
        "fill_seconds": round(timer.fill_seconds, 1),
        "epoch_seconds": [round(seconds, 1) for seconds in timer.epochs],
        "mean_epoch_seconds": round(sum(timer.epochs) / len(timer.epochs), 1),
        "cache_mib_per_1000_images": round(sizes[-1] * 1000 / 2**20, 1) if sizes else None,
    }


def main() -> int:
    """Run every model with and without the cache and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec-layout folder of categories")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/feature_cache"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for cache in (False, True):
                results.append(run(name, args.root, args.epochs, cache, Path(folder) / f"{name}_{cache}"))
                print(results[-1], flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine}; {results[0]['train_images']} training images at 256 px, `_cpu` configs.",
        "",
        "| model | epoch s, uncached | fill pass s | epoch s, cached | speed-up | cache MiB per 1,000 images |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for name in args.models:
        uncached, cached = (next(r for r in results if r["model"] == name and r["cache"] is c) for c in (False, True))
        lines.append(
            f"| {name} | {uncached['mean_epoch_seconds']} | {cached['fill_seconds']} | {cached['mean_epoch_seconds']} "
            f"| {uncached['mean_epoch_seconds'] / cached['mean_epoch_seconds']:.1f}x "
            f"| {cached['cache_mib_per_1000_images']} |"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "feature_cache.json").write_text(json.dumps({"command": sys.argv, "results": results}, indent=2))
    (args.output / "feature_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
