"""The plugin models' mixins, each on its own (the models' tests cover them composed)."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule

from anomalib_vqflow.components.guards import NonFiniteError
from anomalib_vqflow.models.base import UnifiedModelMixin
from anomalib_vqflow.models.mixins import ExactResumeMixin, NonFiniteGuardMixin, OfflineCheckpointMixin


class _Guarded(NonFiniteGuardMixin):
    global_step = 7
    current_epoch = 1

    def __init__(self, non_finite: str) -> None:
        self._init_non_finite_guard(non_finite)
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs: object) -> None:
        self.logged[name] = value


def test_guard_stops_or_skips_a_non_finite_step_and_names_the_images() -> None:
    batch = SimpleNamespace(image_path=["a.png", "b.png"])
    assert _Guarded("stop")._finite_step(batch, loss=torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match=r"Non-finite loss at training step 7 \(epoch 1\).*a\.png"):
        _Guarded("stop")._finite_step(batch, loss=torch.tensor(float("nan")))
    skipping = _Guarded("skip")
    assert not skipping._finite_step(batch, latents=[torch.zeros(2), torch.tensor([float("inf")])])
    assert skipping.skipped_batches == 1
    assert skipping.logged == {"train_skipped_batches": 1.0}
    with pytest.raises(ValueError, match="non_finite"):
        _Guarded("ignore")


class _Resumable(ExactResumeMixin, LightningModule):
    pass


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))  # noqa: NPY002


def test_resume_restores_every_global_generator_at_the_first_epoch_start() -> None:
    module = _Resumable()
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = _draws()
    _draws()
    restored = _Resumable()
    restored.on_load_checkpoint(checkpoint)
    restored.on_train_epoch_start()
    assert _draws() == expected
    restored.on_train_epoch_start()  # only once: later epochs go on from where they are
    assert _draws() != expected


def test_checkpoints_load_without_fetching_the_backbone() -> None:
    received: dict = {}

    class _Base:
        @classmethod
        def load_from_checkpoint(cls, checkpoint_path: str, *args: object, **kwargs: object) -> dict:
            received.update(kwargs, path=checkpoint_path)
            return received

    class _Model(OfflineCheckpointMixin, _Base):
        pass

    _Model.load_from_checkpoint("model.ckpt")
    assert received == {"pre_trained": False, "backbone_weights": None, "path": "model.ckpt"}
    received.clear()
    _Model.load_from_checkpoint("model.ckpt", pre_trained=True)  # an explicit choice stays
    assert received["pre_trained"] is True


def test_the_unified_mixin_is_the_composition_of_the_five() -> None:
    assert [mixin.__name__ for mixin in UnifiedModelMixin.__mro__[1:6]] == [
        "NonFiniteGuardMixin",
        "ExactResumeMixin",
        "OfflineCheckpointMixin",
        "ScorerExportMixin",
        "UnifiedEvaluationMixin",
    ]


def test_torch_model_from_hyperparameters_takes_every_argument_by_name_or_fails() -> None:
    from anomalib_vqflow.models import MsFlow
    from anomalib_vqflow.models.base import torch_model_from_hyperparameters
    from anomalib_vqflow.models.msflow.torch_model import MsFlowModel

    module = MsFlow(backbone="tf_efficientnet_lite0", num_blocks=[1, 1, 1], condition_channels=8, top_k=0.5)
    model = torch_model_from_hyperparameters(module, MsFlowModel)
    assert (model.condition_channels, model.anomaly_map_generator.top_k) == (8, 0.5)
    del module.hparams["top_k"]
    with pytest.raises(TypeError, match=r"MsFlow has no hyperparameters \['top_k'\] for MsFlowModel"):
        torch_model_from_hyperparameters(module, MsFlowModel)
