"""UnifiedEvaluator: collection of raw outputs, categories, files, logging and a real Lightning run."""

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUROC
from anomalib.metrics.evaluator import Evaluator
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from anomalib_vqflow.evaluation import UnifiedEvaluator, compute_metrics_table
from anomalib_vqflow.evaluation.callback import category_from_path
from anomalib_vqflow.evaluation.collected import CollectedOutputs, merge_collected_outputs

CATEGORIES = ["bottle", "bottle", "bottle", "bottle", "screw", "screw", "screw", "screw"]
DEFECTS = ["good", "broken", "good", "broken", "good", "scratch", "good", "scratch"]
LABELS = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
# Raw scores on different scales per category (flow log-likelihoods are not normalised).
SCORES = torch.tensor([31.0, 45.0, 40.0, 44.0, -3.0, -1.0, -2.0, -2.0])


def _maps_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[1, 2:6, 2:8] = True
    masks[3, 10:14, 0:3] = True
    masks[5, 0:4, 12:16] = True
    masks[7, 8:9, 8:12] = True
    maps = torch.rand(8, 16, 16, generator=generator) + 0.7 * masks
    maps[4:] = maps[4:] * 10 - 50  # negative scale for screw
    return maps, masks


def _paths(root: str = "/data/MVTecAD") -> list[str]:
    return [f"{root}/{c}/test/{d}/{i:03d}.png" for i, (c, d) in enumerate(zip(CATEGORIES, DEFECTS, strict=True))]


def _batches(batch_size: int = 3) -> list[ImageBatch]:
    maps, masks = _maps_and_masks()
    paths = _paths()
    return [
        ImageBatch(
            image=torch.zeros(len(paths[i : i + batch_size]), 3, 16, 16),
            gt_label=LABELS[i : i + batch_size],
            gt_mask=masks[i : i + batch_size],
            pred_score=SCORES[i : i + batch_size].clone(),
            anomaly_map=maps[i : i + batch_size].clone(),
            image_path=paths[i : i + batch_size],
        )
        for i in range(0, len(paths), batch_size)
    ]


def _expected_table():
    maps, masks = _maps_and_masks()
    return compute_metrics_table(SCORES.numpy(), LABELS.numpy(), CATEGORIES, maps.numpy(), masks.numpy())


class _Recorder:
    """Minimal stand-in for a LightningModule: records log_dict calls."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_dict(self, metrics: dict[str, float], **kwargs: object) -> None:
        self.logged.update(metrics)


def _trainer(tmp_path, callbacks=(), barebones=False) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=True,
        default_root_dir=str(tmp_path),
        barebones=barebones,
        callbacks=list(callbacks),
        callback_metrics={},
        logged_metrics={},
    )


def _run_epoch(evaluator, trainer, module, batches) -> None:
    evaluator.on_test_epoch_start(trainer, module)
    for index, batch in enumerate(batches):
        evaluator.on_test_batch_end(trainer, module, batch, batch, index)
    evaluator.on_test_epoch_end(trainer, module)


def test_is_an_anomalib_evaluator_without_torchmetrics():
    evaluator = UnifiedEvaluator()
    assert isinstance(evaluator, Evaluator)
    assert len(evaluator.val_metrics) == 0
    assert len(evaluator.test_metrics) == 0


def test_category_from_mvtec_path():
    assert category_from_path("/data/MVTecAD/metal_nut/test/color/000.png") == "metal_nut"
    assert category_from_path("screw/test/good/001.png") == "screw"
    assert category_from_path("001.png") == "unknown"


def test_epoch_writes_files_logs_and_keeps_table(tmp_path, capsys):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    _run_epoch(evaluator, trainer, module, _batches())

    expected = _expected_table()
    assert evaluator.table.rows == expected.rows
    assert evaluator.table.categories == ["bottle", "screw"]
    assert "bottle" in capsys.readouterr().out

    for suffix in ("csv", "json", "md"):
        assert (tmp_path / f"metrics_per_category.{suffix}").is_file()
    written = json.loads((tmp_path / "metrics_per_category.json").read_text())
    assert written["rows"]["pooled"]["image_AUROC"] == expected["pooled"]["image_AUROC"]

    assert module.logged["image_AUROC"] == expected["mean"]["image_AUROC"]
    assert module.logged["pooled_image_AUROC"] == expected["pooled"]["image_AUROC"]
    assert module.logged["screw/AUPRO"] == expected["screw"]["AUPRO"]
    assert len(module.logged) == 4 * 7
    # raw scores: both categories are separable (screw ties once), pooled is not
    assert expected["bottle"]["image_AUROC"] == 1.0
    assert expected["screw"]["image_AUROC"] == 0.875
    assert expected["pooled"]["image_AUROC"] < 0.9


def test_stored_outputs_are_copies_of_the_raw_values(tmp_path):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    evaluator.on_test_epoch_start(trainer, module)
    for index, batch in enumerate(_batches()):
        evaluator.on_test_batch_end(trainer, module, batch, batch, index)
        # what Anomalib's PostProcessor does after us: normalise and clamp to [0, 1]
        batch.pred_score.clamp_(0, 1)
        batch.anomaly_map.clamp_(0, 1)
    evaluator.on_test_epoch_end(trainer, module)
    assert evaluator.table.rows == _expected_table().rows


def test_category_field_takes_precedence_over_path(tmp_path):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    batches = _batches(batch_size=4)
    batches[0].category = ["bottle_A"] * 4
    batches[1].category = None  # falls back to the path
    _run_epoch(evaluator, trainer, module, batches)
    assert evaluator.table.categories == ["bottle_A", "screw"]


def test_map_with_channel_dim_and_missing_masks(tmp_path):
    maps, _ = _maps_and_masks()
    batch = SimpleNamespace(
        pred_score=SCORES,
        gt_label=LABELS,
        anomaly_map=maps[:, None],  # (B, 1, H, W)
        gt_mask=None,  # no annotations at all
        image_path=_paths(),
    )
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    _run_epoch(evaluator, trainer, module, [batch])
    assert evaluator.table["mean"]["image_AUROC"] == _expected_table()["mean"]["image_AUROC"]
    assert math.isnan(evaluator.table["pooled"]["pixel_AUROC"])
    assert "pixel_AUROC" not in module.logged


def test_epoch_start_resets_previous_outputs(tmp_path):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    _run_epoch(evaluator, trainer, module, _batches())
    _run_epoch(evaluator, trainer, module, _batches()[:1])
    assert evaluator.table.categories == ["bottle"]
    assert evaluator._outputs.categories == []  # freed after reporting


def test_barebones_fills_trainer_metrics(tmp_path):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path, barebones=True)
    _run_epoch(evaluator, trainer, module, _batches())
    assert module.logged == {}
    assert float(trainer.callback_metrics["pooled_AUPRO"]) == pytest.approx(evaluator.table["pooled"]["AUPRO"])


def test_name_clash_with_another_evaluator_moves_logs_under_prefix(tmp_path, caplog):
    evaluator, module = UnifiedEvaluator(), _Recorder()
    default = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer(tmp_path, callbacks=[evaluator, default])
    with caplog.at_level(logging.WARNING):
        _run_epoch(evaluator, trainer, module, _batches())
    assert "image_AUROC" in caplog.text
    assert "image_AUROC" not in module.logged
    assert module.logged["unified/image_AUROC"] == evaluator.table["mean"]["image_AUROC"]
    assert module.logged["unified/bottle/AUPRO"] == evaluator.table["bottle"]["AUPRO"]


def test_warns_when_placed_after_post_processor(tmp_path, caplog):
    evaluator = UnifiedEvaluator()
    with caplog.at_level(logging.WARNING):
        evaluator.on_test_start(_trainer(tmp_path, callbacks=[evaluator, PostProcessor()]), None)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        evaluator.on_test_start(_trainer(tmp_path, callbacks=[PostProcessor(), evaluator]), None)
    assert "after a PostProcessor" in caplog.text


class _RawScoreModel(LightningModule):
    """Returns fixed raw predictions as an ImageBatch, like an Anomalib model's test_step."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = _batches(batch_size=4)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> ImageBatch:
        del batch
        return self.batches[batch_idx]


def test_real_lightning_test_run(tmp_path):
    trainer = Trainer(
        accelerator="cpu",
        callbacks=[UnifiedEvaluator()],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    results = trainer.test(_RawScoreModel(), dataloaders=DataLoader(torch.arange(8), batch_size=4), verbose=False)
    expected = _expected_table()
    assert results[0]["image_AUROC"] == pytest.approx(expected["mean"]["image_AUROC"])
    assert results[0]["pooled_pixel_AUROC"] == pytest.approx(expected["pooled"]["pixel_AUROC"])
    assert results[0]["bottle/AUPRO"] == pytest.approx(expected["bottle"]["AUPRO"])
    assert (tmp_path / "metrics_per_category.md").is_file()
    (evaluator,) = [cb for cb in trainer.callbacks if isinstance(cb, UnifiedEvaluator)]
    assert np.isclose(evaluator.table["screw"]["AUPRO"], expected["screw"]["AUPRO"])


def _collected(batches: list[ImageBatch]) -> CollectedOutputs:
    evaluator = UnifiedEvaluator()
    for batch in batches:
        evaluator.update(batch)
    return evaluator._outputs


def test_merge_drops_repeated_paths_and_orders_by_category_and_path():
    batches = _batches(batch_size=3)
    # Two "ranks" in DistributedSampler's interleaved order; rank 1 repeats the first image as padding.
    rank_0 = _collected([batches[0], batches[2]])
    rank_1 = _collected([batches[1], batches[0]])
    merged = merge_collected_outputs([rank_1, rank_0])
    expected_order = sorted(range(8), key=lambda i: (CATEGORIES[i], _paths()[i]))
    assert merged.paths == [_paths()[i] for i in expected_order]
    assert merged.categories == [CATEGORIES[i] for i in expected_order]
    maps, masks = _maps_and_masks()
    np.testing.assert_array_equal(merged.scores[0], SCORES.double().numpy()[expected_order])
    np.testing.assert_array_equal(merged.maps[0], maps.numpy()[expected_order])
    np.testing.assert_array_equal(merged.masks[0], masks.numpy()[expected_order])
    assert rank_0.maps == rank_1.maps == []  # the parts' batches were released


def test_table_does_not_depend_on_how_the_images_were_split():
    one_process = UnifiedEvaluator()
    for batch in _batches(batch_size=8):
        one_process.update(batch)
    pieces = merge_collected_outputs([_collected(_batches(batch_size=3)[::-1]), _collected(_batches(batch_size=2)[:1])])
    evaluator = UnifiedEvaluator()
    evaluator._outputs = pieces
    assert evaluator.compute().rows == one_process.compute().rows == _expected_table().rows


def test_merge_without_paths_keeps_every_image_in_collection_order():
    batch = SimpleNamespace(pred_score=SCORES, gt_label=LABELS, category=CATEGORIES, anomaly_map=None)
    merged = merge_collected_outputs([_collected([batch]), _collected([batch])])
    assert merged.paths == [None] * 16
    np.testing.assert_array_equal(merged.scores[0], np.concatenate([SCORES.double().numpy()] * 2))
    assert merged.images_without_maps == 16


def test_an_epoch_without_outputs_warns_and_compute_raises(tmp_path, caplog):
    evaluator, module, trainer = UnifiedEvaluator(), _Recorder(), _trainer(tmp_path)
    with caplog.at_level(logging.WARNING):
        _run_epoch(evaluator, trainer, module, [])
    assert "collected no test outputs" in caplog.text
    assert evaluator.table is None
    with pytest.raises(RuntimeError, match="no test outputs"):
        evaluator.compute()
