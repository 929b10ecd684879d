"""UniAD's transformer layers: the neighbour mask, the feature jitter, the encoder and layer-wise-query decoder layers.

What :class:`~.torch_model.UniAdModel` stacks (see its module for the pipeline): post-norm layers
whose every attention is blind to the position's own ``k x k`` neighbourhood
(:func:`neighbor_mask`), learned position embeddings, decoder layers with their own learned query
per grid position, the training-time :func:`feature_jitter`, and UniAD's initialisation
(:func:`xavier_uniform_linear`).

Example:
    >>> neighbor_mask(3, 3, size=3)[4].tolist()  # the centre of a 3 x 3 grid is blind to all of it
    [True, True, True, True, True, True, True, True, True]
"""

import torch
from torch import nn


def neighbor_mask(height: int, width: int, size: int) -> torch.Tensor:
    """Attention mask of a ``height x width`` grid: ``True`` where a query may **not** attend to a key.

    Position ``(i, j)`` is blocked from every key ``(k, l)`` with ``|i - k| <= size // 2`` and
    ``|j - l| <= size // 2``: its ``size x size`` neighbourhood (``size + 1`` wide for even
    sizes), itself included, cut at the border, as the official ``generate_mask``. Rows and
    columns are positions in row-major order.

    Raises:
        ValueError: If ``size`` is below 1.

    Example:
        >>> neighbor_mask(2, 3, size=3).int()
        tensor([[1, 1, 0, 1, 1, 0],
                [1, 1, 1, 1, 1, 1],
                [0, 1, 1, 0, 1, 1],
                [1, 1, 0, 1, 1, 0],
                [1, 1, 1, 1, 1, 1],
                [0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    """
    if size < 1:
        msg = f"neighbor_size is the side of a window of grid positions, at least 1; got {size}."
        raise ValueError(msg)
    rows = torch.arange(height).repeat_interleave(width)
    columns = torch.arange(width).repeat(height)
    row_distance = (rows[:, None] - rows[None, :]).abs()
    column_distance = (columns[:, None] - columns[None, :]).abs()
    return (row_distance <= size // 2) & (column_distance <= size // 2)


def feature_jitter(tokens: torch.Tensor, scale: float, probability: float = 1.0) -> torch.Tensor:
    """Add Gaussian noise scaled by each token's norm: ``f + eps * scale * ||f||_2 / C`` with ``eps ~ N(0, I)``.

    With probability ``probability`` per call (per batch), as UniAD; otherwise ``tokens`` is
    returned unchanged. The norm is divided by the number of channels ``C``, not by ``sqrt(C)``, as
    in the official code: the noise's standard deviation per channel is ``scale / sqrt(C)`` times the
    token's root-mean-square value.

    Args:
        tokens: Features of shape ``(..., C)``.
        scale: Noise scale (UniAD: 20).
        probability: Chance of jittering this call (UniAD: 1).
    """
    if torch.rand(()) >= probability:
        return tokens
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


class LearnedPositionEmbedding(nn.Module):
    """Learned 2-D position embedding: half of the channels per column, half per row, initialised uniform in [0, 1).

    Args:
        grid: ``(height, width)`` of the feature grid.
        channels: Embedding width (even); the column part comes first.

    Example:
        >>> LearnedPositionEmbedding(grid=(2, 3), channels=4)().shape  # one row per position, row-major
        torch.Size([6, 4])
    """

    def __init__(self, grid: tuple[int, int], channels: int) -> None:
        super().__init__()
        if channels % 2:
            msg = f"The position embedding splits its channels between rows and columns; got odd channels={channels}."
            raise ValueError(msg)
        self.grid = grid
        self.column_embedding = nn.Parameter(torch.rand(grid[1], channels // 2))
        self.row_embedding = nn.Parameter(torch.rand(grid[0], channels // 2))

    def forward(self) -> torch.Tensor:
        """Return the ``(height * width, channels)`` embedding, positions in row-major order."""
        height, width = self.grid
        columns = self.column_embedding.unsqueeze(0).expand(height, -1, -1)
        rows = self.row_embedding.unsqueeze(1).expand(-1, width, -1)
        return torch.cat([columns, rows], dim=-1).flatten(0, 1)


class _FeedForward(nn.Sequential):
    def __init__(self, channels: int, hidden_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(channels, hidden_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_channels, channels),
            nn.Dropout(dropout),
        )


class NeighborMaskedEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys only.

    Args:
        channels: Token width.
        num_heads: Attention heads.
        feedforward_channels: Hidden width of the feed-forward block.
        dropout: Dropout on attention weights, residual branches and the feed-forward block.

    Example:
        >>> layer = NeighborMaskedEncoderLayer(channels=8, num_heads=2, feedforward_channels=16, dropout=0.0)
        >>> tokens, position = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
        >>> mask = neighbor_mask(2, 3, size=1)  # each position blind to itself
        >>> layer(tokens, position, mask).shape
        torch.Size([2, 6, 8])
    """

    def __init__(self, channels: int, num_heads: int, feedforward_channels: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(channels)
        self.feedforward = _FeedForward(channels, feedforward_channels, dropout)
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Return the updated ``(N, L, C)`` tokens; ``mask`` is ``(L, L)`` with ``True`` where attention is blocked."""
        query = tokens + position
        attended = self.attention(query, query, tokens, attn_mask=mask, need_weights=False)[0]
        tokens = self.norm1(tokens + self.dropout(attended))
        return self.norm2(tokens + self.feedforward(tokens))


class LayerwiseQueryDecoderLayer(nn.Module):
    """Post-norm decoder layer whose query is its own learned embedding of every grid position.

    Attention 1 takes the layer's query (plus position) against the encoder output; attention 2
    takes the result against the previous decoder layer's output (the encoder output for the
    first layer). Because the query never comes from the input, the decoder cannot pass an
    anomalous feature straight through.

    Args:
        num_positions: Grid positions, one learned query each.
        channels: Token width.
        num_heads: Attention heads.
        feedforward_channels: Hidden width of the feed-forward block.
        dropout: Dropout on attention weights, residual branches and the feed-forward block.

    Example:
        >>> layer = LayerwiseQueryDecoderLayer(num_positions=6, channels=8, num_heads=2, feedforward_channels=16,
        ...                                    dropout=0.0)
        >>> memory, position = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
        >>> layer(memory, memory, position, None).shape
        torch.Size([2, 6, 8])
    """

    def __init__(
        self, num_positions: int, channels: int, num_heads: int, feedforward_channels: int, dropout: float
    ) -> None:
        super().__init__()
        # N(0, 1), the initialisation of the official nn.Embedding queries (Xavier only touches linear layers).
        self.query = nn.Parameter(torch.randn(num_positions, channels))
        self.memory_attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.previous_attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.feedforward = _FeedForward(channels, feedforward_channels, dropout)
        self.norm3 = nn.LayerNorm(channels)

    def forward(
        self, previous: torch.Tensor, memory: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Return ``(N, L, C)`` tokens from the previous layer's output and the encoder output ``memory``."""
        query = self.query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        attended = self.memory_attention(
            query + position, memory + position, memory, attn_mask=mask, need_weights=False
        )[0]
        tokens = self.norm1(query + self.dropout1(attended))
        attended = self.previous_attention(
            tokens + position, previous + position, previous, attn_mask=mask, need_weights=False
        )[0]
        tokens = self.norm2(tokens + self.dropout2(attended))
        return self.norm3(tokens + self.feedforward(tokens))


def xavier_uniform_linear(module: nn.Module) -> None:
    """UniAD's initialisation: Xavier-uniform weights and zero biases for every linear layer of ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
