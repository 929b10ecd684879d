"""Scoring and training choices of the flow models, measured on development data only.

The development data: the demo categories generated with another ``--generator-seed`` than the
reported benchmark's, plus the *development half* of every real category's test set (the
even-numbered files of ``test/<label>/``; see :func:`halved_root`). The other half of the
real categories and the default demo images are what the README reports, and no setting is
chosen on them.

One model is trained per entry (``name:argument=value`` overrides, as in ``unified.py``); its
raw latents on the development test images are then scored in several ways, from the same
weights, so that the scoring choices compare without retraining:

- ``paper``: the model's own scoring (MSFlow's per-image normalised maps, top-k image score);
- ``nll top<k>``: the negative log-likelihood summed over scales with *no* per-image
  normalisation, image score the mean of its top ``k`` share of pixels (``max``: one pixel).

Example::

    python benchmarks/development_study.py --roots ../shared/data --models vq_flow ms_flow --max-epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.components.scoring import joint_log_likelihood, log_likelihood_maps, top_k_mean
from anomalib_vqflow.data import DemoMultiClass, MultiClassMVTecAD, default_demo_root
from anomalib_vqflow.data.multiclass import MultiClassDataset
from anomalib_vqflow.evaluation.metrics import auroc

sys.path.insert(0, str(Path(__file__).parent))
from unified import PLUGIN_MODELS, combined_root, halved_root, parse_model_entry

IMAGE_SCORE_SHARES = {"top3%": 0.03, "top1%": 0.01, "top0.1%": 0.001, "max": 0.0}


def development_root(roots: list[Path], generator_seed: int, folder: Path) -> Path:
    """The development demo copy and the development half of every real category, side by side in ``folder``."""
    demo = DemoMultiClass(
        root=default_demo_root().with_name(f"demo_dev_{generator_seed}"), generator_seed=generator_seed
    )
    demo.prepare_data()
    halves = [halved_root(root, "dev", folder / f"dev_half_{index}") for index, root in enumerate(roots)]
    return combined_root([demo.root, *halves], None, folder / "development")


@torch.no_grad()
def latents_and_masks(
    model: Any, dataset: MultiClassDataset
) -> list[tuple[str, int, list[torch.Tensor], torch.Tensor]]:
    """Per test image: category, label, fused latents and the mask at the model's input size."""
    model.eval()
    transform = model.pre_processor.transform
    records = []
    for index in range(len(dataset)):
        item = dataset[index]
        image = transform(item.image.unsqueeze(0))
        encoding = model.model.encode(image)
        latents = encoding[0] if isinstance(encoding, tuple) else encoding.latents
        mask = F.interpolate(item.gt_mask[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0] > 0.5
        records.append((item.category, int(item.gt_label), [latent.float() for latent in latents], mask))
    return records


def scorings(model: Any, latents: list[torch.Tensor], size: tuple[int, int]) -> dict[str, tuple[float, torch.Tensor]]:
    """Every scoring variant of one image: name -> (image score, anomaly map ``(H, W)``)."""
    generator = model.model.anomaly_map_generator
    paper_score, paper_map = generator(latents, size)
    results = {"paper": (float(paper_score[0]), paper_map[0, 0])}
    nll = -joint_log_likelihood(log_likelihood_maps(latents), size)
    for name, share in IMAGE_SCORE_SHARES.items():
        score = nll.amax() if share == 0.0 else top_k_mean(nll, share)[0]
        results[f"nll {name}"] = (float(score), nll[0, 0])
    return results


def evaluate(model: Any, records: list[tuple[str, int, list[torch.Tensor], torch.Tensor]]) -> dict[str, Any]:
    """Per category and variant: image and pixel AUROC."""
    per_category: dict[str, dict[str, dict[str, list]]] = {}
    for category, label, latents, mask in records:
        for name, (score, anomaly_map) in scorings(model, latents, tuple(mask.shape)).items():
            entry = per_category.setdefault(name, {}).setdefault(category, {"s": [], "l": [], "m": [], "g": []})
            entry["s"].append(score)
            entry["l"].append(label)
            entry["m"].append(anomaly_map.flatten())
            entry["g"].append(mask.flatten())
    table: dict[str, Any] = {}
    for name, categories in per_category.items():
        rows = {}
        for category, entry in categories.items():
            rows[category] = {
                "image_AUROC": auroc(entry["s"], entry["l"]),
                "pixel_AUROC": auroc(torch.cat(entry["m"]).numpy(), torch.cat(entry["g"]).numpy()),
            }
        rows["mean"] = {
            metric: sum(r[metric] for r in rows.values()) / len(rows) for metric in next(iter(rows.values()))
        }
        table[name] = rows
    return table


def scoring_callback(datamodule: MultiClassMVTecAD, epochs: list[int], tables: dict[int, Any]) -> Any:
    """A callback that scores the development test images at the end of each of ``epochs`` (into ``tables``)."""
    from lightning.pytorch import Callback

    class _Score(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            epoch = trainer.current_epoch + 1
            if epoch in epochs and epoch < trainer.max_epochs:
                tables[epoch] = evaluate(module, latents_and_masks(module, datamodule.test_data))
                module.train()

    return _Score()


def run(
    entry: str, root: Path, max_epochs: int | None, seed: int, folder: Path, eval_epochs: list[int]
) -> dict[str, Any]:
    """Train one entry on the development training images and score its development test images."""
    key, overrides = parse_model_entry(entry)
    seed_everything(seed)
    model, data, trainer_settings = build_from_config(
        config_path(PLUGIN_MODELS[key]), {"visualizer": False, **overrides}
    )
    if max_epochs is not None:
        trainer_settings["max_epochs"] = max_epochs
    datamodule = MultiClassMVTecAD(
        root=root,
        train_batch_size=data.train_batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        seed=seed,
    )
    datamodule.setup()
    tables: dict[int, Any] = {}
    engine = Engine(
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        callbacks=[scoring_callback(datamodule, eval_epochs, tables)],
        **trainer_settings,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    tables[trainer_settings["max_epochs"]] = evaluate(model, latents_and_masks(model, datamodule.test_data))
    return {"entry": entry, "fit_seconds": round(fit_seconds, 1), "tables": tables}


def main() -> int:
    """Run every entry and print one table per entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", type=Path, nargs="*", default=[], help="MVTec-layout folders of real categories")
    parser.add_argument("--models", nargs="+", default=["VqFlow", "MsFlow"])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--eval-epochs", type=int, nargs="*", default=[], help="also score after these epochs")
    parser.add_argument("--seed", type=int, default=9826)
    parser.add_argument("--generator-seed", type=int, default=1, help="seed of the development demo images")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = development_root(args.roots, args.generator_seed, Path(folder))
        for entry in args.models:
            result = run(entry, root, args.max_epochs, args.seed, Path(folder) / "runs", args.eval_epochs)
            results.append(result)
            print(f"\n{entry}: fit {result['fit_seconds']} s; image / pixel AUROC (%)")
            for epoch, table in sorted(result["tables"].items()):
                categories = [c for c in next(iter(table.values())) if c != "mean"]
                print(f"\nepoch {epoch}\n\n| scoring | " + " | ".join([*categories, "mean"]) + " |")
                print("|:---|" + "---:|" * (len(categories) + 1))
                for name, rows in table.items():
                    cells = [f"{100 * rows[c]['image_AUROC']:.1f} / {100 * rows[c]['pixel_AUROC']:.1f}" for c in rows]
                    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
