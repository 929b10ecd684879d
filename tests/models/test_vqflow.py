"""VQ-Flow: outputs and gradients, loss, paper size, calibration, codebook health (trained: test_unified_models)."""

from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.evaluation import auroc
from anomalib_vqflow.models import VqFlow
from anomalib_vqflow.models.vqflow.anomaly_map import ConceptCalibration, image_moments
from anomalib_vqflow.models.vqflow.loss import VqFlowLoss
from anomalib_vqflow.models.vqflow.torch_model import VqFlowEncoding, VqFlowModel

IMAGE_SIZE = 64
TINY = {
    "backbone": "tf_efficientnet_lite0",
    "num_blocks": (1, 1, 1),
    "num_prototypes": 4,
    "prototype_channels": 8,
    "num_patterns": 8,
    "position_channels": 8,
}


def test_torch_model_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = VqFlowModel(pre_trained=False, **TINY)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    encoding = model.train()(images)
    assert isinstance(encoding, VqFlowEncoding)
    assert [latent.shape[1:] for latent in encoding.latents] == [(24, 8, 8), (40, 4, 4), (112, 2, 2)]
    assert encoding.log_jacobian.shape == (4,)
    assert encoding.prototypes.shape == (4,)
    assert encoding.commitment.ndim == 0
    VqFlowLoss()(encoding.latents, encoding.log_jacobian, encoding.commitment).backward()
    # The frozen backbone gets nothing; every trainable part gets a gradient through the straight-through codes.
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    for part in (model.concept_encoder, model.pattern_encoder, model.parallel_flows, model.prior, model.fusion_flow):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad), type(part).__name__
    output = model.eval()(images)
    assert isinstance(output, InferenceBatch)
    assert output.pred_score.shape == (4,)
    assert output.anomaly_map.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.all(torch.isfinite(output.pred_score))


def test_eval_mode_leaves_codebooks_alone() -> None:
    torch.manual_seed(0)
    model = VqFlowModel(pre_trained=False, **TINY).eval()
    before = {name: codebook.codebook.clone() for name, codebook in model.codebooks.items()}
    model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    for name, codebook in model.codebooks.items():
        torch.testing.assert_close(codebook.codebook, before[name], rtol=0, atol=0)


def test_prior_log_det_reaches_the_model_log_jacobian() -> None:
    """Exact vs official prior: the total log-Jacobians differ by exactly -sum_l H_l W_l sum_c log s_c."""
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    log_jacobians = []
    for log_det in (True, False):
        torch.manual_seed(0)
        model = VqFlowModel(pre_trained=False, prior_log_det=log_det, **TINY).eval()
        for head in model.prior.scale_heads:
            torch.nn.init.constant_(head.bias, 2.0)  # s = sqrt(4 + 1e-8) per channel
        with torch.no_grad():
            log_jacobians.append(model.encode(images).log_jacobian)
    # Latent grids 8x8, 4x4, 2x2 with 24, 40, 112 channels.
    expected = -(64 * 24 + 16 * 40 + 4 * 112) * 0.5 * torch.log(torch.tensor(4.0 + 1e-8))
    torch.testing.assert_close(log_jacobians[0] - log_jacobians[1], expected.expand(2), rtol=1e-4, atol=1e-3)


def test_loss_by_hand() -> None:
    latents = [torch.ones(1, 2, 1, 1)]
    # 0.5 * 2 - 0.5 + 2 * 0.25
    assert VqFlowLoss(commitment_weight=2.0)(latents, torch.tensor([0.5]), torch.tensor(0.25)).item() == 1.0


def test_paper_architecture_has_the_published_size() -> None:
    """1,088-channel conditions: about 309M trainable parameters (the spec's count from the official layer shapes)."""
    model = VqFlowModel(backbone="convnextv2_base", pre_trained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 305e6 < trainable < 313e6
    assert model.parallel_flows.flows[0][0].subnet.__class__.__name__ == "ConvLayerNormSubnet"


def test_layers_need_a_conditioning_stage() -> None:
    with pytest.raises(ValueError, match="conditioning stage"):
        VqFlowModel(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), pre_trained=False, num_blocks=(1, 1, 1))


def test_calibration_lets_one_threshold_serve_every_concept() -> None:
    """Two concepts on different score scales: pooled AUROC is poor raw and equals the per-concept AUROC calibrated."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.tensor([0] * 50 + [1] * 50)
    offsets = torch.where(prototypes == 0, 0.0, 100.0)
    scales = torch.where(prototypes == 0, 1.0, 20.0)
    good = offsets + scales * torch.randn(100, generator=generator)
    calibration = ConceptCalibration(num_prototypes=3)
    maps = good.view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    calibration.fit(good, *image_moments(maps), prototypes)
    assert calibration.images_per_prototype.tolist() == [50, 50, 0]
    test_prototypes = torch.tensor([0] * 20 + [1] * 20)
    labels = torch.tensor(([0] * 10 + [1] * 10) * 2)
    test_offsets = torch.where(test_prototypes == 0, 0.0, 100.0)
    test_scales = torch.where(test_prototypes == 0, 1.0, 20.0)
    test_scores = test_offsets + test_scales * (torch.randn(40, generator=generator) + 4.0 * labels)
    calibrated, _ = calibration(test_scores, test_scores.view(-1, 1, 1, 1), test_prototypes)
    per_concept = [
        auroc(test_scores[test_prototypes == k].numpy(), labels[test_prototypes == k].numpy()) for k in (0, 1)
    ]
    assert auroc(test_scores, labels) < 0.8
    assert auroc(calibrated, labels) > min(per_concept) - 0.02
    # A prototype that no good image chose is standardised with the statistics of all of them.
    assert calibration.score_location[2] == pytest.approx(float(good.double().mean()), rel=1e-5)


def test_calibration_needs_enough_images() -> None:
    with pytest.raises(ValueError, match="min_images=3"):
        ConceptCalibration(num_prototypes=2).fit(torch.ones(2), torch.ones(2), torch.ones(2), torch.zeros(2).long())


def test_training_logs_codebook_health_and_fits_calibration(demo_root: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = VqFlow(
        **TINY,
        restart_dead_codes=True,
        min_calibration_images=1,
        pre_processor=VqFlow.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    )
    datamodule = MultiClassMVTecAD(
        root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0, val_split_ratio=0.25, seed=0
    )
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    health = model.codebook_health
    assert set(health) >= {"prototypes_perplexity", "prototypes_unused", "patterns_3_unused", "prototype_nmi"}
    # No collapse: more than one prototype in use.
    assert health["prototypes_unused"] <= 2
    assert 1.5 <= health["prototypes_perplexity"] <= 4.0
    assert 0.5 <= health["prototype_purity"] <= 1.0
    assert engine.trainer.callback_metrics["codebook/prototypes_perplexity"] == pytest.approx(
        health["prototypes_perplexity"]
    )
    calibration = model.model.calibration
    assert calibration.fitted
    assert int(calibration.images_per_prototype.sum()) == len(datamodule.val_data)


def test_calibration_refuses_a_validation_split_of_test_images(demo_root: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = VqFlow(**TINY, pre_processor=VqFlow.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    datamodule = MultiClassMVTecAD(
        root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0, val_split_mode="same_as_test", seed=0
    )
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    assert not model.model.calibration.fitted
