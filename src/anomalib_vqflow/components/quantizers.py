"""Vector quantizers with exponential-moving-average codebooks (VQ-VAE-2 style).

:class:`VectorQuantizer` maps every vector of its input to the nearest of ``num_codes``
learned codes, passes gradients straight through, and returns a commitment loss
``mean((sg[q] - x)^2)``; its codebook is not trained by gradients but follows the inputs
assigned to each code with an exponential moving average (decay 0.99, Laplace-smoothed
cluster sizes, eps 1e-5). :func:`residual_quantize` quantizes features *relative to a
base* (``base + VQ(features - base)``), as VQ-Flow's pattern codebooks do around the
positional code and the image's prototype.

Three deliberate differences from the VQ-VAE-2 reference code that VQ-Flow uses:

- the moving averages start at zero (cluster sizes and code sums), and a code only moves
  when inputs are assigned to it. The reference starts the code sums at the initial
  codebook with zero cluster sizes, so that a code's first update is dominated by
  ``0.99 * init / (0.01 * count)`` (the random initialisation scaled up by ~100x) and
  every code that is never picked is divided by ``eps`` (1e-5) and flung out of reach for good;
- optional dead-code restarts move every code whose moving cluster size is below
  ``dead_code_threshold`` onto a random input vector of the current batch (codes that were
  never picked are restarted at the first training step, which amounts to initialising the
  codebook from the data). VQ-Flow's ``reAssign`` instead copies the most used codes onto
  unused ones, at most half the codebook, once per epoch;
- in training, the quantized output and the commitment use the codebook *after* this
  step's update (the reference looks the codes up before it), so the commitment pulls
  towards where the codes now are.

Under distributed data parallel, the counts and sums of every step are added up over the
ranks before they enter the moving averages (as ``SyncBatchNorm`` does with its
statistics), so the codebook follows all ranks' batches, as one process would with their
union, instead of rank 0's alone (DDP's buffer broadcast would otherwise keep rank 0's).

Distances are computed as ``|x|^2 - 2 x.E^T + |E|^2`` with one matrix product, which
exports to ONNX and OpenVINO (``torch.cdist`` does not).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> quantizer = VectorQuantizer(num_codes=4, dim=3)
    >>> output = quantizer(torch.randn(2, 3, 5, 5))
    >>> output.quantized.shape, output.indices.shape, output.commitment.shape
    (torch.Size([2, 3, 5, 5]), torch.Size([2, 5, 5]), torch.Size([]))
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .kmeans import squared_distances


class QuantizerOutput(NamedTuple):
    """What a quantizer returns.

    Attributes:
        quantized: The quantized input, same shape, with straight-through gradients.
        indices: Index of the chosen code of every vector, the input's shape without channels.
        commitment: ``mean((sg[quantized] - input)^2)``, a scalar.

    Example:
        >>> import torch
        >>> quantizer = VectorQuantizer(num_codes=2, dim=1).eval()
        >>> _ = quantizer.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        >>> output = quantizer(torch.tensor([[1.0], [9.0]]))
        >>> output.quantized.tolist(), output.indices.tolist(), output.commitment.item()
        ([[0.0], [10.0]], [0, 1], 1.0)
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor


def codebook_statistics(usage: torch.Tensor) -> tuple[float, int]:
    """Perplexity ``exp(entropy)`` of the code usage counts ``(K,)``, and how many codes were never used.

    Perplexity is the effective number of codes in use: ``K`` for uniform use, 1 for a collapse.

    >>> codebook_statistics(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    (2.0, 2)
    """
    total = usage.sum()
    if total <= 0:
        return 0.0, int(usage.numel())
    probabilities = usage[usage > 0] / total
    entropy = -(probabilities * probabilities.log()).sum()
    return round(float(entropy.exp()), 6), int((usage == 0).sum())


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA codebook, straight-through gradients and a commitment loss.

    The channel axis is dimension 1: inputs may be ``(N, D)`` vectors or ``(N, D, H, W)`` maps.
    In training mode each forward updates the codebook and counts code use in ``usage``
    (reset it with :meth:`reset_usage`, for example every epoch).

    Args:
        num_codes: Number of codes ``K``.
        dim: Dimension ``D`` of every code.
        decay: Decay of the moving averages (VQ-VAE-2 and VQ-Flow: 0.99).
        eps: Laplace smoothing of the cluster sizes.
        restart_dead_codes: Move codes whose moving cluster size falls below
            ``dead_code_threshold`` onto random inputs of the current training batch.
        dead_code_threshold: Moving cluster size (average assignments per step) under which a code is dead.

    Example:
        >>> import torch
        >>> quantizer = VectorQuantizer(num_codes=2, dim=1, decay=0.0, eps=0.0).train()
        >>> _ = quantizer.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        >>> _ = quantizer(torch.tensor([[1.0], [3.0], [9.0]]))  # decay 0: every code jumps to the mean of its inputs
        >>> quantizer.codebook.squeeze(1).tolist(), quantizer.usage.tolist()
        ([2.0, 9.0], [2.0, 1.0])
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1e-3,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            msg = f"A codebook needs at least one code of one dimension, got num_codes={num_codes}, dim={dim}."
            raise ValueError(msg)
        if not 0.0 <= decay < 1.0:
            msg = f"decay must be in [0, 1), got decay={decay}."
            raise ValueError(msg)
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("code_sum", torch.zeros(num_codes, dim))
        self.register_buffer("usage", torch.zeros(num_codes), persistent=False)

    def reset_usage(self) -> None:
        """Start counting code use afresh."""
        self.usage.zero_()

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every row of ``vectors (M, D)``."""
        return squared_distances(vectors, self.codebook).argmin(dim=1)

    def forward(self, inputs: torch.Tensor) -> QuantizerOutput:
        """Quantize ``inputs`` (channels on dimension 1); update the codebook in training mode."""
        if inputs.shape[1] != self.dim:
            msg = f"Expected {self.dim} channels on dimension 1, got input of shape {tuple(inputs.shape)}."
            raise ValueError(msg)
        channels_last = inputs.movedim(1, -1)
        vectors = channels_last.reshape(-1, self.dim)
        indices = self.nearest(vectors)
        if self.training:
            self._update(vectors.detach(), indices)
        quantized = F.embedding(indices, self.codebook).view_as(channels_last).movedim(-1, 1)
        commitment = (quantized.detach() - inputs).pow(2).mean()
        quantized = inputs + (quantized - inputs).detach()
        return QuantizerOutput(quantized, indices.view(channels_last.shape[:-1]), commitment)

    @torch.no_grad()
    def _update(self, vectors: torch.Tensor, indices: torch.Tensor) -> None:
        assignments = F.one_hot(indices, self.num_codes).to(vectors.dtype)
        counts = assignments.sum(dim=0)
        sums = assignments.t() @ vectors
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.add_(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        assigned = counts > 0
        self.codebook[assigned] = self.code_sum[assigned] / smoothed[assigned].unsqueeze(1)
        if self.restart_dead_codes:
            self._restart(vectors)

    def _restart(self, vectors: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        picks = torch.randint(len(vectors), (num_dead,), device=vectors.device)
        self.codebook[dead] = vectors[picks]
        self.cluster_size[dead] = 0.0
        self.code_sum[dead] = 0.0


def residual_quantize(quantizer: VectorQuantizer, features: torch.Tensor, base: torch.Tensor) -> QuantizerOutput:
    """Quantize ``features`` relative to ``base``: ``base + VQ(features - base)``.

    >>> quantizer = VectorQuantizer(num_codes=1, dim=2).eval()
    >>> quantizer.codebook.copy_(torch.tensor([[1.0, -1.0]]))
    tensor([[ 1., -1.]])
    >>> residual_quantize(quantizer, torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 2.0]])).quantized
    tensor([[3., 1.]])
    """
    output = quantizer(features - base)
    return output._replace(quantized=base + output.quantized)
