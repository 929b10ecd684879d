"""What UniAd's score measures, on development data only: reconstruction error or feature energy.

UniAd scores a position by ``||reconstruction - target||``, the L2 norm over the channels of
the backbone features. A reconstruction far from converged (the CPU config trains 8 epochs,
the paper 1,000) errs in proportion to the size of the features, so the score can follow the
*feature energy* of an image (how much texture it has) more than its defects: a defect that
removes texture (a dark pit on a bright, grainy surface) then scores *below* the good parts.
This script trains UniAd once on the development data of ``development_study.py`` (the demo
generated with another seed plus the development half of every real category) and scores the
same reconstructions in several ways, each through UniAd's own map and image score
(bilinear upsampling, box filter, maximum):

- ``error``: the model's score, ``||r - t||``;
- ``feature energy``: ``||t||``, no model at all: how far the score can be had without one;
- ``relative error``: ``||r - t|| / ||t||`` per position;
- ``channel-standardised error``: ``||(r - t) / sigma_c||``, ``sigma_c`` the spread of feature
  channel ``c`` over the good training images;
- ``direction error``: ``||r / ||r|| - t / ||t||||``, a monotone function of the cosine distance.

It also prints, per category, the Spearman correlation between the model's score and the
feature energy over the good test images.

Example::

    python benchmarks/uniad_study.py --roots ../shared/data --max-epochs 8
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
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.data.dataset import MultiClassDataset
from anomalib_vqflow.evaluation.metrics import auroc

sys.path.insert(0, str(Path(__file__).parent))
from development_study import development_root, preprocessed_items
from unified import PLUGIN_MODELS, parse_model_entry

Record = tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]
_EPSILON = 1e-6


@torch.no_grad()
def reconstructions(model: Any, dataset: MultiClassDataset) -> list[Record]:
    """Per image: category, label, reconstruction and target ``(1, C, h, w)``, mask at the input size."""
    model.eval()
    records = []
    for item, image, mask in preprocessed_items(model, dataset):
        target = model.model.features(image)
        records.append((item.category, int(item.gt_label), model.model.reconstruct(target), target, mask))
    return records


def channel_spread(records: list[Record]) -> torch.Tensor:
    """Standard deviation of every feature channel over all positions of the good training images, ``(1, C, 1, 1)``."""
    targets = torch.cat([target.flatten(start_dim=2) for _, _, _, target, _ in records], dim=2)
    return targets.std(dim=2).clamp_min(_EPSILON)[..., None, None]


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(_EPSILON)


def scorings(model: Any, record: Record, spread: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """Every variant of one image, as UniAd's generator scores the pair it is given: name -> (score, map)."""
    _, _, reconstruction, target, mask = record
    size = tuple(mask.shape)
    norm = target.norm(dim=1, keepdim=True).clamp_min(_EPSILON)
    pairs = {
        "error": (reconstruction, target),
        "feature energy": (torch.zeros_like(target), target),
        "relative error": (reconstruction / norm, target / norm),
        "channel-standardised error": (reconstruction / spread, target / spread),
        "direction error": (_unit(reconstruction), _unit(target)),
    }
    results = {}
    for name, (first, second) in pairs.items():
        score, anomaly_map = model.model.anomaly_map_generator(first, second, size)
        results[name] = (float(score[0]), anomaly_map[0, 0])
    return results


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among continuous scores)."""
    a, b = _ranks(first), _ranks(second)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def evaluate(model: Any, records: list[Record], spread: torch.Tensor) -> dict[str, Any]:
    """Per variant and category: image and pixel AUROC; per category the error-energy correlation on good images."""
    collected: dict[str, dict[str, dict[str, list]]] = {}
    for record in records:
        category, label, _, _, mask = record
        for name, (score, anomaly_map) in scorings(model, record, spread).items():
            entry = collected.setdefault(name, {}).setdefault(category, {"s": [], "l": [], "m": [], "g": []})
            entry["s"].append(score)
            entry["l"].append(label)
            entry["m"].append(anomaly_map.flatten())
            entry["g"].append(mask.flatten())
    table: dict[str, Any] = {}
    for name, categories in collected.items():
        rows = {
            category: {
                "image_AUROC": auroc(entry["s"], entry["l"]),
                "pixel_AUROC": auroc(torch.cat(entry["m"]).numpy(), torch.cat(entry["g"]).numpy()),
            }
            for category, entry in categories.items()
        }
        rows["mean"] = {
            metric: sum(r[metric] for r in rows.values()) / len(rows) for metric in ("image_AUROC", "pixel_AUROC")
        }
        table[name] = rows
    correlation = {}
    for category, entry in collected["error"].items():
        good = [index for index, label in enumerate(entry["l"]) if label == 0]
        energy = collected["feature energy"][category]["s"]
        correlation[category] = spearman([entry["s"][i] for i in good], [energy[i] for i in good])
    return {"tables": table, "error_energy_spearman_on_good": correlation}


def main() -> int:
    """Train UniAd on the development data and print one table of the scoring variants."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", type=Path, nargs="*", default=[], help="MVTec-layout folders of real categories")
    parser.add_argument("--model", default="UniAd", help="UniAd, optionally UniAd:argument=value,...")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=9826)
    parser.add_argument("--generator-seed", type=int, default=1, help="seed of the development demo images")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    key, overrides = parse_model_entry(args.model)
    seed_everything(args.seed)
    model, data, trainer_settings = build_from_config(
        config_path(PLUGIN_MODELS[key]), {"visualizer": False, **overrides}
    )
    if args.max_epochs is not None:
        trainer_settings["max_epochs"] = args.max_epochs
    with tempfile.TemporaryDirectory() as folder:
        datamodule = MultiClassMVTecAD(
            root=development_root(args.roots, args.generator_seed, Path(folder)),
            train_batch_size=data.train_batch_size,
            eval_batch_size=data.eval_batch_size,
            num_workers=data.num_workers,
            seed=args.seed,
        )
        datamodule.setup()
        engine = Engine(
            default_root_dir=Path(folder) / "runs", logger=False, enable_progress_bar=False, **trainer_settings
        )
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start
        spread = channel_spread(reconstructions(model, datamodule.train_data))
        result = evaluate(model, reconstructions(model, datamodule.test_data), spread)
    categories = [c for c in next(iter(result["tables"].values())) if c != "mean"]
    print(f"\n{args.model}, {trainer_settings['max_epochs']} epochs, fit {fit_seconds:.0f} s; image / pixel AUROC (%)")
    print("\n| scoring | " + " | ".join([*categories, "mean"]) + " |\n|:---|" + "---:|" * (len(categories) + 1))
    for name, rows in result["tables"].items():
        print(
            f"| {name} | "
            + " | ".join(f"{100 * r['image_AUROC']:.1f} / {100 * r['pixel_AUROC']:.1f}" for r in rows.values())
            + " |"
        )
    print("\nSpearman correlation of the score with the feature energy, good test images:")
    print(", ".join(f"{c} {v:.2f}" for c, v in result["error_energy_spearman_on_good"].items()))
    if args.output:
        record = {"command": " ".join(sys.argv), "fit_seconds": round(fit_seconds, 1), **result}
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
