"""Scoring and training choices of the flow models, measured on development data only.

The development data: the demo categories generated with another ``--generator-seed`` than the
reported benchmark's, plus the *development half* of every real category's test set (the
even-numbered files of ``test/<label>/``; see :func:`halved_root`). The other half of the
real categories and the default demo images are what the README reports, and no setting is
chosen on them.

One model is trained per entry (``name:argument=value`` overrides, as in ``unified.py``); its
raw latents on the development test images are then scored in several ways, from the same
weights, so that the scoring choices compare without retraining:

- ``paper``: MSFlow's scoring (top-k of the per-image normalised multiplicative map as the
  image score, the additive map as the anomaly map);
- ``channel-mean nll top<k>``: the negative log-likelihood per scale as the *mean* of
  ``0.5 z^2`` over channels, summed over scales, no per-image normalisation, image score
  the mean of its top ``k`` share of pixels;
- ``nll top<k>``: the same with the *sum* over channels (the Gaussian log-density of the
  position; ``anomaly_map_mode="nll"``'s image score); ``max``: one pixel; ``without finest scale``: the
  finest scale left out;
- ``nll standardised per scale``: per scale ``(sum_c z^2 - C) / sqrt(2 C)``, summed over
  scales (``anomaly_map_mode="nll"``'s anomaly map before the cells were centred; its image
  score is ``nll top3%``);
- ``nll, cells centred``: ``anomaly_map_mode="nll"`` as the models score now: the sum's top-k mean
  (the model's ``top_k``) and the standardised map, every scale upsampled with its cells where they are in the image
  (:func:`~anomalib_vqflow.components.scoring.cell_centred_upsample`; the rows above upsample
  with MSFlow's ``align_corners=True``);
- ``position z`` / ``position shift``: that map standardised per pixel position, ``(nll - mean_p) / std_p``,
  or only shifted, ``nll - mean_p``, with the statistics of the good *training* images
  (PaDiM's per-position view on top of the flow); ``prototype position z``: the same per
  VQ-Flow prototype (positions of a prototype with fewer than 8 training images use all images).

HGAD (``--models Hgad``) is scored by :func:`hgad_terms` instead: its own score and its two
factors (likelihood under the image's component, entropy over components) apart.
``--rescore FILES --variants NAMES`` measures only the named variants of saved records.

Example::

    python benchmarks/development_study.py --roots ../shared/data --models vq_flow ms_flow --max-epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import build_from_config, config_path
from anomalib_vqflow.components.scoring import (
    AnomalyMapGenerator,
    joint_log_likelihood,
    log_likelihood_maps,
    negative_log_likelihood_maps,
    standardised_scale_maps,
    top_k_mean,
)
from anomalib_vqflow.data import DemoMultiClass, MultiClassMVTecAD, default_demo_root
from anomalib_vqflow.data.dataset import MultiClassDataset
from anomalib_vqflow.evaluation.metrics import auroc
from anomalib_vqflow.evaluation.pixel import aupro
from anomalib_vqflow.models import Hgad
from anomalib_vqflow.models.hgad.anomaly_map import anomaly_from_normality

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


Record = tuple[str, int, list[torch.Tensor], torch.Tensor, int]


def preprocessed_items(model: Any, dataset: MultiClassDataset) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Every item of ``dataset`` with its pre-processed image ``(1, 3, H, W)`` and its mask at that size."""
    transform = model.pre_processor.transform
    for index in range(len(dataset)):
        item = dataset[index]
        image = transform(item.image.unsqueeze(0))
        mask = (
            torch.zeros(image.shape[-2:], dtype=torch.bool)
            if item.gt_mask is None
            else F.interpolate(item.gt_mask[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0] > 0.5
        )
        yield item, image, mask


@torch.no_grad()
def latents_and_masks(model: Any, dataset: MultiClassDataset) -> list[Record]:
    """Per image: category, label, fused latents, the mask at the model's input size and the prototype (or 0)."""
    model.eval()
    records = []
    for item, image, mask in preprocessed_items(model, dataset):
        encoding = model.model.encode(image)
        prototype = int(encoding.prototypes[0]) if hasattr(encoding, "prototypes") else 0
        records.append((item.category, int(item.gt_label), [latent.float() for latent in encoding[0]], mask, prototype))
    return records


def nll_map(latents: list[torch.Tensor], size: tuple[int, int], channel_mean: bool = False) -> torch.Tensor:
    """The unnormalised negative log-likelihood map ``(H, W)`` of one image, summed over scales."""
    return -joint_log_likelihood(log_likelihood_maps(latents, channel_mean=channel_mean), size)[0, 0]


def _moments(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(maps).double()
    return stacked.mean(dim=0).float(), stacked.std(dim=0).clamp_min(1e-3).float()


MIN_PROTOTYPE_IMAGES = 8


def position_statistics(records: list[Record]) -> dict[Any, tuple[torch.Tensor, torch.Tensor]]:
    """Per-position mean and std of the nll map over good images: key ``None`` for all, else per prototype."""
    maps: dict[Any, list[torch.Tensor]] = {None: []}
    for _, _, latents, mask, prototype in records:
        nll = nll_map(latents, tuple(mask.shape))
        maps[None].append(nll)
        maps.setdefault(prototype, []).append(nll)
    return {key: _moments(values) for key, values in maps.items() if key is None or len(values) >= MIN_PROTOTYPE_IMAGES}


def scorings(
    top_k: float,
    latents: list[torch.Tensor],
    size: tuple[int, int],
    prototype: int,
    statistics: dict[Any, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[float, torch.Tensor]]:
    """Every scoring variant of one image: name -> (image score, anomaly map ``(H, W)``)."""
    paper_score, paper_map = AnomalyMapGenerator(top_k=top_k, mode="add")(latents, size)
    results = {"paper": (float(paper_score[0]), paper_map[0, 0])}
    channel_mean = nll_map(latents, size, channel_mean=True)
    results["channel-mean nll top3%"] = (float(top_k_mean(channel_mean[None, None], 0.03)[0]), channel_mean)
    nll = nll_map(latents, size)
    for name, share in IMAGE_SCORE_SHARES.items():
        score = nll.amax() if share == 0.0 else top_k_mean(nll[None, None], share)[0]
        results[f"nll {name}"] = (float(score), nll)
    coarse = nll_map(latents[1:], size)
    results["nll without finest scale top3%"] = (float(top_k_mean(coarse[None, None], 0.03)[0]), coarse)
    scale_maps = standardised_scale_maps(negative_log_likelihood_maps(latents), [z.shape[1] for z in latents])
    standardised = joint_log_likelihood(scale_maps, size)[0, 0]
    results["nll standardised per scale top3%"] = (float(top_k_mean(standardised[None, None], 0.03)[0]), standardised)
    centred_score, centred_map = AnomalyMapGenerator(top_k=top_k, mode="nll")(latents, size)
    results["nll, cells centred (anomaly_map_mode=nll)"] = (float(centred_score[0]), centred_map[0, 0])
    variants = {}
    if statistics:
        mean, std = statistics[None]
        variants = {"position z": (nll - mean) / std, "position shift": nll - mean}
        if len(statistics) > 2:
            own_mean, own_std = statistics.get(prototype, statistics[None])
            variants["prototype position z"] = (nll - own_mean) / own_std
    for name, anomaly_map in variants.items():
        results[f"{name} top3%"] = (float(top_k_mean(anomaly_map[None, None], 0.03)[0]), anomaly_map)
    return results


ScoredImage = tuple[str, int, torch.Tensor, dict[str, tuple[float, torch.Tensor]]]


def metrics_table(images: Iterable[ScoredImage], only: list[str] | None = None) -> dict[str, Any]:
    """Per variant and category, and their mean: image AUROC, pixel AUROC and AUPRO.

    ``images``: per test image its category, label, mask and ``{variant: (image score, anomaly map)}``;
    ``only``: the variants to measure (default: all).
    """
    per_category: dict[str, dict[str, dict[str, list]]] = {}
    for category, label, mask, variants in images:
        for name, (score, anomaly_map) in variants.items():
            if only is not None and name not in only:
                continue
            entry = per_category.setdefault(name, {}).setdefault(category, {"s": [], "l": [], "m": [], "g": []})
            entry["s"].append(score)
            entry["l"].append(label)
            entry["m"].append(anomaly_map)
            entry["g"].append(mask)
    table: dict[str, Any] = {}
    for name, categories in per_category.items():
        rows = {}
        for category, entry in categories.items():
            rows[category] = {
                "image_AUROC": auroc(entry["s"], entry["l"]),
                "pixel_AUROC": auroc(torch.stack(entry["m"]).numpy(), torch.stack(entry["g"]).numpy()),
                "AUPRO": aupro(torch.stack(entry["m"]).numpy(), torch.stack(entry["g"]).numpy()),
            }
        rows["mean"] = {
            metric: sum(r[metric] for r in rows.values()) / len(rows) for metric in next(iter(rows.values()))
        }
        table[name] = rows
    return table


def evaluate(
    top_k: float, records: list[Record], statistics: dict[Any, Any] | None = None, only: list[str] | None = None
) -> dict[str, Any]:
    """:func:`metrics_table` of the flow scoring variants (``statistics``: :func:`position_statistics`).

    ``top_k``: the model's share of pixels for MSFlow's image score.
    """
    return metrics_table(
        (
            (category, label, mask, scorings(top_k, latents, tuple(mask.shape), prototype, statistics or {}))
            for category, label, latents, mask, prototype in records
        ),
        only,
    )


@torch.no_grad()
def hgad_terms(model: Any, dataset: MultiClassDataset) -> Iterator[ScoredImage]:
    """HGAD's score and its two factors apart, per test image, from the same weights.

    ``paper``: the model's own score (likelihood map times entropy map, smoothed, maximum);
    ``likelihood term only`` / ``entropy term only``: one factor, smoothed, its maximum; ``nll top3%``:
    the negative log-likelihood under the image's component, summed over the levels without
    the references' saturation, the top 3% of its pixels.
    """
    model.eval()
    generator = model.model.anomaly_map_generator
    for item, image, mask in preprocessed_items(model, dataset):
        size = tuple(mask.shape)
        log_likelihoods, negative_entropies = model.model.score_maps(model.model.encode(image))
        score, anomaly_map = generator(log_likelihoods, negative_entropies, size)
        variants = {"paper: likelihood x entropy": (float(score[0]), anomaly_map[0, 0])}
        factors = {
            "likelihood term only": (log_likelihoods, generator.reference_log_likelihood),
            "entropy term only": (negative_entropies, generator.reference_negative_entropy),
        }
        for name, (maps, references) in factors.items():
            factor = generator.blur(anomaly_from_normality(maps, references, generator.map_size))
            factor = F.interpolate(factor, size=size, mode="bilinear", align_corners=False)[0, 0]
            variants[name] = (float(factor.amax()), factor)
        nll = -joint_log_likelihood([level * model.model.channels for level in log_likelihoods], size)
        variants["nll top3%"] = (float(top_k_mean(nll, 0.03)[0]), nll[0, 0])
        yield item.category, int(item.gt_label), mask, variants


def score_test_images(model: Any, dataset: MultiClassDataset) -> dict[str, Any]:
    """The development table of a flow model (:func:`evaluate`) or of HGAD (:func:`hgad_terms`)."""
    if isinstance(model, Hgad):
        return metrics_table(hgad_terms(model, dataset))
    return evaluate(model.model.anomaly_map_generator.top_k, latents_and_masks(model, dataset))


def scoring_callback(datamodule: MultiClassMVTecAD, epochs: list[int], tables: dict[int, Any]) -> Any:
    """A callback that scores the development test images at the end of each of ``epochs`` (into ``tables``)."""
    from lightning.pytorch import Callback

    class _Score(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            epoch = trainer.current_epoch + 1
            if epoch in epochs and epoch < trainer.max_epochs:
                tables[epoch] = score_test_images(module, datamodule.test_data)
                module.train()

    return _Score()


def run(
    entry: str,
    root: Path,
    max_epochs: int | None,
    seed: int,
    folder: Path,
    eval_epochs: list[int],
    records_file: Path | None = None,
) -> dict[str, Any]:
    """Train one entry on the development training images and score its development test images.

    ``records_file``: where to save the last weights' training and test records (:func:`latents_and_masks`).
    """
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
    if isinstance(model, Hgad):
        tables[trainer_settings["max_epochs"]] = score_test_images(model, datamodule.test_data)
        return {"entry": entry, "fit_seconds": round(fit_seconds, 1), "tables": tables}
    train_records = latents_and_masks(model, datamodule.train_data)
    test_records = latents_and_masks(model, datamodule.test_data)
    if records_file is not None:
        top_k = model.model.anomaly_map_generator.top_k
        torch.save({"top_k": top_k, "train": train_records, "test": test_records}, records_file)
    statistics = position_statistics(train_records)
    tables[trainer_settings["max_epochs"]] = evaluate(model.model.anomaly_map_generator.top_k, test_records, statistics)
    return {"entry": entry, "fit_seconds": round(fit_seconds, 1), "tables": tables}


def print_tables(entry: str, result: dict[str, Any]) -> None:
    """One markdown table of image / pixel AUROC per scored epoch."""
    print(f"\n{entry}: fit {result.get('fit_seconds')} s; image AUROC / pixel AUROC / AUPRO (%)")
    for epoch, table in sorted(result["tables"].items()):
        categories = [c for c in next(iter(table.values())) if c != "mean"]
        print(f"\nepoch {epoch}\n\n| scoring | " + " | ".join([*categories, "mean"]) + " |")
        print("|:---|" + "---:|" * (len(categories) + 1))
        for name, rows in table.items():
            cells = [" / ".join(f"{100 * value:.1f}" for value in rows[c].values()) for c in rows]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


POSITION_VARIANTS = ("position z top3%", "position shift top3%", "prototype position z top3%")


def rescore(records_file: Path, only: list[str] | None = None) -> dict[str, Any]:
    """Score the records a ``--records`` run saved (the last weights) without training again.

    ``only``: the variants to measure (default: all); the per-position statistics are fitted only for theirs.
    """
    saved = torch.load(records_file, weights_only=False)
    needs_statistics = only is None or any(name in POSITION_VARIANTS for name in only)
    statistics = position_statistics(saved["train"]) if needs_statistics else None
    table = evaluate(saved["top_k"], saved["test"], statistics, only)
    return {"entry": str(records_file), "tables": {"last": table}}


def main() -> int:
    """Run every entry (or rescore saved records) and print one table per entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", type=Path, nargs="*", default=[], help="MVTec-layout folders of real categories")
    parser.add_argument("--models", nargs="+", default=["VqFlow", "MsFlow"])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--eval-epochs", type=int, nargs="*", default=[], help="also score after these epochs")
    parser.add_argument("--seed", type=int, default=9826)
    parser.add_argument("--generator-seed", type=int, default=1, help="seed of the development demo images")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--records", type=Path, default=None, help="save the last records here (one entry)")
    parser.add_argument("--rescore", type=Path, nargs="*", default=[], help="score saved records, train nothing")
    parser.add_argument("--variants", nargs="*", default=None, help="with --rescore: measure only these variants")
    args = parser.parse_args()

    results = [rescore(records_file, args.variants) for records_file in args.rescore]
    if not args.rescore:
        with tempfile.TemporaryDirectory() as folder:
            root = development_root(args.roots, args.generator_seed, Path(folder))
            for entry in args.models:
                runs = Path(folder) / "runs"
                results.append(run(entry, root, args.max_epochs, args.seed, runs, args.eval_epochs, args.records))
    for result in results:
        print_tables(result["entry"], result)
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
