"""EMA vector quantizers: hand-computed updates, straight-through gradients, residuals, restarts, export form."""

import pytest
import torch

from anomalib_vqflow.components.quantizers import VectorQuantizer, codebook_statistics, residual_quantize


def _quantizer(codes: list[list[float]], **kwargs: float | bool) -> VectorQuantizer:
    quantizer = VectorQuantizer(num_codes=len(codes), dim=len(codes[0]), **kwargs)
    quantizer.codebook.copy_(torch.tensor(codes))
    return quantizer


def test_ema_update_by_hand() -> None:
    quantizer = _quantizer([[0.0], [10.0], [-50.0]], decay=0.5, eps=0.0)
    output = quantizer.train()(torch.tensor([[1.0], [2.0], [9.0]]))
    assert output.indices.tolist() == [0, 0, 1]
    # cluster sizes 0.5 * [2, 1, 0], code sums 0.5 * [3, 9, 0]: means 1.5 and 9; the unused code stays put.
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[1.5], [9.0], [-50.0]]))
    quantizer(torch.tensor([[3.0], [11.0]]))
    # cluster sizes 0.5 * [1, 0.5, 0] + 0.5 * [1, 1, 0] = [1, 0.75, 0]; sums 0.5 * [1.5, 4.5] + 0.5 * [3, 11].
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor([1.0, 0.75, 0.0]))
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[2.25], [7.75 / 0.75], [-50.0]]))
    assert quantizer.usage.tolist() == [3.0, 2.0, 0.0]


def test_laplace_smoothing_by_hand() -> None:
    quantizer = _quantizer([[0.0], [10.0]], decay=0.0, eps=0.5)
    quantizer.train()(torch.tensor([[1.0], [3.0], [9.0]]))
    # sizes [2, 1], n = 3: smoothed = (size + 0.5) / (3 + 1) * 3 = [1.875, 1.125]
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[4.0 / 1.875], [9.0 / 1.125]]))


def test_eval_mode_does_not_touch_the_codebook() -> None:
    quantizer = _quantizer([[0.0], [10.0]])
    before = quantizer.codebook.clone()
    quantizer.eval()(torch.tensor([[1.0], [9.0]]))
    torch.testing.assert_close(quantizer.codebook, before, rtol=0, atol=0)
    assert quantizer.usage.sum() == 0


def test_straight_through_gradient_and_commitment() -> None:
    quantizer = _quantizer([[0.0, 0.0], [4.0, 4.0]]).eval()
    inputs = torch.tensor([[1.0, -1.0], [3.0, 5.0]], requires_grad=True)
    output = quantizer(inputs)
    torch.testing.assert_close(output.quantized, torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    # mean of squared errors: (1 + 1 + 1 + 1) / 4
    assert output.commitment.item() == pytest.approx(1.0)
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (output.quantized * weights).sum().backward()
    torch.testing.assert_close(inputs.grad, weights)


def test_commitment_gradient_pulls_inputs_towards_codes() -> None:
    quantizer = _quantizer([[0.0]]).eval()
    inputs = torch.tensor([[2.0]], requires_grad=True)
    quantizer(inputs).commitment.backward()
    assert inputs.grad.item() == pytest.approx(4.0)  # d/dx (x - 0)^2 at x = 2


def test_maps_keep_their_layout() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=5, dim=3).eval()
    maps = torch.randn(2, 3, 4, 6)
    output = quantizer(maps)
    assert output.indices.shape == (2, 4, 6)
    expected = quantizer.codebook[output.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(output.quantized, expected)
    nearest = torch.cdist(maps.permute(0, 2, 3, 1).reshape(-1, 3), quantizer.codebook).argmin(dim=1)
    assert output.indices.flatten().tolist() == nearest.tolist()


def test_residual_quantization_reconstructs_around_the_base() -> None:
    quantizer = _quantizer([[0.0, 0.0], [1.0, -1.0]]).eval()
    base = torch.tensor([[5.0, 5.0], [-2.0, 0.0]])
    features = base + torch.tensor([[1.0, -1.0], [0.1, 0.0]])
    output = residual_quantize(quantizer, features, base)
    # The first residual is a code: exact reconstruction; the second snaps to the zero code: the base.
    torch.testing.assert_close(output.quantized, torch.tensor([[6.0, 4.0], [-2.0, 0.0]]))
    assert output.indices.tolist() == [1, 0]


def test_dead_codes_restart_on_inputs() -> None:
    torch.manual_seed(0)
    quantizer = _quantizer([[0.0], [100.0], [200.0]], restart_dead_codes=True, eps=0.0)
    inputs = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    quantizer.train()(inputs)
    # Codes 1 and 2 were never chosen: they now sit on input vectors and can win next time.
    assert set(quantizer.codebook[1:, 0].tolist()) <= {1.0, 2.0, 3.0, 4.0}
    assert quantizer.codebook[0, 0].item() == pytest.approx(2.5)
    without = _quantizer([[0.0], [100.0], [200.0]])
    without.train()(inputs)
    assert without.codebook[1:, 0].tolist() == [100.0, 200.0]


def test_codebook_statistics() -> None:
    assert codebook_statistics(torch.tensor([1.0, 1.0, 1.0, 1.0])) == (4.0, 0)
    assert codebook_statistics(torch.tensor([8.0, 0.0, 0.0])) == (1.0, 2)
    assert codebook_statistics(torch.zeros(3)) == (0.0, 3)


def test_wrong_channel_count_is_named() -> None:
    with pytest.raises(ValueError, match="Expected 3 channels"):
        VectorQuantizer(num_codes=2, dim=3)(torch.randn(2, 4))


def _update_on_one_rank(rank: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    quantizer = _quantizer([[0.0], [10.0], [-50.0]], decay=0.5, eps=0.0).train()
    # The hand-computed batch of test_ema_update_by_hand, split over the two ranks.
    quantizer(torch.tensor([[1.0], [2.0]]) if rank == 0 else torch.tensor([[9.0]]))
    torch.save(quantizer.state_dict() | {"usage": quantizer.usage}, f"{result_file}{rank}")
    torch.distributed.destroy_process_group()


def test_distributed_update_adds_up_all_ranks_batches(tmp_path) -> None:
    torch.multiprocessing.spawn(
        _update_on_one_rank, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True
    )
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}", weights_only=True)
        # As one process with the whole batch [1, 2, 9], on both ranks: not rank 0's [1, 2] alone.
        torch.testing.assert_close(state["cluster_size"], torch.tensor([1.0, 0.5, 0.0]))
        torch.testing.assert_close(state["codebook"], torch.tensor([[1.5], [9.0], [-50.0]]))
        assert state["usage"].tolist() == [2.0, 1.0, 0.0]
