"""MVTec AD 2 as one unified datamodule: its layout, the public test set only, validation, and clear errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from anomalib.data import AnomalibDataModule
from jsonargparse import ArgumentParser
from PIL import Image

from anomalib_vqflow.data.mvtecad2 import MultiClassMVTecAD2


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_category(root: Path, name: str, num_bad: int) -> None:
    """MVTec AD 2's layout: 3 train, 2 validation, 1 public good, ``num_bad`` public bad with masks, private sets."""
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    for index in range(3):
        _save(root / name / "train" / "good" / f"{index:03d}_regular.png", image)
    for index in range(2):
        _save(root / name / "validation" / "good" / f"{index:03d}_regular.png", image)
    _save(root / name / "test_public" / "good" / "000_regular.png", image)
    for index in range(num_bad):
        _save(root / name / "test_public" / "bad" / f"{index:03d}_regular.png", image)
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[: index + 1, :4] = 255  # 4 * (index + 1) defect pixels: each mask is told apart by its size
        _save(root / name / "test_public" / "ground_truth" / "bad" / f"{index:03d}_regular_mask.png", mask)
    for private in ("test_private", "test_private_mixed"):
        _save(root / name / private / "000_regular.png", image)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _make_category(tmp_path, "can", num_bad=2)
    _make_category(tmp_path, "vial", num_bad=3)
    return tmp_path


def test_trains_on_train_good_and_tests_on_the_public_set(root: Path) -> None:
    datamodule = MultiClassMVTecAD2(root=root, num_workers=0, val_split_ratio=0.5, seed=0)
    assert datamodule.categories == ["can", "vial"]
    datamodule.setup()
    training = [*datamodule.train_data.samples.image_path, *datamodule.val_data.samples.image_path]
    assert sorted(training) == sorted(str(path) for path in root.glob("*/train/good/*.png"))
    test = datamodule.test_data
    assert sorted(test.samples.image_path) == sorted(str(path) for path in root.glob("*/test_public/*/*.png"))
    for index in range(len(test)):
        item = test[index]
        image_path = Path(item.image_path)
        assert item.category == image_path.parents[2].name
        assert int(item.gt_label) == (image_path.parent.name == "bad")
        if image_path.parent.name == "bad":
            mask_folder = image_path.parents[1] / "ground_truth" / "bad"
            assert Path(item.mask_path) == mask_folder / f"{image_path.stem}_mask.png"
            assert int(item.gt_mask.sum()) == 4 * (int(image_path.stem[:3]) + 1)
        else:
            assert item.mask_path is None
            assert int(item.gt_mask.sum()) == 0
    assert test.samples.groupby("category").label_index.sum().to_dict() == {"can": 2, "vial": 3}


def test_validation_from_dir_uses_the_validation_folder(root: Path) -> None:
    datamodule = MultiClassMVTecAD2(root=root, num_workers=0, val_split_mode="from_dir")
    datamodule.setup()
    assert sorted(datamodule.val_data.samples.image_path) == sorted(map(str, root.glob("*/validation/good/*.png")))
    assert set(datamodule.val_data.samples.category) == {"can", "vial"}
    assert len(datamodule.train_data) == 6, "training keeps every train/good image"


def test_validation_from_dir_needs_the_validation_folder(root: Path) -> None:
    folder = root / "vial" / "validation" / "good"
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=f"'vial' has no validation images.*{folder}"):
        MultiClassMVTecAD2(root=root, val_split_mode="from_dir").setup()


@pytest.mark.parametrize("test_type", ["private", "private_mixed"])
def test_private_test_sets_are_refused(root: Path, test_type: str) -> None:
    with pytest.raises(ValueError, match=f"test_type='{test_type}' has no labels.*benchmark server"):
        MultiClassMVTecAD2(root=root, test_type=test_type)


def test_unknown_test_type_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown MVTec AD 2 test_type 'validation'"):
        MultiClassMVTecAD2(root=root, test_type="validation")


def test_missing_public_test_set_names_the_folder(root: Path) -> None:
    shutil.rmtree(root / "can" / "test_public")
    with pytest.raises(FileNotFoundError, match=f"'can' has no public test set.*{root / 'can' / 'test_public'}"):
        MultiClassMVTecAD2(root=root).setup()


def test_unknown_category_names_it(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Unknown categories \['rice'\]"):
        MultiClassMVTecAD2(root=root, categories=["can", "rice"]).setup()


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "MVTec_AD_2")):
        MultiClassMVTecAD2(root=tmp_path / "MVTec_AD_2").setup()


def test_bad_image_without_mask_names_it(root: Path) -> None:
    (root / "vial" / "test_public" / "ground_truth" / "bad" / "002_regular_mask.png").unlink()
    with pytest.raises(ValueError, match=r"vial/test_public/bad/002_regular\.png has no mask"):
        MultiClassMVTecAD2(root=root).setup()


def test_corrupt_image_names_the_file(root: Path) -> None:
    corrupt = root / "can" / "test_public" / "bad" / "001_regular.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    datamodule = MultiClassMVTecAD2(root=root, num_workers=0)
    datamodule.setup()
    index = datamodule.test_data.samples.index[datamodule.test_data.samples.image_path == str(corrupt)][0]
    with pytest.raises(ValueError, match=f"Cannot read image file {corrupt}"):
        datamodule.test_data[index]


def test_packaged_config_builds() -> None:
    config = Path(__file__).parents[2] / "configs" / "data" / "multiclass_mvtecad2.yaml"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    datamodule = parser.instantiate_classes(parser.parse_object({"data": yaml.safe_load(config.read_text())})).data
    assert isinstance(datamodule, MultiClassMVTecAD2)
    assert (datamodule.name, datamodule.test_type) == ("MVTec_AD_2", "public")
