"""Faults injected into training: a NaN image stops training loudly, or is skipped and counted; no bad checkpoint."""

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.components.guards import NonFiniteError, non_finite_names
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.models import MsFlow, VqFlow

POISONED_INDEX = 3


def _tiny(model: type[MsFlow | VqFlow], non_finite: str) -> MsFlow | VqFlow:
    if model is VqFlow:
        arguments = {"num_prototypes": 2, "prototype_channels": 8, "num_patterns": 8, "position_channels": 8}
    else:
        arguments = {"condition_channels": 8}
    return model(
        backbone="tf_efficientnet_lite0",
        num_blocks=(1, 1, 1),
        warmup_epochs=1,
        non_finite=non_finite,
        pre_processor=model.configure_pre_processor(image_size=(64, 64)),
        **arguments,
    )


def _poisoned_data(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MultiClassMVTecAD, str]:
    """The demo data with training image ``POISONED_INDEX`` read as all NaN; and that image's path."""
    datamodule = MultiClassMVTecAD(
        root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0, val_split_ratio=0.25, seed=0
    )
    datamodule.setup()
    dataset_class = type(datamodule.train_data)
    original = dataset_class.__getitem__

    def poisoned(self: object, index: int) -> object:
        item = original(self, index)
        if self is datamodule.train_data and index == POISONED_INDEX:
            item.image = torch.full_like(item.image, float("nan"))
        return item

    monkeypatch.setattr(dataset_class, "__getitem__", poisoned)
    return datamodule, str(datamodule.train_data.samples.image_path.iloc[POISONED_INDEX])


def _fit(model: MsFlow | VqFlow, datamodule: MultiClassMVTecAD, folder: Path) -> Engine:
    seed_everything(0)
    engine = Engine(max_epochs=1, default_root_dir=folder, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return engine


def test_stop_names_step_image_and_tensor_and_writes_no_checkpoint(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny(MsFlow, "stop")
    datamodule, path = _poisoned_data(demo_root, monkeypatch)
    with pytest.raises(NonFiniteError, match=r"Non-finite image at training step \d+") as raised:
        _fit(model, datamodule, tmp_path)
    assert path in str(raised.value)
    assert "non_finite='skip'" in str(raised.value)
    assert list(tmp_path.rglob("*.ckpt")) == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("model_class", [MsFlow, VqFlow], ids=["ms_flow", "vq_flow"])
def test_skip_drops_the_batch_counts_it_and_trains_on(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_class: type[MsFlow | VqFlow]
) -> None:
    """VqFlow too: its training forward pass moves the codebooks, so the batch is dropped before it."""
    model = _tiny(model_class, "skip")
    datamodule, _ = _poisoned_data(demo_root, monkeypatch)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _fit(model, datamodule, tmp_path)
    assert model.skipped_batches == 1
    trained = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(before, after) for before, after in zip(initial, trained, strict=True)), (
        "the rest trained"
    )
    assert non_finite_names(model.model.state_dict().items()) == []
    assert len(list(tmp_path.rglob("*.ckpt"))) == 1


def test_non_finite_weights_stop_training_and_are_never_saved() -> None:
    model = _tiny(MsFlow, "skip")
    trainable = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        trainable.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="after training step"):
        model.on_train_batch_end(None, None, 0)
    with pytest.raises(NonFiniteError, match="non-finite tensors"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
