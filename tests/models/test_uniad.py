"""UniAD's own pieces: the neighbour mask by hand, the jitter's scale, masked attention, scoring, paper size."""

from pathlib import Path

import lightning
import pytest
import torch
from torch import nn

from anomalib_vqflow.models import UniAd
from anomalib_vqflow.models.uniad.anomaly_map import UniAdAnomalyMapGenerator
from anomalib_vqflow.models.uniad.layers import NeighborMaskedEncoderLayer, feature_jitter, neighbor_mask
from anomalib_vqflow.models.uniad.loss import UniAdLoss
from anomalib_vqflow.models.uniad.torch_model import UniAdModel


def _tiny_model(input_size: tuple[int, int] = (64, 64), **kwargs: object) -> UniAdModel:
    arguments = {
        "backbone": "tf_efficientnet_lite0",
        "pre_trained": False,
        "hidden_channels": 16,
        "num_heads": 2,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "feedforward_channels": 32,
        "neighbor_size": 3,
    }
    return UniAdModel(input_size, **(arguments | kwargs))


def test_neighbor_mask_by_hand() -> None:
    """4 x 4 grid, 3 x 3 neighbourhood; positions are numbered row by row (position 5 is row 1, column 1)."""
    mask = neighbor_mask(4, 4, size=3)
    blocked = {position: set(torch.nonzero(mask[position]).flatten().tolist()) for position in (0, 5, 7, 15)}
    assert blocked[0] == {0, 1, 4, 5}
    assert blocked[5] == {0, 1, 2, 4, 5, 6, 8, 9, 10}
    assert blocked[7] == {2, 3, 6, 7, 10, 11}
    assert blocked[15] == {10, 11, 14, 15}
    assert torch.equal(mask, mask.T)
    assert torch.equal(neighbor_mask(3, 2, size=1), torch.eye(6, dtype=torch.bool))


@pytest.mark.parametrize("size", [3, 4, 7])
def test_neighbor_mask_matches_the_official_window(size: int) -> None:
    """The window of the official ``generate_mask``: rows ``[i - size//2, i + size//2]``, cut at the border."""
    height, width = 9, 11
    expected = torch.zeros(height, width, height, width, dtype=torch.bool)
    for row in range(height):
        for column in range(width):
            expected[
                row,
                column,
                max(row - size // 2, 0) : min(row + size // 2 + 1, height),
                max(column - size // 2, 0) : min(column + size // 2 + 1, width),
            ] = True
    assert torch.equal(neighbor_mask(height, width, size), expected.view(height * width, height * width))


def test_a_neighbourhood_as_large_as_the_grid_is_refused() -> None:
    """7 x 7 on the 4 x 4 grid of 64 px images would leave the inner positions nothing to attend to."""
    with pytest.raises(ValueError, match=r"neighbor_size=7 .* 4x4 feature grid of 64x64"):
        _tiny_model((64, 64), neighbor_size=7)
    assert _tiny_model((128, 128), neighbor_size=7).grid == (8, 8)


def test_feature_jitter_scale() -> None:
    """The noise per channel has standard deviation ``scale * ||f|| / C`` and mean zero."""
    torch.manual_seed(0)
    channels = 64
    tokens = torch.randn(4000, channels) * torch.rand(4000, 1) * 10
    noise = feature_jitter(tokens, scale=20.0) - tokens
    relative = noise / (tokens.norm(dim=1, keepdim=True) / channels)
    assert relative.std().item() == pytest.approx(20.0, rel=0.01)
    assert relative.mean().abs().item() < 0.1
    assert torch.equal(feature_jitter(tokens, scale=20.0, probability=0.0), tokens)


def test_jitter_only_while_training_and_the_target_stays_clean() -> None:
    torch.manual_seed(0)
    model = _tiny_model(dropout=0.0)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model.train()
        jittered = model(images)
        model.eval()
        target = model.features(images)
        clean = model.reconstruct(target)
        again = model(images)
    torch.testing.assert_close(jittered.target, target, rtol=0, atol=0)
    assert not torch.allclose(jittered.reconstruction, clean)
    assert torch.equal(model(images).pred_score, again.pred_score)
    model.jitter_scale = 0.0
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(images).reconstruction, clean)


def _position_unchanged(before: torch.Tensor, after: torch.Tensor, positions: list[int]) -> bool:
    return torch.allclose(before[:, positions], after[:, positions], atol=1e-6)


def test_decoder_never_sees_a_position_or_its_neighbours() -> None:
    """Without encoder layers, changing the feature of one position leaves its reconstruction and its
    neighbours' untouched (both decoder attentions are masked); without the mask it changes them."""
    torch.manual_seed(0)
    grid = (6, 6)
    neighbours = [7, 8, 9, 13, 14, 15, 19, 20, 21]  # the 3 x 3 window around row 2, column 2 (position 14)
    target = torch.randn(1, 192, *grid)  # tf_efficientnet_lite0: 16 + 24 + 40 + 112 channels
    changed = target.clone()
    changed[0, :, 2, 2] += 5.0
    for neighbor_size, unchanged in ((3, True), (None, False)):
        model = _tiny_model((96, 96), num_encoder_layers=0, neighbor_size=neighbor_size).eval()
        with torch.no_grad():
            before = model.reconstruct(target).flatten(start_dim=2).transpose(1, 2)
            after = model.reconstruct(changed).flatten(start_dim=2).transpose(1, 2)
        assert _position_unchanged(before, after, neighbours) is unchanged, neighbor_size
        assert not _position_unchanged(before, after, [0, 35]), "the rest of the grid does read the change"


def test_encoder_attention_is_masked() -> None:
    """An encoder layer's output at a position does not move when a neighbour (not itself) changes."""
    torch.manual_seed(0)
    layer = NeighborMaskedEncoderLayer(channels=8, num_heads=2, feedforward_channels=16, dropout=0.0).eval()
    tokens, position = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    changed = tokens.clone()
    changed[0, 6] += 3.0  # row 1, column 2: a neighbour of position 5 (row 1, column 1), far from 15
    mask = neighbor_mask(4, 4, size=3)
    with torch.no_grad():
        before, after = layer(tokens, position, mask), layer(changed, position, mask)
    assert _position_unchanged(before, after, [5])
    assert not _position_unchanged(before, after, [15])


def test_anomaly_map_and_score_by_hand() -> None:
    """The map is the error norm at the grid points (corners aligned); the score is the best window mean."""
    torch.manual_seed(0)
    target = torch.zeros(1, 2, 3, 3)
    reconstruction = target.clone()
    reconstruction[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # error 5 at the top-left cell
    reconstruction[0, 0, 2, 2] = 1.0
    score, anomaly_map = UniAdAnomalyMapGenerator(pool_size=3)(reconstruction, target, (9, 9))
    assert anomaly_map[0, 0, 0, 0].item() == pytest.approx(5.0)
    assert anomaly_map[0, 0, 8, 8].item() == pytest.approx(1.0)
    assert anomaly_map[0, 0, 4, 4].item() == pytest.approx(0.0)
    # Corners aligned: pixel 1 of 9 sits a quarter of the way from grid point 0 to 1 (5.0 without alignment).
    assert anomaly_map[0, 0, 0, 1].item() == pytest.approx(0.75 * 5.0)
    windows = [anomaly_map[0, 0, i : i + 3, j : j + 3].mean() for i in range(7) for j in range(7)]
    assert score.item() == pytest.approx(max(windows).item())
    assert score.item() < 5.0


def test_loss_is_the_mean_squared_error_and_leaves_the_target_alone() -> None:
    reconstruction = torch.tensor([[1.0, 3.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = UniAdLoss()(reconstruction, target)
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)
    loss.backward()
    assert target.grad is None
    torch.testing.assert_close(reconstruction.grad, torch.tensor([[1.0, 2.0]]))


def test_other_image_sizes_are_refused() -> None:
    model = _tiny_model((64, 64)).eval()
    with pytest.raises(ValueError, match=r"built for 64x64 images .* got 96x64"):
        model(torch.rand(1, 3, 96, 64))


def test_paper_size() -> None:
    """efficientnet_b4 at 224 px: 272 channels on a 14 x 14 grid, 7,717,392 trainable parameters.

    By hand: projections 272*256+256 + 256*272+272, position 2*14*128, 4 encoder layers of
    4*256*256+4*256 (attention) + 2*256*1024+1024+256 (FFN) + 2*2*256 (norms), 4 decoder layers of
    twice that attention, the FFN, three norms and 196*256 queries, and the final norm. The spec
    counts about 7.7M.
    """
    model = UniAd(backbone="efficientnet_b4", pre_trained=False)
    assert model.model.grid == (14, 14)
    assert model.model.input_projection.in_features == 272
    attention, feedforward, norm = 4 * 256 * 256 + 4 * 256, 2 * 256 * 1024 + 1024 + 256, 2 * 256
    encoder = attention + feedforward + 2 * norm
    decoder = 2 * attention + feedforward + 3 * norm + 196 * 256
    by_hand = (272 * 256 + 256) + (256 * 272 + 272) + 2 * 14 * 128 + 4 * encoder + 4 * decoder + norm
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    assert trainable == by_hand == 7_717_392


def test_xavier_initialisation() -> None:
    """Xavier-uniform linear layers with zero bias everywhere in the transformer; N(0, 1) queries; U[0, 1) positions."""
    torch.manual_seed(0)
    model = _tiny_model(hidden_channels=64, feedforward_channels=128, num_decoder_layers=2)
    linears = [
        model.input_projection,
        model.encoder[0].feedforward[0],
        model.encoder[0].attention.out_proj,
        model.decoder[1].previous_attention.out_proj,
        model.decoder[1].feedforward[3],
        model.output_projection,
    ]
    for linear in linears:
        bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
        assert linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(linear.bias) == 0
    assert model.decoder[0].query.std().item() == pytest.approx(1.0, abs=0.1)
    embedding = model.position_embedding.row_embedding
    assert embedding.min() >= 0
    assert embedding.max() < 1


def test_checkpoint_of_another_input_size_rebuilds_the_model(tmp_path: Path) -> None:
    """``load_from_checkpoint`` builds the default 224 px model first; the checkpoint's 64 px pre-processor wins."""
    model = UniAd(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        hidden_channels=16,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        feedforward_channels=32,
        neighbor_size=3,
        pre_processor=UniAd.configure_pre_processor((64, 64)),
    )
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    path = tmp_path / "uniad.ckpt"
    torch.save(checkpoint, path)
    restored = UniAd.load_from_checkpoint(path, weights_only=True).eval()
    assert restored.model.grid == (4, 4)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).pred_score, model.eval().model(images).pred_score)
    assert torch.equal(restored.model.position_embedding(), model.model.position_embedding())


def test_stages_are_resampled_with_aligned_corners() -> None:
    """Every stage meets the 4 x 4 grid of 64 px images corner to corner (``align_corners=True``)."""
    torch.manual_seed(0)
    model = _tiny_model().eval()
    images = torch.rand(1, 3, 64, 64)
    target = model.features(images)
    stages = model.feature_extractor(images)
    assert [stage.shape[-1] for stage in stages] == [32, 16, 8, 4]
    offset = 0
    for stage in stages:
        channels = slice(offset, offset + stage.shape[1])
        for row, column in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            torch.testing.assert_close(target[0, channels, row, column], stage[0, :, row, column])
        offset += stage.shape[1]
    assert offset == target.shape[1] == 192


def test_average_resampling_takes_the_mean_of_every_grid_cell() -> None:
    torch.manual_seed(0)
    model = _tiny_model(stage_resampling="average").eval()
    images = torch.rand(1, 3, 64, 64)
    target = model.features(images)
    finest = model.feature_extractor(images)[0]  # 32 x 32 onto the 4 x 4 grid: 8 x 8 cells
    torch.testing.assert_close(target[0, : finest.shape[1], 1, 2], finest[0, :, 8:16, 16:24].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="stage_resampling must be 'bilinear' or 'average'"):
        _tiny_model(stage_resampling="nearest")


def test_optimiser_schedule_and_clipping_are_the_papers() -> None:
    model = UniAd(backbone="tf_efficientnet_lite0", pre_trained=False, hidden_channels=16, num_heads=2)
    configuration = model.configure_optimizers()
    optimizer, scheduler = configuration["optimizer"], configuration["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 1e-4, (0.9, 0.999))
    trainable = {id(p) for p in model.model.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable
    assert not any(p.requires_grad for p in model.model.feature_extractor.parameters())
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma, configuration["lr_scheduler"]["interval"]) == (800, 0.1, "epoch")
    assert model.trainer_arguments["gradient_clip_val"] == 0.1
    assert model.trainer_arguments["gradient_clip_algorithm"] == "norm"


def _attention(
    attention: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The same attention in the official sequence-first layout (L, N, C) with an additive -inf mask."""
    reference = nn.MultiheadAttention(attention.embed_dim, attention.num_heads)
    reference.load_state_dict(attention.state_dict())
    additive = torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
    return reference.eval()(query, key, value, attn_mask=additive)[0]


def test_transformer_matches_a_reference_written_from_the_paper() -> None:
    """The encoder and decoder, recomputed step by step in the official (L, N, C) layout, on a 5 x 7 grid.

    Post-norm; position added to queries and keys only; decoder queries learned per layer,
    attention 1 on the encoder output, attention 2 on the previous decoder layer's output (the
    encoder output for the first), residuals from the query; a final LayerNorm.
    """
    torch.manual_seed(0)
    model = _tiny_model((80, 112), num_encoder_layers=2, num_decoder_layers=3).eval()
    assert model.grid == (5, 7)
    target = torch.randn(2, 192, 5, 7)
    mask = model.attention_mask
    tokens = model.input_projection(target.flatten(start_dim=2).permute(2, 0, 1))  # (L, N, C)
    position = model.position_embedding().unsqueeze(1)
    with torch.no_grad():
        memory = tokens
        for layer in model.encoder:
            attended = _attention(layer.attention, memory + position, memory + position, memory, mask)
            memory = layer.norm1(memory + attended)
            memory = layer.norm2(memory + layer.feedforward(memory))
        previous = memory
        for layer in model.decoder:
            query = layer.query.unsqueeze(1).expand(-1, 2, -1)
            attended = _attention(layer.memory_attention, query + position, memory + position, memory, mask)
            current = layer.norm1(query + attended)
            attended = _attention(layer.previous_attention, current + position, previous + position, previous, mask)
            current = layer.norm2(current + attended)
            previous = layer.norm3(current + layer.feedforward(current))
        expected = model.output_projection(model.decoder_norm(previous)).permute(1, 2, 0).reshape(target.shape)
        torch.testing.assert_close(model.reconstruct(target), expected, rtol=1e-5, atol=1e-5)


def test_neighbor_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1; got 0"):
        neighbor_mask(4, 4, size=0)
