"""Numerical checks of the shared flow blocks: invertibility and log-determinants against brute force."""

from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from torch.autograd.functional import jacobian

from anomalib_vqflow.components.flows import (
    ChannelLayerNorm,
    FusionCoupling,
    MlpSubnet,
    ParallelFlows,
    conditional_flow,
)
from anomalib_vqflow.components.positional import positional_encoding_2d


def _randomize(module: torch.nn.Module) -> None:
    """Move every parameter away from its identity-like initialisation, so that the checks see real couplings."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:  # fixed permutation matrices must stay orthogonal
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@pytest.fixture
def parallel_flows() -> ParallelFlows:
    torch.manual_seed(0)
    flows = ParallelFlows(channels=[3, 4], condition_channels=4, num_blocks=[2, 3]).double()
    _randomize(flows)
    return flows.eval()


@pytest.fixture
def fusion() -> FusionCoupling:
    torch.manual_seed(0)
    # Wide enough that the mixing network's hidden LayerNorm has several channels (a single one is constant).
    coupling = FusionCoupling(channels=[6, 9]).double()
    _randomize(coupling)
    return coupling.eval()


def _inputs(channels: tuple[int, int] = (3, 4)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    features = [
        torch.randn(2, channels[0], 4, 4, generator=generator, dtype=torch.float64),
        torch.randn(2, channels[1], 2, 2, generator=generator, dtype=torch.float64),
    ]
    conditions = [positional_encoding_2d(4, *f.shape[-2:]).double().expand(2, -1, -1, -1) for f in features]
    return features, conditions


def _brute_force_log_det(function, inputs: list[torch.Tensor], sample: int) -> float:
    """log|det| of the full Jacobian of one sample, all scales flattened into one vector."""
    sizes = [x[sample].numel() for x in inputs]
    shapes = [x[sample : sample + 1].shape for x in inputs]

    def flat(vector: torch.Tensor) -> torch.Tensor:
        parts = torch.split(vector, sizes)
        outputs = function([p.reshape(s) for p, s in zip(parts, shapes, strict=True)])
        return torch.cat([o.reshape(-1) for o in outputs])

    full = jacobian(flat, torch.cat([x[sample].reshape(-1) for x in inputs]))
    return torch.linalg.slogdet(full).logabsdet.item()


def test_parallel_flows_invert(parallel_flows: ParallelFlows) -> None:
    features, conditions = _inputs()
    latents, _ = parallel_flows(features, conditions)
    restored = parallel_flows.inverse(latents, conditions)
    for feature, back in zip(features, restored, strict=True):
        torch.testing.assert_close(back, feature, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(latents[0], features[0])


def test_parallel_flows_log_det_matches_brute_force(parallel_flows: ParallelFlows) -> None:
    features, conditions = _inputs()
    _, log_jacobian = parallel_flows(features, conditions)
    for sample in range(2):
        sample_conditions = [c[sample : sample + 1] for c in conditions]
        expected = _brute_force_log_det(
            lambda xs, cs=sample_conditions: parallel_flows(xs, cs)[0],
            features,
            sample,
        )
        assert log_jacobian[sample].item() == pytest.approx(expected, abs=1e-8)


def test_fusion_coupling_inverts(fusion: FusionCoupling) -> None:
    features, _ = _inputs((6, 9))
    outputs, _ = fusion(features)
    restored = fusion.inverse(outputs)
    for feature, back in zip(features, restored, strict=True):
        torch.testing.assert_close(back, feature, atol=1e-10, rtol=1e-10)


def test_fusion_coupling_log_det_matches_brute_force(fusion: FusionCoupling) -> None:
    features, _ = _inputs((6, 9))
    _, log_jacobian = fusion(features)
    for sample in range(2):
        expected = _brute_force_log_det(lambda xs: fusion(xs)[0], features, sample)
        assert log_jacobian[sample].item() == pytest.approx(expected, abs=1e-8)
    assert abs(log_jacobian[0].item()) > 1e-3


def test_fusion_coupling_mixes_scales(fusion: FusionCoupling) -> None:
    features, _ = _inputs((6, 9))
    changed = [features[0], features[1] + 1.0]
    first, _ = fusion(features)
    second, _ = fusion(changed)
    assert not torch.allclose(first[0], second[0]), "the fine scale must depend on the coarse one"


def test_num_blocks_must_match_scales() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        ParallelFlows(channels=[3, 4], condition_channels=4, num_blocks=[2])


def test_vector_flow_with_soft_permutations_inverts_and_has_exact_log_det() -> None:
    """HGAD's per-pixel flow: MLP subnets, random rotations, one log-Jacobian per vector."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - FrEIA draws the rotations from NumPy's global generator
    flow = conditional_flow(5, 4, 3, subnet_constructor=MlpSubnet, permute_soft=True, spatial=False).double()
    _randomize(flow)
    flow.eval()
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    condition = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    latents, log_jacobian = flow(vectors, c=[condition])
    assert log_jacobian.shape == (6,)
    # The rotations are stored in float32, so they are orthogonal (and of determinant 1) to about 1e-7 only.
    torch.testing.assert_close(flow(latents, c=[condition], rev=True)[0], vectors, rtol=0, atol=1e-6)
    for row in range(6):
        full = jacobian(lambda x, r=row: flow(x.unsqueeze(0), c=[condition[r : r + 1]])[0].squeeze(0), vectors[row])
        assert log_jacobian[row].item() == pytest.approx(torch.linalg.slogdet(full).logabsdet.item(), abs=1e-5)


def test_channel_layer_norm_exports_the_same_normalisation(tmp_path: Path) -> None:
    """The form written for export (channel axis, no transposes) equals nn.LayerNorm on channels-last views."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.norm.weight.normal_()
        norm.norm.bias.normal_()
    x = 3.0 * torch.randn(2, 6, 5, 7) + 1.0
    with torch.no_grad():
        expected = norm.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    path = tmp_path / "norm.onnx"
    torch.onnx.export(norm, (x,), str(path), dynamo=True)
    graph = onnx.load(str(path)).graph
    assert "Transpose" not in {node.op_type for node in graph.node}
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled([x.numpy()])[0], expected.numpy(), rtol=0, atol=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["norm.weight", "norm.bias"]
