"""MSFlow: outputs, loss and backbone stages (trained-model checks are in test_unified_models.py)."""

import torch
from anomalib.data import InferenceBatch

from anomalib_vqflow.models.msflow.loss import MsFlowLoss
from anomalib_vqflow.models.msflow.torch_model import MsFlowModel

IMAGE_SIZE = 64


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
