"""Real-IAD as a unified datamodule: the release's JSON splits, every sample's label and mask, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalib_vqflow.data.realiad import MultiClassRealIAD
from stock_command import ANOMALIB, run_anomalib, small_model_arguments

CATEGORIES = ("audiojack", "toy_brick")
VIEWS = ("C1", "C2")
IMAGE_SIZES = {256: 24, 1024: 32}  # Pixels per side of the fixture's images at each resolution folder.
REQUIRED_COLUMNS = ["path", "split", "label", "image_path", "mask_path", "label_index", "category"]


def write_realiad(root: Path) -> list[dict]:
    """Write a tiny Real-IAD in the release's layout; return the ground truth of every JSON entry.

    Two objects, two camera views, at resolutions 256 and 1024, with the split files of the
    multi-view setting (every view) and of the single-view one (``C1`` only)::

        root/realiad_<256|1024>/<object>/OK/S0001/<object>_0001_OK_C1_20231021.jpg
        root/realiad_<256|1024>/<object>/NG/AK/S0005/<object>_0005_NG_AK_C1_20231021.{jpg,png}
        root/realiad_jsons/realiad_jsons/<object>.json
        root/realiad_jsons/realiad_jsons_sv/<object>.json

    Per object: three good training samples, one good test sample, a pit ("AK") sample whose C2 view has
    no mask (the defect is not visible there: a normal image, as the authors evaluate it), and a scratch
    ("HS") sample with masks in both views. Mask areas differ per sample, so a mixed-up mask shows.
    """
    samples = [(1, "train", "OK"), (2, "train", "OK"), (3, "train", "OK"), (4, "test", "OK")]
    samples += [(5, "test", "AK"), (6, "test", "HS")]
    truth = []
    for number_of_category, category in enumerate(CATEGORIES):
        for number, split, anomaly_class in samples:
            status = "OK" if anomaly_class == "OK" else f"NG_{anomaly_class}"
            folder = f"OK/S{number:04d}" if anomaly_class == "OK" else f"NG/{anomaly_class}/S{number:04d}"
            for view in VIEWS:
                stem = f"{category}_{number:04d}_{status}_{view}_20231021"
                has_mask = anomaly_class != "OK" and not (anomaly_class == "AK" and view == "C2")
                height, width = 2 + number_of_category, number + (view == "C2")
                for resolution, size in IMAGE_SIZES.items():
                    image_folder = root / f"realiad_{resolution}" / category / folder
                    image_folder.mkdir(parents=True, exist_ok=True)
                    value = 40 * number if anomaly_class == "OK" else 200
                    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(image_folder / f"{stem}.jpg")
                    if has_mask:
                        mask = np.zeros((size, size), dtype=np.uint8)
                        mask[2 : 2 + height, 3 : 3 + width] = 255
                        Image.fromarray(mask).save(image_folder / f"{stem}.png")
                abnormal = split == "test" and has_mask
                truth.append(
                    {
                        "category": category,
                        "split": split,
                        "anomaly_class": anomaly_class,
                        "image_path": f"{folder}/{stem}.jpg",
                        "mask_path": f"{folder}/{stem}.png" if has_mask else None,
                        "view": view,
                        "sample_id": f"{category}_{number:04d}_{status}",
                        "label": anomaly_class if abnormal else "good",
                        "label_index": int(abnormal),
                        "mask_sum": height * width if abnormal else 0,
                    }
                )
    for setting, views in (("realiad_jsons", VIEWS), ("realiad_jsons_sv", ("C1",))):
        folder = root / "realiad_jsons" / setting
        folder.mkdir(parents=True)
        for category in CATEGORIES:
            content = {"meta": {"prefix": category, "normal_class": "OK", "pre_transform": None}}
            for split in ("train", "test"):
                content[split] = [
                    {key: entry[key] for key in ("category", "anomaly_class", "image_path", "mask_path")}
                    for entry in truth
                    if entry["category"] == category and entry["split"] == split and entry["view"] in views
                ]
            (folder / f"{category}.json").write_text(json.dumps(content, indent=1))
    return truth


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("realiad") / "Real-IAD"
    return root, write_realiad(root)


@pytest.fixture
def root(pristine: tuple[Path, list[dict]], tmp_path: Path) -> Path:
    """A fresh copy that a test may break."""
    return Path(shutil.copytree(pristine[0], tmp_path / "Real-IAD"))


@pytest.mark.parametrize(("setting", "views"), [("multi_view", VIEWS), ("single_view", ("C1",))])
@pytest.mark.parametrize("resolution", [256, 1024])
def test_every_sample_has_its_category_label_and_mask(
    pristine: tuple[Path, list[dict]], setting: str, views: tuple[str, ...], resolution: int
) -> None:
    root, truth = pristine
    expected = {
        str(root / f"realiad_{resolution}" / entry["category"] / entry["image_path"]): entry
        for entry in truth
        if entry["view"] in views
    }
    datamodule = MultiClassRealIAD(root=root, resolution=resolution, setting=setting, num_workers=0, seed=0)
    assert datamodule.categories == list(CATEGORIES)
    datamodule.setup()

    training = pd.concat([datamodule.train_data.samples, datamodule.val_data.samples])
    assert sorted(training.image_path) == sorted(path for path, e in expected.items() if e["split"] == "train")
    assert (training.label_index == 0).all()
    assert sorted(datamodule.test_data.samples.image_path) == sorted(
        path for path, entry in expected.items() if entry["split"] == "test"
    )
    for index in range(len(datamodule.test_data)):
        item = datamodule.test_data[index]
        entry = expected[item.image_path]
        sample = datamodule.test_data.samples.iloc[index]
        assert (item.category, sample.label) == (entry["category"], entry["label"]), item.image_path
        assert int(item.gt_label) == entry["label_index"], item.image_path
        assert int(item.gt_mask.sum()) == entry["mask_sum"], item.image_path
        assert tuple(item.image.shape) == (3, IMAGE_SIZES[resolution], IMAGE_SIZES[resolution])
        assert (sample.anomaly_class, sample.view, sample.sample_id) == (
            entry["anomaly_class"],
            entry["view"],
            entry["sample_id"],
        )
    assert datamodule.name == f"realiad_{resolution}_{setting}"


def test_sample_table_has_the_unified_columns_first(pristine: tuple[Path, list[dict]]) -> None:
    samples = MultiClassRealIAD(root=pristine[0], resolution=256).category_samples("toy_brick")
    assert list(samples.columns) == [*REQUIRED_COLUMNS, "anomaly_class", "view", "sample_id"]
    assert samples.label_index.dtype.kind == "i"
    assert set(samples.split) == {"train", "test"}
    assert (samples.mask_path[samples.label_index == 0] == "").all()
    assert (samples.path == str(pristine[0] / "realiad_256" / "toy_brick")).all()


def test_categories_all_or_listed(pristine: tuple[Path, list[dict]]) -> None:
    root = pristine[0]
    assert MultiClassRealIAD(root=root).categories == ["audiojack", "toy_brick"]
    datamodule = MultiClassRealIAD(root=root, categories=["toy_brick"], resolution="256", num_workers=0)
    datamodule.setup()
    assert set(datamodule.test_data.samples.category) == {"toy_brick"}


def test_official_readme_layout_without_the_extra_folder(root: Path) -> None:
    """The authors' README puts the split folders directly under the root."""
    for folder in ("realiad_jsons_sv", "realiad_jsons"):
        (root / "realiad_jsons" / folder).rename(root / f"{folder}.tmp")
    (root / "realiad_jsons").rmdir()
    for folder in ("realiad_jsons_sv", "realiad_jsons"):
        (root / f"{folder}.tmp").rename(root / folder)
    for setting in ("multi_view", "single_view"):
        datamodule = MultiClassRealIAD(root=root, setting=setting, resolution=256)
        assert datamodule.categories == list(CATEGORIES)
        assert len(datamodule.category_samples("audiojack")) == (12 if setting == "multi_view" else 6)


def test_fuiad_defective_training_images_are_given_as_normal(root: Path) -> None:
    content = json.loads((root / "realiad_jsons" / "realiad_jsons" / "audiojack.json").read_text())
    noise = [entry for entry in content["test"] if entry["anomaly_class"] == "HS"]
    content["train"] += noise
    content["test"] = [entry for entry in content["test"] if entry not in noise]
    folder = root / "realiad_jsons" / "realiad_jsons_fuiad_0.2"
    folder.mkdir()
    (folder / "audiojack.json").write_text(json.dumps(content))
    datamodule = MultiClassRealIAD(root=root, setting="fuiad_0.2")
    assert datamodule.categories == ["audiojack"]
    samples = datamodule.category_samples("audiojack")
    training = samples[samples.split == "train"]
    assert (training.anomaly_class == "HS").sum() == 2
    assert (training.label == "good").all()
    assert (training.label_index == 0).all()
    assert (training.mask_path == "").all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"resolution": 300}, r"resolution must be one of 256, 512, 1024 or 'raw', not 300"),
        ({"resolution": "full"}, r"resolution must be one of .* not 'full'"),
        ({"setting": "all_view"}, r"setting must be one of \['multi_view', 'single_view', 'fuiad_0.0'"),
    ],
)
def test_bad_resolution_or_setting_names_the_argument(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiClassRealIAD(root="unused", **arguments)


def test_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"Real-IAD root {tmp_path / 'nowhere'} does not exist"):
        MultiClassRealIAD(root=tmp_path / "nowhere").setup()


def test_missing_split_folder_names_it(root: Path) -> None:
    shutil.rmtree(root / "realiad_jsons" / "realiad_jsons_sv")
    folder = root / "realiad_jsons" / "realiad_jsons_sv"
    with pytest.raises(FileNotFoundError, match=f"split folder {folder} is missing"):
        MultiClassRealIAD(root=root, setting="single_view").setup()


def test_missing_split_file_names_it(root: Path) -> None:
    json_file = root / "realiad_jsons" / "realiad_jsons" / "toy_brick.json"
    json_file.unlink()
    datamodule = MultiClassRealIAD(root=root, categories=["toy_brick"])
    with pytest.raises(FileNotFoundError, match=r"Unknown categories \['toy_brick'\].*available: \['audiojack'\]"):
        datamodule.setup()
    with pytest.raises(FileNotFoundError, match=f"{json_file} does not exist"):
        datamodule.category_samples("toy_brick")


def test_unknown_category_lists_the_available_ones(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Unknown categories \['pcb'\].*\['audiojack', 'toy_brick'\]"):
        MultiClassRealIAD(root=root, categories=["audiojack", "pcb"]).setup()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"meta": {}, "train": []}', "has no 'test' list"),
        ("[]", "has no 'train' and no 'test' list"),
        ('{"train": [{"image_path": "x.jpg"}], "test": []}', r"needs 'image_path' and 'anomaly_class'"),
    ],
)
def test_bad_split_file_names_it(root: Path, content: str, message: str) -> None:
    json_file = root / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    json_file.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        MultiClassRealIAD(root=root).setup()
    assert str(json_file) in str(error.value)


def test_missing_image_names_it(root: Path) -> None:
    image = root / "realiad_1024" / "audiojack" / "OK" / "S0002" / "audiojack_0002_OK_C2_20231021.jpg"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"image {image} listed in .*audiojack.json \\(train\\[3\\]\\)"):
        MultiClassRealIAD(root=root).setup()


def test_missing_mask_names_it(root: Path) -> None:
    mask = root / "realiad_256" / "toy_brick" / "NG" / "HS" / "S0006" / "toy_brick_0006_NG_HS_C1_20231021.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=f"mask {mask} of defect image .*does not exist"):
        MultiClassRealIAD(root=root, resolution=256).setup()


def test_path_leaving_the_image_folder_is_refused(root: Path) -> None:
    json_file = root / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    content = json.loads(json_file.read_text())
    content["train"][0]["image_path"] = "../../../realiad_256/audiojack/" + content["train"][0]["image_path"]
    json_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"leaves .*realiad_1024/audiojack: absolute paths and '\.\.' are refused"):
        MultiClassRealIAD(root=root).setup()


def test_corrupt_image_names_the_file(root: Path) -> None:
    corrupt = root / "realiad_256" / "audiojack" / "NG" / "AK" / "S0005" / "audiojack_0005_NG_AK_C1_20231021.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff truncated")
    datamodule = MultiClassRealIAD(root=root, resolution=256, num_workers=0)
    datamodule.setup()
    index = datamodule.test_data.samples.index[datamodule.test_data.samples.image_path == str(corrupt)][0]
    with pytest.raises(ValueError, match=f"Cannot read image file {corrupt}"):
        datamodule.test_data[index]


@pytest.mark.slow
def test_stock_anomalib_command_trains_on_real_iad(pristine: tuple[Path, list[dict]], tmp_path: Path) -> None:
    arguments = [
        ANOMALIB,
        "train",
        "--model",
        "VqFlow",
        *small_model_arguments("VqFlow", size=64),
        "--data",
        "MultiClassRealIAD",
        "--data.root",
        str(pristine[0]),
        "--data.resolution",
        "256",
        "--data.num_workers",
        "0",
        "--data.train_batch_size",
        "4",
        "--trainer.max_steps",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path),
    ]
    result = run_anomalib(arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = tmp_path.rglob("metrics_per_category.csv")
    assert {*CATEGORIES, "mean", "pooled"} <= set(pd.read_csv(table, index_col=0).index)
    assert "realiad_256_multi_view" in table.parts
