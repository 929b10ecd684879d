"""Your own categories in Anomalib ``Folder`` layouts: samples, the seeded normal test share, configs, clear errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from anomalib.data import AnomalibDataModule
from jsonargparse import ArgumentParser
from PIL import Image

from anomalib_vqflow.data.folder import MultiClassFolder


def _save(path: Path, value: int = 120, defect_rows: int = 0, suffix: str = ".png") -> None:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((32, 32), value, dtype=np.uint8)
    array[:defect_rows] = 255
    Image.fromarray(array).convert("RGB" if suffix == ".jpg" else "L").save(path)


SCREW = {"normal_dir": "screw/good", "abnormal_dir": "screw/bad", "mask_dir": "screw/masks", "normal_test_dir": None}
CABLE = {
    "normal_dir": ["cable/good_a", "cable/good_b"],
    "abnormal_dir": "cable/defects",
    "normal_test_dir": "cable/good_test",
    "extensions": [".jpg"],
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # screw: 10 normal images, defects in sub-folders (masks mirror them, named <stem>_mask or <stem>).
    for index in range(10):
        _save(tmp_path / "screw" / "good" / f"{index:03d}")
    for defect, rows in (("scratch", 1), ("hole", 2)):
        for index in range(2):
            _save(tmp_path / "screw" / "bad" / defect / f"{index:03d}")
            mask_name = f"{index:03d}_mask" if index == 0 else f"{index:03d}"
            _save(tmp_path / "screw" / "masks" / defect / mask_name, value=0, defect_rows=rows)
    # cable: two normal folders, its own normal test folder, no masks; JPEG only (a stray PNG is ignored).
    for folder in ("good_a", "good_b"):
        for index in range(2):
            _save(tmp_path / "cable" / folder / f"{folder}_{index}", suffix=".jpg")
    _save(tmp_path / "cable" / "good_a" / "ignored")
    _save(tmp_path / "cable" / "good_test" / "0", suffix=".jpg")
    _save(tmp_path / "cable" / "defects" / "0", suffix=".jpg")
    return tmp_path


def _all_samples(datamodule: MultiClassFolder) -> list[tuple[str, str, str, str, str, int]]:
    rows = []
    for subset in ("train_data", "val_data", "test_data"):
        for row in getattr(datamodule, subset).samples.itertuples():
            image = Path(row.image_path).relative_to(datamodule.root).as_posix()
            mask = Path(row.mask_path).relative_to(datamodule.root).as_posix() if row.mask_path else ""
            rows.append((row.category, row.split, row.label, image, mask, row.label_index))
    return sorted(rows)


def test_every_sample_has_its_category_split_label_and_mask(root: Path) -> None:
    datamodule = MultiClassFolder({"screw": SCREW, "cable": CABLE}, root=root, num_workers=0, seed=0)
    assert datamodule.categories == ["screw", "cable"]
    datamodule.setup()
    samples = _all_samples(datamodule)
    screw_test_good = {image for category, split, label, image, *_ in samples if (category, split) == ("screw", "test")}
    screw_test_good = sorted(image for image in screw_test_good if "/good/" in image)
    assert len(screw_test_good) == 2, "20 % of the 10 normal screw images"
    expected = [
        ("cable", "test", "defects", "cable/defects/0.jpg", "", 1),
        ("cable", "test", "good", "cable/good_test/0.jpg", "", 0),
        *[("cable", "train", "good", f"cable/{f}/{f}_{i}.jpg", "", 0) for f in ("good_a", "good_b") for i in range(2)],
        *[
            ("screw", "test", defect, f"screw/bad/{defect}/{i:03d}.png", f"screw/masks/{defect}/{i:03d}{m}.png", 1)
            for defect in ("hole", "scratch")
            for i, m in ((0, "_mask"), (1, ""))
        ],
        *[("screw", "test", "good", image, "", 0) for image in screw_test_good],
        *[
            ("screw", "train", "good", f"screw/good/{i:03d}.png", "", 0)
            for i in range(10)
            if f"screw/good/{i:03d}.png" not in screw_test_good
        ],
    ]
    assert samples == sorted(expected)
    # The masks read are the right ones: a hole has two defect rows, a scratch one.
    test = datamodule.test_data
    for index in range(len(test)):
        item = test[index]
        rows = {"hole": 2, "scratch": 1}.get(Path(item.image_path).parent.name, 0)
        assert (item.category, int(item.gt_mask.sum())) == (Path(item.image_path).parts[len(root.parts)], 32 * rows)


def test_the_normal_test_share_is_fixed_and_apart_from_training(root: Path) -> None:
    def split(seed: int) -> tuple[set[str], set[str]]:
        datamodule = MultiClassFolder({"screw": SCREW}, root=root, val_split_mode="none", seed=seed)
        samples = datamodule.category_samples("screw")
        normal = samples[samples.label == "good"]
        return set(normal.image_path[normal.split == "train"]), set(normal.image_path[normal.split == "test"])

    train, test = split(seed=0)
    assert len(train) + len(test) == 10
    assert 1 <= len(test) <= 4, "about a fifth"
    assert not train & test
    assert split(seed=1) == (train, test), "the run's seed does not move images between training and test"
    # More images later: every earlier image stays on its side.
    for index in range(10, 30):
        _save(root / "screw" / "good" / f"{index:03d}")
    more_train, more_test = split(seed=0)
    assert train <= more_train
    assert test <= more_test


def test_absolute_folders_and_no_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root / "screw")
    folders = {"normal_dir": "good", "abnormal_dir": str(root / "screw" / "bad" / "hole")}
    datamodule = MultiClassFolder({"screw": folders}, num_workers=0)
    datamodule.setup()
    assert datamodule.name == "screw"
    assert (datamodule.test_data.samples.mask_path == "").all(), "no mask_dir: image labels only"
    assert datamodule.test_data.samples.label_index.sum() == 2


def test_yaml_config_and_command_line_build_it(root: Path) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    config = f"""
    class_path: anomalib_vqflow.data.folder.MultiClassFolder
    init_args:
      root: {root}
      categories:
        screw: {{normal_dir: screw/good, abnormal_dir: screw/bad, mask_dir: screw/masks, normal_test_dir: null}}
        cable: {{normal_dir: [cable/good_a, cable/good_b], abnormal_dir: cable/defects, extensions: [.jpg],
                 normal_test_dir: cable/good_test}}
    """
    from_config = parser.instantiate_classes(parser.parse_object({"data": yaml.safe_load(config)})).data
    assert from_config.folders == {"screw": SCREW, "cable": CABLE}
    from_config.setup()
    assert len(from_config.test_data) == 2 + 4 + 2

    arguments = ["--data", "anomalib_vqflow.data.folder.MultiClassFolder", "--data.root", str(root)]
    from_arguments = parser.instantiate_classes(
        parser.parse_args([*arguments, "--data.categories", '{"screw": {"normal_dir": "screw/good"}}'])
    ).data
    assert from_arguments.folders == {"screw": {"normal_dir": "screw/good"}}

    packaged = Path(__file__).parents[2] / "configs" / "data" / "multiclass_folder.yaml"
    datamodule = parser.instantiate_classes(parser.parse_object({"data": yaml.safe_load(packaged.read_text())})).data
    assert datamodule.available_categories() == ["screw", "cable"]


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        ({**SCREW, "abnormal": "screw/bad"}, r"Category 'screw': unknown keys \['abnormal'\]"),
        ({"abnormal_dir": "screw/bad"}, "Category 'screw': normal_dir is required"),
        ("screw/good", "Category 'screw': expected a mapping"),
    ],
)
def test_bad_mapping_is_refused_when_built(folders: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiClassFolder({"screw": folders})


def test_bad_arguments_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="at least one category"):
        MultiClassFolder({})
    with pytest.raises(ValueError, match=r"normal_split_ratio must be in \[0, 1\)"):
        MultiClassFolder({"screw": SCREW}, normal_split_ratio=1.0)


def test_missing_folder_names_the_category_and_path(root: Path) -> None:
    shutil.rmtree(root / "screw" / "masks")
    with pytest.raises(
        FileNotFoundError, match=f"Category 'screw': mask_dir has no images.*{root / 'screw' / 'masks'}"
    ):
        MultiClassFolder({"screw": SCREW}, root=root).setup()


def test_empty_normal_folder_names_the_category_and_path(root: Path) -> None:
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"Category 'cable': normal_dir has no images.*{root / 'empty'}"):
        MultiClassFolder({"cable": {"normal_dir": ["cable/good_a", "empty"]}}, root=root).setup()


def test_abnormal_image_without_mask_names_the_category_and_image(root: Path) -> None:
    (root / "screw" / "masks" / "hole" / "001.png").unlink()
    with pytest.raises(ValueError, match=r"Category 'screw': Defect image .*screw/bad/hole/001\.png has no mask"):
        MultiClassFolder({"screw": SCREW}, root=root).setup()


def test_overlapping_folders_are_refused(root: Path) -> None:
    # A normal folder that contains the abnormal one would put defect images among the training images.
    with pytest.raises(
        ValueError, match=r"Category 'screw': Image .*screw/bad/.* both by normal_dir and by abnormal_dir"
    ):
        MultiClassFolder({"screw": {"normal_dir": "screw", "abnormal_dir": "screw/bad"}}, root=root).setup()


def test_mask_folders_must_pair_with_abnormal_folders(root: Path) -> None:
    folders = {**SCREW, "abnormal_dir": ["screw/bad/hole", "screw/bad/scratch"], "mask_dir": ["screw/masks/hole"] * 3}
    with pytest.raises(ValueError, match="3 mask_dir for 2 abnormal_dir"):
        MultiClassFolder({"screw": folders}, root=root).setup()
    # One mask_dir per abnormal_dir pairs them in order.
    folders["mask_dir"] = ["screw/masks/hole", "screw/masks/scratch"]
    samples = MultiClassFolder({"screw": folders}, root=root).category_samples("screw")
    defects = samples[samples.label_index == 1]
    assert [Path(path).parent.name for path in defects.mask_path] == ["hole", "hole", "scratch", "scratch"]


def test_corrupt_image_names_the_file(root: Path) -> None:
    corrupt = root / "cable" / "defects" / "0.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff truncated")
    datamodule = MultiClassFolder({"cable": CABLE}, root=root, num_workers=0)
    datamodule.setup()
    index = datamodule.test_data.samples.index[datamodule.test_data.samples.image_path == str(corrupt)][0]
    with pytest.raises(ValueError, match=f"Cannot read image file {corrupt}"):
        datamodule.test_data[index]
