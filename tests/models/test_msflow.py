"""MSFlow: outputs, loss, training without category labels, and OpenVINO parity with PyTorch."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.cli import openvino_inferencer
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.models import MsFlow
from anomalib_vqflow.models.msflow.loss import MsFlowLoss
from anomalib_vqflow.models.msflow.torch_model import MsFlowModel

IMAGE_SIZE = 64


def _tiny_model() -> MsFlow:
    return MsFlow(
        backbone="tf_efficientnet_lite0",
        num_blocks=(1, 1, 2),
        condition_channels=8,
        warmup_epochs=1,
        pre_processor=MsFlow.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    )


def test_torch_model_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = MsFlowModel(backbone="tf_efficientnet_lite0", pre_trained=False, num_blocks=(1, 1, 1), condition_channels=8)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    latents, log_jacobian = model.train()(images)
    assert [latent.shape[1:] for latent in latents] == [(24, 8, 8), (40, 4, 4), (112, 2, 2)]
    assert log_jacobian.shape == (2,)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    loss = MsFlowLoss()(latents, log_jacobian)
    loss.backward()
    assert all(p.grad is not None for p in model.parallel_flows.parameters() if p.requires_grad)
    output = model.eval()(images)
    assert isinstance(output, InferenceBatch)
    assert output.pred_score.shape == (2,)
    assert output.anomaly_map.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    # -log(1 - top-k mean of 1 - P): non-negative and finite.
    assert torch.all(output.pred_score >= 0)
    assert torch.all(torch.isfinite(output.pred_score))


def test_loss_by_hand() -> None:
    latents = [torch.ones(1, 2, 1, 1), torch.full((1, 1, 2, 1), 2.0)]
    # 0.5 * (1 + 1) + 0.5 * (4 + 4) = 5, minus log|det J| = 1.5
    assert MsFlowLoss()(latents, torch.tensor([1.5])).item() == 3.5


def test_layers_follow_paper_strides_for_any_backbone() -> None:
    model = MsFlowModel(backbone="resnet18", pre_trained=False, num_blocks=(1, 1, 1), condition_channels=8)
    assert model.feature_extractor.strides == [4, 8, 16]


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[MsFlow, Engine, MultiClassMVTecAD]:
    seed_everything(0)
    model = _tiny_model()
    datamodule = MultiClassMVTecAD(root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=0)
    engine = Engine(
        max_epochs=2, default_root_dir=tmp_path_factory.mktemp("msflow"), logger=False, enable_progress_bar=False
    )
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)
    return model, engine, datamodule


def _training_loss(model: MsFlow, datamodule: MultiClassMVTecAD) -> float:
    images = torch.stack([datamodule.train_data[index].image for index in range(8)])
    model.model.train()
    with torch.no_grad():
        return model.loss(*model.model(model.pre_processor.transform(images))).item()


def test_training_lowers_the_loss_and_tests_per_category(
    trained: tuple[MsFlow, Engine, MultiClassMVTecAD],
) -> None:
    model, engine, datamodule = trained
    seed_everything(0)
    untrained = _tiny_model()
    # Four small steps (two at a tenth of the rate during warm-up): a clear but modest drop.
    assert _training_loss(model, datamodule) < 0.98 * _training_loss(untrained, datamodule)
    table = model.evaluator.table
    assert table.categories == ["brick", "coffee"]
    run_folder = Path(engine.trainer.default_root_dir)
    assert (run_folder / "metrics_per_category.md").is_file()
    # Pictures of different categories land in different folders, so none overwrites another.
    assert sorted(p.name for p in (run_folder / "images").iterdir()) == ["brick", "coffee"]
    assert all(np.isfinite(table[c]["image_AUROC"]) for c in table.categories)


def test_scores_do_not_depend_on_categories(trained: tuple[MsFlow, Engine, MultiClassMVTecAD]) -> None:
    """The model is label-free: scrambling the categories a batch carries changes nothing it predicts."""
    model, _, datamodule = trained
    batch = next(iter(datamodule.test_dataloader()))
    batch.image = model.pre_processor.transform(batch.image)
    model.eval()
    first = model.test_step(batch, 0)
    scores = first.pred_score.clone()
    batch.category = list(reversed(batch.category))
    second = model.test_step(batch, 0)
    torch.testing.assert_close(second.pred_score, scores, rtol=0, atol=0)


@pytest.mark.parametrize("post_processed", [True, False], ids=["deployed", "raw"])
def test_openvino_matches_pytorch(
    trained: tuple[MsFlow, Engine, MultiClassMVTecAD],
    tmp_path: Path,
    post_processed: bool,
) -> None:
    """Exported model vs PyTorch on images already at the input size, with and without the post-processor.

    The raw outputs are the strict check: the post-processor clamps to [0, 1], which can hide differences.
    Relative difference: max |openvino - torch| divided by the max |torch| of the same output.
    """
    trained_model, engine, datamodule = trained
    model = copy.deepcopy(trained_model).eval()
    if not post_processed:
        model.post_processor = None
    exported = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=tmp_path)
    inferencer = openvino_inferencer(exported, cache_folder=tmp_path)
    samples = datamodule.test_data.samples
    raw_scores = []
    for index in range(0, len(samples), max(len(samples) // 6, 1)):
        image = datamodule.test_data[index].image
        assert image.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad():
            expected = model(image.unsqueeze(0))
        predicted = inferencer.predict(samples.image_path.iloc[index])
        raw_scores.append(float(expected.pred_score))
        for field in ("pred_score", "anomaly_map"):
            reference = getattr(expected, field).squeeze().numpy()
            actual = np.asarray(getattr(predicted, field)).squeeze()
            relative = np.abs(actual - reference).max() / max(np.abs(reference).max(), 1e-12)
            assert relative <= 1e-3, f"{field} of image {index}: relative difference {relative:.2e}"
    if not post_processed:
        assert len(set(raw_scores)) == len(raw_scores), "raw scores must differ between images"


def test_checkpoint_loads_without_pickled_code(trained: tuple[MsFlow, Engine, MultiClassMVTecAD]) -> None:
    """``load_from_checkpoint`` with Anomalib's default ``weights_only=True`` predicts what the trained model did."""
    model, engine, _ = trained
    checkpoint = Path(engine.trainer.default_root_dir) / "weights" / "lightning" / "model.ckpt"
    restored = MsFlow.load_from_checkpoint(checkpoint, weights_only=True).eval()
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()
    with torch.no_grad():
        expected, actual = model(images), restored(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
