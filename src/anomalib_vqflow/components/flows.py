"""Invertible building blocks of the multi-scale flows: parallel flows and the fusion flow.

MSFlow, VQ-Flow and HGAD share these pieces:

- :class:`ConvLayerNormSubnet`, the coupling subnet of MSFlow (conv 3x3, LayerNorm over
  channels, ReLU, conv 3x3), and :class:`MlpSubnet`, HGAD's subnet for flows on single
  feature vectors (linear to twice the width, ReLU, linear);
- :func:`conditional_flow`, a FrEIA ``SequenceINN`` of Anomalib's ``AllInOneBlock`` with a
  per-pixel condition (affine clamping 1.9, softplus global affine, hard or soft
  permutations), on feature maps or on vectors;
- :class:`ParallelFlows`, one such flow per scale with its own depth;
- :class:`FusionCoupling`, MSFlow's fusion coupling layer, which lets the scales exchange
  information: each half of every scale is transformed by a network that sees the other
  half of *all* scales, pooled to the coarsest grid.

All blocks are fully convolutional, so their spatial size is not fixed at construction
(FrEIA only needs the channel count; the official MSFlow code builds them the same way).

The fusion coupling follows MSFlow's ``FusionCouplingLayer`` with one correction: the
official code sizes the scale/shift heads of the first pass with the wrong half when a
scale has an odd number of channels (it only works for even counts); here each pass
predicts exactly the channels of the half it transforms.

Example:
    >>> import torch
    >>> flows = ParallelFlows(channels=[8, 16], condition_channels=4, num_blocks=[1, 2])
    >>> features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    >>> conditions = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    >>> latents, log_jacobian = flows(features, conditions)
    >>> [z.shape[1] for z in latents], log_jacobian.shape
    ([8, 16], torch.Size([2]))
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.flow import AllInOneBlock
from FrEIA.framework import SequenceINN
from torch import nn

AFFINE_CLAMPING = 1.9
# MSFlow's soft clamp of the fusion scales: s -> clamp * 0.636 * atan(s / clamp) (0.636 ~ 2/pi).
_ATAN_SCALE = 0.636
_OUTPUT_LIMIT = 1e6


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map.

    PyTorch runs ``nn.LayerNorm`` on channels-last views (its fused kernel trains about 30%
    faster here than the normalisation written out). An export writes the normalisation out
    along the channel axis instead: the same values up to rounding, and OpenVINO runs it as
    one fused normalisation, without the two transposes and layout changes around every
    coupling subnet that cost the exported CPU models more time than the normalisation itself.

    Example:
        >>> import torch
        >>> normalised = ChannelLayerNorm(4)(5 * torch.randn(2, 4, 3, 3) + 2)
        >>> bool(normalised.mean(dim=1).abs().max() < 1e-5)  # every pixel's channels: mean 0
        True
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise every pixel's channel vector."""
        if not torch.compiler.is_exporting():
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        centered = x - x.mean(dim=1, keepdim=True)
        normalised = centered * torch.rsqrt(centered.pow(2).mean(dim=1, keepdim=True) + self.norm.eps)
        return normalised * self.norm.weight.view(1, -1, 1, 1) + self.norm.bias.view(1, -1, 1, 1)


class ConvLayerNormSubnet(nn.Sequential):
    """Coupling subnet of MSFlow: conv 3x3 (same width), channel LayerNorm, ReLU, conv 3x3.

    Example:
        >>> import torch
        >>> ConvLayerNormSubnet(6, 8)(torch.rand(2, 6, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            ChannelLayerNorm(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )


class MlpSubnet(nn.Sequential):
    """Coupling subnet of HGAD's per-pixel flows: linear to twice the input width, ReLU, linear.

    Example:
        >>> import torch
        >>> MlpSubnet(6, 8)(torch.rand(10, 6)).shape
        torch.Size([10, 8])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Linear(in_channels, 2 * in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(2 * in_channels, out_channels),
        )


def conditional_flow(
    channels: int,
    condition_channels: int,
    num_blocks: int,
    clamp: float = AFFINE_CLAMPING,
    subnet_constructor: Callable[[int, int], nn.Module] = ConvLayerNormSubnet,
    permute_soft: bool = False,
    spatial: bool = True,
) -> SequenceINN:
    """Build a flow of ``num_blocks`` conditional ``AllInOneBlock`` couplings on ``channels``.

    The condition is concatenated to the passive half in every block's subnet. With
    ``spatial`` the flow maps ``(N, C, H, W)`` feature maps of any size (fully
    convolutional; the ``(1, 1)`` dims only tell FrEIA the rank) and its log-Jacobian is
    summed over the map; without, it maps ``(N, C)`` vectors, one log-Jacobian per vector.
    ``permute_soft`` mixes the channels between blocks with a random rotation instead of a
    random permutation (drawn from NumPy's global generator).
    """
    trailing = (1, 1) if spatial else ()
    flow = SequenceINN(channels, *trailing)
    for _ in range(num_blocks):
        flow.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(condition_channels, *trailing),
            subnet_constructor=subnet_constructor,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=permute_soft,
        )
    return flow


class ParallelFlows(nn.Module):
    """One conditional flow per scale, each with its own number of blocks.

    Args:
        channels: Feature channels of each scale.
        condition_channels: Condition channels, one number for all scales or one per scale.
        num_blocks: Coupling blocks of each scale (MSFlow: ``[2, 5, 8]``, deepest scale last).
        clamp: Affine clamping of the couplings.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> flows = ParallelFlows(channels=[4, 6], condition_channels=2, num_blocks=[1, 1]).eval()
        >>> features = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)]
        >>> conditions = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
        >>> latents, _ = flows(features, conditions)
        >>> all(torch.allclose(x, y, atol=1e-5) for x, y in zip(flows.inverse(latents, conditions), features))
        True
    """

    def __init__(
        self,
        channels: Sequence[int],
        condition_channels: int | Sequence[int],
        num_blocks: Sequence[int],
        clamp: float = AFFINE_CLAMPING,
    ) -> None:
        super().__init__()
        if len(channels) != len(num_blocks):
            msg = f"num_blocks needs one entry per scale: {len(channels)} scales, num_blocks={list(num_blocks)}."
            raise ValueError(msg)
        conditions = [condition_channels] * len(channels) if isinstance(condition_channels, int) else condition_channels
        self.flows = nn.ModuleList(
            conditional_flow(c, cond, n, clamp) for c, cond, n in zip(channels, conditions, num_blocks, strict=True)
        )

    def forward(
        self,
        features: Sequence[torch.Tensor],
        conditions: Sequence[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Map each scale to its latent; return the latents and the summed log-Jacobian ``(N,)``."""
        latents = []
        log_jacobian = features[0].new_zeros(features[0].shape[0])
        for flow, feature, condition in zip(self.flows, features, conditions, strict=True):
            latent, scale_log_jacobian = flow(feature, c=[condition])
            latents.append(latent)
            log_jacobian = log_jacobian + scale_log_jacobian
        return latents, log_jacobian

    def inverse(self, latents: Sequence[torch.Tensor], conditions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Map latents back to features (used to check invertibility)."""
        return [
            flow(latent, c=[condition], rev=True)[0]
            for flow, latent, condition in zip(self.flows, latents, conditions, strict=True)
        ]


class FusionSubnet(nn.Module):
    """Scale/shift network of a fusion pass: sees one half of every scale, pooled to the coarsest grid.

    The halves are average-pooled to the last (coarsest) scale's size, concatenated (with an
    optional condition on that grid), mixed by conv 3x3, channel LayerNorm, ReLU
    (width = input / 4), conv 3x3 and ReLU, split back per scale, upsampled bilinearly and
    added to each half; a conv 3x3 head per scale then predicts the log-scale and the shift.

    Args:
        in_channels: Channels of the half that each scale feeds in.
        out_channels: Channels of the half that each scale's head transforms.
        condition_channels: Channels of an extra condition on the coarsest grid (0 for none).

    Example:
        >>> import torch
        >>> subnet = FusionSubnet(in_channels=[2, 3], out_channels=[2, 3])
        >>> outputs = subnet([torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)])
        >>> [(tuple(scale.shape), tuple(shift.shape)) for scale, shift in outputs]
        [((1, 2, 8, 8), (1, 2, 8, 8)), ((1, 3, 4, 4), (1, 3, 4, 4))]
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], condition_channels: int = 0) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        mixed_channels = sum(self.in_channels)
        hidden_channels = max((mixed_channels + condition_channels) // 4, 1)
        self.mix = nn.Sequential(
            nn.Conv2d(mixed_channels + condition_channels, hidden_channels, 3, padding=1),
            ChannelLayerNorm(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, mixed_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        heads = list(zip(in_channels, out_channels, strict=True))
        self.scale_heads = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in heads)
        self.shift_heads = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in heads)

    def forward(
        self,
        halves: Sequence[torch.Tensor],
        condition: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return ``(log_scale, shift)`` for every scale."""
        coarsest = halves[-1].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(half, coarsest) for half in halves]
        if condition is not None:
            pooled.append(condition)
        mixed = torch.split(self.mix(torch.cat(pooled, dim=1)), self.in_channels, dim=1)
        outputs = []
        for half, update, scale_head, shift_head in zip(halves, mixed, self.scale_heads, self.shift_heads, strict=True):
            hidden = half + F.interpolate(update, size=half.shape[-2:], mode="bilinear", align_corners=True)
            outputs.append((scale_head(hidden), shift_head(hidden)))
        return outputs


class FusionCoupling(nn.Module):
    """MSFlow's fusion flow: a fixed channel permutation per scale, then a two-pass coupling across scales.

    Each scale is split into halves ``(x1, x2)``. The first pass transforms every ``x1``
    with a scale and shift computed from the ``x2`` of all scales; the second transforms
    every ``x2`` from the new ``x1`` of all scales. Scales are soft-clamped,
    ``s -> clamp * 0.636 * atan(s / clamp)``, and the log-Jacobian is the sum of all
    log-scales.

    Args:
        channels: Channels of each scale.
        condition_channels: Channels of an optional condition on the coarsest grid (0 for none).
        clamp: Soft clamp of the log-scales.

    Example:
        >>> import torch
        >>> fusion = FusionCoupling(channels=[4, 6]).eval()
        >>> features = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
        >>> outputs, log_jacobian = fusion(features)
        >>> [tuple(output.shape) for output in outputs], log_jacobian.shape
        ([(2, 4, 8, 8), (2, 6, 4, 4)], torch.Size([2]))
        >>> all(torch.allclose(x, y, atol=1e-5) for x, y in zip(fusion.inverse(outputs), features))
        True
    """

    def __init__(self, channels: Sequence[int], condition_channels: int = 0, clamp: float = AFFINE_CLAMPING) -> None:
        super().__init__()
        self.clamp = clamp
        self.first_half = [c - c // 2 for c in channels]
        self.second_half = [c // 2 for c in channels]
        self.first_pass = FusionSubnet(self.second_half, self.first_half, condition_channels)
        self.second_pass = FusionSubnet(self.first_half, self.second_half, condition_channels)
        for index, c in enumerate(channels):
            permutation = torch.randperm(c)
            self.register_buffer(f"permutation_{index}", permutation)
            self.register_buffer(f"inverse_permutation_{index}", torch.argsort(permutation))
        self.num_scales = len(channels)

    def _soft_clamp(self, log_scale: torch.Tensor) -> torch.Tensor:
        return self.clamp * _ATAN_SCALE * torch.atan(log_scale / self.clamp)

    def _split(self, features: Sequence[torch.Tensor], prefix: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        firsts, seconds = [], []
        for index, (feature, size) in enumerate(zip(features, self.first_half, strict=True)):
            permuted = feature[:, getattr(self, f"{prefix}_{index}")]
            firsts.append(permuted[:, :size])
            seconds.append(permuted[:, size:])
        return firsts, seconds

    def _merge(
        self,
        firsts: Sequence[torch.Tensor],
        seconds: Sequence[torch.Tensor],
        prefix: str,
    ) -> list[torch.Tensor]:
        return [
            torch.cat([first, second], dim=1)[:, getattr(self, f"{prefix}_{index}")]
            for index, (first, second) in enumerate(zip(firsts, seconds, strict=True))
        ]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        condition: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Transform all scales together; return the outputs and the log-Jacobian ``(N,)``."""
        firsts, seconds = self._split(features, "permutation")
        log_jacobian = features[0].new_zeros(features[0].shape[0])
        new_firsts = []
        for first, (log_scale, shift) in zip(firsts, self.first_pass(seconds, condition), strict=True):
            log_scale = self._soft_clamp(log_scale)
            new_firsts.append(first * torch.exp(log_scale) + shift)
            log_jacobian = log_jacobian + log_scale.sum(dim=(1, 2, 3))
        new_seconds = []
        for second, (log_scale, shift) in zip(seconds, self.second_pass(new_firsts, condition), strict=True):
            log_scale = self._soft_clamp(log_scale)
            new_seconds.append(second * torch.exp(log_scale) + shift)
            log_jacobian = log_jacobian + log_scale.sum(dim=(1, 2, 3))
        # Outputs are unpermuted so that channel order does not depend on the random permutation.
        outputs = self._merge(new_firsts, new_seconds, "inverse_permutation")
        return [output.clamp(-_OUTPUT_LIMIT, _OUTPUT_LIMIT) for output in outputs], log_jacobian

    def inverse(self, outputs: Sequence[torch.Tensor], condition: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Invert :meth:`forward` (used to check invertibility)."""
        firsts, seconds = self._split(outputs, "permutation")
        old_seconds = [
            (second - shift) * torch.exp(-self._soft_clamp(log_scale))
            for second, (log_scale, shift) in zip(seconds, self.second_pass(firsts, condition), strict=True)
        ]
        old_firsts = [
            (first - shift) * torch.exp(-self._soft_clamp(log_scale))
            for first, (log_scale, shift) in zip(firsts, self.first_pass(old_seconds, condition), strict=True)
        ]
        return self._merge(old_firsts, old_seconds, "inverse_permutation")
