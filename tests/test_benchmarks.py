"""The unified benchmark command: plugin and Anomalib models side by side, unavailable ones listed, all outputs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from unified import by_model, halved_root, metric_table, overview_table, parse_model_entry  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("VqFlow", ("vqflow", {})),
        ("vq_flow", ("vqflow", {})),
        ("Patchcore:coreset_sampling_ratio=0.05", ("patchcore", {"coreset_sampling_ratio": 0.05})),
        ("hgad:labels=dataset,num_components=5", ("hgad", {"labels": "dataset", "num_components": 5})),
        ("Dinomaly", ("dinomaly", {})),
        ("inp_former", ("inpformer", {})),
        ("EfficientAd:model_size=m", ("efficientad", {"model_size": "m"})),
    ],
)
def test_model_entries(entry: str, expected: tuple) -> None:
    assert parse_model_entry(entry) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [("Efficientadd", "Unknown model 'Efficientadd'"), ("ai_vad", "Unknown model 'ai_vad'"), ("Padim:n", "n")],
)
def test_bad_model_entries_are_named(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_entry(entry)


def _fake_run(model: str, seed: int, brick: float, coffee: float, fit_seconds: float) -> dict:
    rows = {"brick": brick, "coffee": coffee, "mean": (brick + coffee) / 2, "pooled": 0.5}
    columns = ("image_AUROC", "pixel_AUROC", "AUPRO", "image_AP", "pixel_AP", "image_F1max", "pixel_F1max")
    table = {"fpr_limit": 0.3, "rows": {row: dict.fromkeys(columns, value) for row, value in rows.items()}}
    costs = {"epochs_trained": 2.0, "fit_seconds": fit_seconds, "test_images_per_second": 10.0, "peak_rss_mib": 100.0}
    return {"model": model, "seed": seed, "table": table, **costs}


def test_several_seeds_give_mean_and_sample_spread() -> None:
    runs = [
        _fake_run("VqFlow", 1, 0.90, 0.80, 100.0),
        {"model": "Fastflow", "seed": 1, "skipped": "no weights"},
        _fake_run("VqFlow", 2, 0.94, 0.84, 120.0),
    ]
    grouped = by_model(runs)
    assert list(grouped) == ["VqFlow"]
    # brick: mean of 90 and 94 = 92.0, sample standard deviation 2.83; mean row: 85 and 89 -> 87.0 +- 2.8.
    assert "| brick | 92.0 ± 2.8 |" in metric_table(grouped, "image_AUROC")
    assert "| **mean** | 87.0 ± 2.8 |" in metric_table(grouped, "image_AUROC")
    (row,) = overview_table(grouped)[2:]
    assert row.startswith("| VqFlow | 87.0 ± 2.8 |")
    assert row.endswith("| 2.0 | 110 | 10.0 | 100 |")


def test_unified_benchmark_compares_plugin_and_anomalib_models(demo_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "benchmark"
    command = [sys.executable, str(BENCHMARKS / "unified.py"), "--roots", str(demo_root)]
    command += ["--models", "MsFlow", "Padim", "Fastflow", "Dinomaly", "--max-epochs", "2", "--fit-minutes", "0"]
    command += ["--curve-epochs", "1"]
    command += ["--image-size", "64", "--output", str(output)]
    # Offline, with an empty Hub cache: Padim gets the packaged lite0 weights; Fastflow's ResNet-18 and Dinomaly's
    # DINOv2 are unavailable.
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((output / "results.json").read_text())
    runs = {run["model"]: run for run in summary["results"]}
    assert set(runs) == {"MsFlow", "Padim", "Fastflow", "Dinomaly"}
    assert "resnet18" in runs["Fastflow"]["skipped"]
    assert "Dinomaly needs the pretrained weights of" in runs["Dinomaly"]["skipped"]
    assert "vit_base_patch14_reg4_dinov2" in runs["Dinomaly"]["skipped"]
    assert "table" not in runs["Fastflow"]
    assert "table" not in runs["Dinomaly"]
    for name in ("MsFlow", "Padim"):
        run = runs[name]
        assert set(run["table"]["rows"]) == {"brick", "coffee", "mean", "pooled"}
        # 2 x 3 good and 2 x 4 defective test images; validation comes from the 2 x 8 good training images.
        assert run["test_images"] == 14
        assert run["train_images"] + run["validation_images"] == 16
        assert run["fit_seconds"] > 0
        assert run["peak_rss_mib"] > 0
    assert runs["MsFlow"]["config"] == "configs/model/ms_flow_cpu.yaml"
    assert runs["Padim"]["backbone"] == "tf_efficientnet_lite0"
    assert summary["anomaly_map_images"] == ["brick/test/hole/000.png", "coffee/test/hole/000.png"]

    with (output / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["category"]) for row in rows] == [
        (model, category) for model in ("MsFlow", "Padim") for category in ("brick", "coffee", "mean", "pooled")
    ]
    mean = {row["model"]: row for row in rows if row["category"] == "mean"}
    brick = {row["model"]: row for row in rows if row["category"] == "brick"}
    coffee = {row["model"]: row for row in rows if row["category"] == "coffee"}
    for model in ("MsFlow", "Padim"):
        expected = (float(brick[model]["image_AUROC"]) + float(coffee[model]["image_AUROC"])) / 2
        assert float(mean[model]["image_AUROC"]) == pytest.approx(expected)

    # The curve: MsFlow's checkpoint of epoch 1 tested after training, then its last weights; PaDiM's one pass.
    with (output / "curve.csv").open() as file:
        curve = list(csv.DictReader(file))
    assert [(row["model"], float(row["epoch"])) for row in curve] == [("MsFlow", 1.0), ("MsFlow", 2.0), ("Padim", 1.0)]
    assert float(curve[0]["fit_minutes"]) < float(curve[1]["fit_minutes"])
    assert float(curve[1]["mean_image_AUROC"]) == pytest.approx(float(mean["MsFlow"]["image_AUROC"]))
    assert curve[0]["magnetic_tile_image_AUROC"] == ""  # no such category here

    markdown = (output / "summary.md").read_text()
    assert "## Quality against training time (%)" in markdown
    assert "## Rules" in markdown
    assert "Fastflow (seed 9826)" in markdown
    assert "Dinomaly (seed 9826)" in markdown
    assert "| Padim |" in markdown
    with Image.open(output / "anomaly_maps.png") as grid, Image.open(output / "image_auroc_per_category.png") as bars:
        assert grid.width > grid.height > 0
        assert bars.width > 0
    with Image.open(output / "curve.png") as figure:
        assert figure.width > figure.height > 0


def test_test_halves_split_every_label_folder_by_file_name(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for label, count in (("good", 3), ("crack", 4)):
        (root / "tile" / "test" / label).mkdir(parents=True)
        for index in range(count):
            (root / "tile" / "test" / label / f"{index:03d}.png").write_bytes(b"")
    (root / "tile" / "train" / "good").mkdir(parents=True)
    (root / "tile" / "ground_truth").mkdir()
    halves = {half: halved_root(root, half, tmp_path / half) for half in ("dev", "report")}
    names = {
        half: sorted(
            str(path.relative_to(folder / "tile" / "test")) for path in (folder / "tile" / "test").rglob("*.png")
        )
        for half, folder in halves.items()
    }
    assert names["dev"] == ["crack/000.png", "crack/002.png", "good/000.png", "good/002.png"]
    assert names["report"] == ["crack/001.png", "crack/003.png", "good/001.png"]
    assert (halves["report"] / "tile" / "train" / "good").is_dir()
    assert (halves["report"] / "tile" / "ground_truth").is_dir()
    with pytest.raises(ValueError, match="half must be one of"):
        halved_root(root, "other", tmp_path / "other")


def test_model_that_takes_no_evaluator_is_refused_with_its_name() -> None:
    from baselines import BaselineUnavailableError, build_baseline

    with pytest.raises(BaselineUnavailableError, match=r"VlmAd takes no \['evaluator', 'post_processor'\]"):
        build_baseline("vlmad", evaluator=None, post_processor=False)
