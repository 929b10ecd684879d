"""2-D sinusoidal positional encoding, the spatial condition of the multi-scale flows.

MSFlow conditions each parallel flow on where a feature sits in the image: half of the
channels encode the column, half the row, with the sine/cosine frequencies of the
Transformer (base 10^4). The encoding depends only on the map size and is broadcast over
the batch; it is a few sines per pixel, cheap next to the flows, and computing it in the
forward pass keeps exported models free of size-specific buffers.

Example:
    >>> encoding = positional_encoding_2d(channels=8, height=4, width=6)
    >>> encoding.shape
    torch.Size([8, 4, 6])
"""

import math

import torch


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """Return a ``(channels, height, width)`` sinusoidal encoding of column and row.

    Channels ``[0, channels/2)`` encode the column (sine on even, cosine on odd channels),
    the rest the row, as in MSFlow's ``positionalencoding2d``.

    Raises:
        ValueError: If ``channels`` is not a positive multiple of 4.
    """
    if channels <= 0 or channels % 4:
        msg = f"Positional encoding needs a positive multiple of 4 channels, got channels={channels}."
        raise ValueError(msg)
    half = channels // 2
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    columns = torch.arange(0.0, width).unsqueeze(1) * frequencies  # (W, half/2)
    rows = torch.arange(0.0, height).unsqueeze(1) * frequencies  # (H, half/2)
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(columns).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T.unsqueeze(2).expand(-1, -1, width)
    return encoding
