"""The unified datamodule: categories, items that carry them, masks, and clear errors on bad input."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_vqflow.data import MultiClassMVTecAD, MultiClassVisa
from anomalib_vqflow.data.dataset import CategoryImageBatch, MultiClassDataset
from anomalib_vqflow.data.multiclass import announce_good_validation


def _write_image(path: Path, value: int, size: tuple[int, int] = (20, 24), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    array = np.full((*size, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(array, mode=mode).save(path)


def _make_category(root: Path, name: str, masks: bool = True, grayscale: bool = False) -> None:
    mode = "L" if grayscale else "RGB"
    for index in range(3):
        _write_image(root / name / "train" / "good" / f"{index:03d}.png", 100 + index, mode=mode)
    _write_image(root / name / "test" / "good" / "000.png", 100, mode=mode)
    for index in range(2):
        _write_image(root / name / "test" / "scratch" / f"{index:03d}.png", 200, mode=mode)
        if masks:
            mask = np.zeros((20, 24), dtype=np.uint8)
            mask[2:5, 3:9] = 255
            mask_path = root / name / "ground_truth" / "scratch" / f"{index:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _make_category(tmp_path, "alpha")
    _make_category(tmp_path, "beta", masks=False, grayscale=True)
    (tmp_path / "not_a_category").mkdir()
    return tmp_path


def test_finds_every_category_with_train_good(root: Path) -> None:
    assert MultiClassMVTecAD(root=root).categories == ["alpha", "beta"]
    assert MultiClassMVTecAD(root=root, categories=["beta"]).categories == ["beta"]


def test_items_carry_their_category_and_masks(root: Path) -> None:
    datamodule = MultiClassMVTecAD(root=root, num_workers=0, eval_batch_size=8)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert isinstance(batch, CategoryImageBatch)
    assert batch.category == ["alpha"] * 3 + ["beta"] * 3
    assert batch.image.shape == (6, 3, 20, 24), "grayscale images are converted to RGB"
    assert batch.gt_label.tolist() == [0, 1, 1, 0, 1, 1]
    # alpha's defects have masks; beta's have none (image-level labels only), so they get empty masks.
    assert batch.gt_mask[1].sum() == 18
    assert batch.gt_mask[4].sum() == 0
    assert [item.category for item in batch] == batch.category


def test_validation_comes_from_good_training_images(root: Path) -> None:
    datamodule = MultiClassMVTecAD(root=root, num_workers=0, val_split_ratio=0.5, seed=0)
    datamodule.setup()
    val_paths = set(datamodule.val_data.samples.image_path)
    assert val_paths
    assert all("/train/good/" in path for path in val_paths)
    assert not val_paths & set(datamodule.test_data.samples.image_path)
    assert len(datamodule.train_data) + len(datamodule.val_data) == 6


def test_good_validation_is_announced_once_and_anomalibs_repeats_are_dropped(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    announce_good_validation.cache_clear()
    anomalib_logger = logging.getLogger("anomalib.metrics.threshold.f1_adaptive_threshold")
    before = list(anomalib_logger.filters)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                MultiClassMVTecAD(root=root, num_workers=0, val_split_ratio=0.5, seed=0).setup()
            anomalib_logger.warning("The validation set does not contain any anomalous images. As a result ...")
            anomalib_logger.warning("Another threshold warning.")
        messages = [record.getMessage() for record in caplog.records]
        assert sum("Validation uses good images only" in message for message in messages) == 1
        assert not any(message.startswith("The validation set does not contain") for message in messages)
        assert "Another threshold warning." in messages
    finally:
        anomalib_logger.filters[:] = before
        announce_good_validation.cache_clear()


def test_run_folder_names_follow_the_data(root: Path) -> None:
    datamodule = MultiClassMVTecAD(root=root)
    assert (datamodule.name, datamodule.category) == (root.name, "unified")


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        MultiClassMVTecAD(root=missing).setup()


def test_empty_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no category"):
        MultiClassMVTecAD(root=tmp_path).setup()


def test_unknown_category_names_it_and_the_root(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Unknown categories \['gamma'\]"):
        MultiClassMVTecAD(root=root, categories=["alpha", "gamma"]).setup()


def test_category_without_training_images_names_the_folder(root: Path) -> None:
    empty = root / "gamma" / "train" / "good"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(empty)):
        MultiClassDataset(root, ["gamma"])
    with pytest.raises(FileNotFoundError, match=str(empty)):
        MultiClassMVTecAD(root=root).setup()


def test_defect_image_without_mask_names_the_image(root: Path) -> None:
    (root / "alpha" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"alpha/test/scratch/001\.png has no mask"):
        MultiClassDataset(root, ["alpha"])


def test_corrupt_image_names_the_file(root: Path) -> None:
    corrupt = root / "alpha" / "test" / "scratch" / "000.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = MultiClassDataset(root, ["alpha"], split="test")
    index = dataset.samples.index[dataset.samples.image_path == str(corrupt)][0]
    with pytest.raises(ValueError, match=f"Cannot read image file {corrupt}"):
        dataset[index]


def test_magnetic_tile_loads() -> None:
    shared = Path(__file__).parents[2].parent / "shared" / "data"
    if not (shared / "magnetic_tile").is_dir():
        pytest.skip("shared/data/magnetic_tile is not next to this checkout")
    datamodule = MultiClassMVTecAD(root=shared, categories=["magnetic_tile"], num_workers=0, eval_batch_size=4)
    datamodule.setup()
    assert len(datamodule.train_data) + len(datamodule.val_data) == 762
    assert len(datamodule.test_data) == 190 + 115 + 85 + 57 + 32 + 99
    item = datamodule.test_data[len(datamodule.test_data) - 1]
    assert item.image.shape[0] == 3
    assert item.gt_mask.shape == item.image.shape[-2:]
    assert item.category == "magnetic_tile"


def test_visa_reads_the_split_folder(tmp_path: Path) -> None:
    _make_category(tmp_path / "visa_pytorch", "candle")
    datamodule = MultiClassVisa(root=tmp_path, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.categories == ["candle"]
    assert torch.is_tensor(datamodule.test_data[0].image)


def test_requested_category_without_training_images_names_train_good(root: Path) -> None:
    (root / "gamma" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(root / "gamma" / "train" / "good")):
        MultiClassMVTecAD(root=root, categories=["gamma"]).setup()


def test_partly_annotated_category_gets_image_metrics_only(root: Path) -> None:
    # A second defect type without ground truth: its defect pixels must not count as normal ones.
    for index in range(2):
        _write_image(root / "alpha" / "test" / "hole" / f"{index:03d}.png", 50)
    samples = MultiClassDataset(root, ["alpha"], split="test").samples
    assert (samples.mask_path == "").all()
    assert samples.label_index.sum() == 4


def test_unknown_visa_category_fails_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown VisA categories \['candles'\]"):
        MultiClassVisa(root=tmp_path, categories=["candles"]).prepare_data()


def _training_order(datamodule: MultiClassMVTecAD) -> list[str]:
    return [path for batch in datamodule.train_dataloader() for path in batch.image_path]


def test_training_order_depends_on_seed_and_epoch_only(root: Path) -> None:
    datamodule = MultiClassMVTecAD(root=root, train_batch_size=2, num_workers=0, seed=3)
    datamodule.setup()
    torch.manual_seed(0)
    first = _training_order(datamodule)
    torch.manual_seed(1)  # The global generator (what a resumed run's state would differ in) plays no part.
    assert _training_order(datamodule) == first
    assert sorted(first) == sorted(datamodule.train_data.samples.image_path)

    loader = datamodule.train_dataloader()
    orders = []
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        orders.append([path for batch in loader for path in batch.image_path])
    assert orders[0] == first
    assert len({tuple(order) for order in orders}) > 1, "each epoch has its own order"
    other_seed = MultiClassMVTecAD(root=root, train_batch_size=2, num_workers=0, seed=4)
    other_seed.setup()
    assert _training_order(other_seed) != first


@pytest.mark.parametrize("per_category_table", [True, False])
def test_setup_attaches_the_per_category_evaluator_once_unless_turned_off(root: Path, per_category_table: bool) -> None:
    from lightning.pytorch import Trainer

    from anomalib_vqflow.evaluation import UnifiedEvaluator

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    datamodule = MultiClassMVTecAD(root=root, num_workers=0, per_category_table=per_category_table)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    datamodule.setup("test")
    evaluators = [callback for callback in trainer.callbacks if isinstance(callback, UnifiedEvaluator)]
    assert len(evaluators) == int(per_category_table)
    if per_category_table:
        assert trainer.callbacks[0] is evaluators[0], "ahead of the model's post-processor"


def test_visa_leaves_out_the_empty_folders_of_a_partial_copy(tmp_path: Path) -> None:
    _make_category(tmp_path / "visa_pytorch", "candle")
    (tmp_path / "visa_pytorch" / "capsules" / "train" / "good").mkdir(parents=True)
    datamodule = MultiClassVisa(root=tmp_path, num_workers=0)
    assert datamodule.categories == ["candle"]
    assert datamodule.name == tmp_path.name
