"""MultiClassVisa after Anomalib's VisA preparation: every sample has the category, split, label and mask of 1cls.csv.

A tiny fake VisA download in the original layout (``<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
``<category>/Data/Masks/Anomaly/*.png`` with values 0/1, ``split_csv/1cls.csv``) goes through
Anomalib's ``Visa.prepare_data`` (which skips the download when ``<root>/<category>`` exists) and
the unified datamodule.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
from anomalib.data.datamodules.image import visa
from PIL import Image

from anomalib_vqflow.data import MultiClassVisa

# category -> (train normal, test normal, test anomaly); different counts, so that a swap would show.
COUNTS = {"candle": (4, 2, 3), "pcb1": (5, 1, 2)}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def visa_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict[str, str]]]:
    def no_download(*_: object) -> None:
        pytest.fail("the fake VisA download must be used, not fetched")

    monkeypatch.setattr(visa, "download_and_extract", no_download)
    rows = []
    for category, (train, test_normal, test_anomaly) in COUNTS.items():
        for index in range(train + test_normal):
            image = Path(category, "Data", "Images", "Normal", f"{index:04d}.JPG")
            _save(tmp_path / image, np.full((32, 32, 3), 100, dtype=np.uint8))
            split = "train" if index < train else "test"
            rows.append({"object": category, "split": split, "label": "normal", "image": image.as_posix(), "mask": ""})
        for index in range(test_anomaly):
            image = Path(category, "Data", "Images", "Anomaly", f"{index:03d}.JPG")
            mask = Path(category, "Data", "Masks", "Anomaly", f"{index:03d}.png")
            _save(tmp_path / image, np.full((32, 32, 3), 200, dtype=np.uint8))
            values = np.zeros((32, 32), dtype=np.uint8)
            values[: index + 1] = 1  # VisA's masks are 0/1; 32 * (index + 1) defect pixels tell them apart
            _save(tmp_path / mask, values)
            row = {"object": category, "split": "test", "label": "anomaly", "image": image.as_posix()}
            rows.append({**row, "mask": mask.as_posix()})
    (tmp_path / "split_csv").mkdir()
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path, rows


def test_samples_follow_the_split_csv(visa_root: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = visa_root
    datamodule = MultiClassVisa(root=root, categories=list(COUNTS), num_workers=0, val_split_ratio=0.25, seed=0)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.data_root == root / "visa_pytorch"

    expected = sorted(
        (row["object"], row["split"], "good" if row["label"] == "normal" else "bad", Path(row["image"]).name)
        for row in rows
    )
    subsets = [datamodule.train_data, datamodule.val_data, datamodule.test_data]
    samples = [row for subset in subsets for row in subset.samples.itertuples()]
    assert sorted((row.category, row.split, row.label, Path(row.image_path).name) for row in samples) == expected
    assert len(datamodule.val_data) > 0, "validation is taken from the CSV's training images"
    for row in samples:
        assert row.label_index == (row.label == "bad")
        assert Path(row.image_path).parts[-4:-1] == (row.category, row.split, row.label)

    test = datamodule.test_data
    for index in range(len(test)):
        item = test[index]
        if item.gt_label:
            # Anomalib writes the mask as <stem>.png with values 0/255; it is read back as the 0/1 original.
            assert Path(item.mask_path).name == f"{Path(item.image_path).stem}.png"
            assert int(item.gt_mask.sum()) == 32 * (int(Path(item.image_path).stem) + 1)
        else:
            assert int(item.gt_mask.sum()) == 0
