"""The demo data's pictures: good crops of scikit-image's photographs and procedural defects with exact masks.

Each category is one photograph: two textures (``brick``, ``gravel``) and two objects (``coffee``,
``coins``) by default; ``grass`` and ``chelsea`` are available too. scikit-image ships these
photographs inside its wheel (``skimage.data``); only those are used, never the ones it fetches
with pooch, so rendering works without network. Good images are random crops of the photograph
(position, mild scale jitter, flips for textures, brightness/contrast jitter), so they vary but
share the category's appearance. A defect image is a fresh good image with one procedural defect
drawn in, covering roughly 0.5-5 % of the image:

- ``scratch``: a thin curved line, bright on dark surfaces and dark on bright ones;
- ``hole``: a dark ellipse with a soft rim;
- ``stain``: an irregular coloured blob, alpha-blended, with a darker drying ring;
- ``patch``: a rectangle pasted from another photograph or from a rotated, zoomed crop of the same one.

Every changed pixel differs from the good image by at least ``MIN_CHANGE`` grey levels in some channel,
and the ground-truth mask holds exactly those pixels: every pixel outside it equals the good image.
:func:`render_sample` returns the good image, the written image and the mask for any file of
:func:`~anomalib_vqflow.data.demo.generate_demo_dataset`, so tests can check that. Every image draws
from its own random generator, seeded by (seed, category, split, label, index).

Example:
    >>> good, image, mask = render_sample("coins", "test", "hole", 0)
    >>> image.shape, mask.dtype, bool(mask.any()), bool((image[~mask] == good[~mask]).all())
    ((128, 128, 3), dtype('bool'), True, True)
"""

from __future__ import annotations

import colorsys
import functools
import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from skimage import data as skimage_data

DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "patch")
# A pixel belongs to the mask iff the defect moved some channel by at least this many grey levels.
MIN_CHANGE = 12

# Where the defect is fully opaque it moves every pixel at least this far (in [0, 1] units), so a
# stain or patch that happens to match its background still shows, and the mask has no holes.
_MIN_CONTRAST = 0.15


@dataclass(frozen=True)
class _Source:
    load: Callable[[], np.ndarray]
    texture: bool
    crop: float  # crop side, as a fraction of the photograph's shorter side
    centre: tuple[float, float] = (0.5, 0.5)  # (y, x) of object crops, as fractions of the photograph


# Every photograph here ships inside the scikit-image wheel; a test loads them all with sockets blocked.
_SOURCES: dict[str, _Source] = {
    "brick": _Source(skimage_data.brick, texture=True, crop=0.45),
    "grass": _Source(skimage_data.grass, texture=True, crop=0.4),
    "gravel": _Source(skimage_data.gravel, texture=True, crop=0.4),
    "coffee": _Source(skimage_data.coffee, texture=False, crop=0.92, centre=(0.5, 0.46)),
    "coins": _Source(skimage_data.coins, texture=False, crop=0.95),
    "chelsea": _Source(skimage_data.chelsea, texture=False, crop=0.9, centre=(0.5, 0.45)),
}


class DemoSample(NamedTuple):
    """One rendered image: ``good`` and ``image`` are ``(H, W, 3)`` uint8, ``mask`` is ``(H, W)`` bool.

    Example:
        >>> sample = render_sample("coins", "test", "hole", index=0, image_size=64)
        >>> sample.image.shape, sample.mask.shape, bool(sample.mask.any()), bool((sample.good != sample.image).any())
        ((64, 64, 3), (64, 64), True, True)
    """

    good: np.ndarray
    image: np.ndarray
    mask: np.ndarray


def render_sample(
    category: str, split: str, label: str, index: int, image_size: int = 128, seed: int = 0
) -> DemoSample:
    """Render ``root/<category>/<split>/<label>/<index>.png`` of :func:`generate_demo_dataset`.

    Args:
        category: One of the available photographs.
        split: ``"train"`` or ``"test"``.
        label: ``"good"``, or for the test split one of :data:`DEFECT_TYPES`.
        index: Position of the image inside its folder.
        image_size: Side of the square image.
        seed: Base seed of the dataset.

    Returns:
        The defect-free image, the written image and the defect mask. For good images the first two
        are equal and the mask is empty; for defect images the mask is non-empty and holds exactly
        the pixels where they differ.

    """
    check_category(category)
    if (split, label) != ("train", "good") and (split != "test" or label not in ("good", *DEFECT_TYPES)):
        msg = f"no demo images in {split}/{label}: use train/good, test/good or test/<one of {DEFECT_TYPES}>"
        raise ValueError(msg)
    rng = np.random.default_rng([seed, _stable_id(category), _stable_id(split), _stable_id(label), index])
    good = _good_image(rng, category, image_size)
    if label == "good":
        return DemoSample(good, good.copy(), np.zeros(good.shape[:2], dtype=bool))
    base = good.astype(np.float32) / 255
    target, alpha = _DEFECTS[label](rng, base, category)
    return DemoSample(good, *_blend(good, base, target, alpha))


def check_category(category: str) -> None:
    """Raise a ValueError that lists the photographs when ``category`` is not one of them."""
    if category not in _SOURCES:
        msg = f"unknown demo category {category!r}; available: {sorted(_SOURCES)}"
        raise ValueError(msg)


def _stable_id(name: str) -> int:
    # Python's hash() of a str changes between processes; a CRC does not.
    return zlib.crc32(name.encode())


@functools.cache
def _photo(category: str) -> Image.Image:
    pixels = _SOURCES[category].load()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]))


def _good_image(rng: np.random.Generator, category: str, size: int, zoom: float = 1.0) -> np.ndarray:
    source, photo = _SOURCES[category], _photo(category)
    width, height = photo.size
    shorter = min(width, height)
    side = min(shorter, source.crop * zoom * shorter * np.exp(rng.uniform(-0.08, 0.08)))
    if source.texture:
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    else:
        jitter = 0.04 * shorter
        centre_x = source.centre[1] * width + rng.uniform(-jitter, jitter)
        centre_y = source.centre[0] * height + rng.uniform(-jitter, jitter)
        left = np.clip(centre_x - side / 2, 0, width - side)
        top = np.clip(centre_y - side / 2, 0, height - side)
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    image = np.asarray(crop, dtype=np.float32) / 255
    if source.texture:
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if rng.random() < 0.5:
            image = image[::-1]
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04)
    return _to_uint8(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _blend(good: np.ndarray, base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = _with_min_contrast(base, target, alpha)
    image = _to_uint8(base + alpha[..., None] * (target - base))
    mask = np.abs(image.astype(np.int16) - good).max(axis=-1) >= MIN_CHANGE
    # Fringe pixels moved by less than MIN_CHANGE go back to the good image, so the mask is exact.
    image[~mask] = good[~mask]
    return image, mask


def _with_min_contrast(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    difference = target - base
    weak = np.abs(difference).max(axis=-1) < _MIN_CONTRAST
    brightness = base.mean(axis=-1)
    # Push weak pixels all one way, the way the whole defect leans, so they read as part of it rather
    # than as noise; a pixel with no room that way goes the other, and then its channel nearest the
    # chosen side still moves by the full _MIN_CONTRAST.
    lighter = (alpha * difference.mean(axis=-1)).sum() >= 0
    up = brightness <= 1 - _MIN_CONTRAST if lighter else brightness < _MIN_CONTRAST
    pushed = np.clip(base + np.where(up, _MIN_CONTRAST, -_MIN_CONTRAST)[..., None], 0, 1)
    return np.where(weak[..., None], pushed, target)


def _grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _centre(rng: np.random.Generator, size: int) -> np.ndarray:
    # Away from the border, so the defect is seldom cut off.
    return rng.uniform(0.2, 0.8, size=2) * size


def _scratch(rng: np.random.Generator, base: np.ndarray, category: str) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    vertices = int(rng.integers(3, 6))
    step = rng.uniform(0.35, 0.6) * size / (vertices - 1)
    heading = rng.uniform(0, 2 * np.pi)
    points = [_centre(rng, size)]
    for _ in range(vertices - 1):
        heading += rng.normal(0, 0.5)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    curve = _chaikin(np.array(points), iterations=2)
    rows, cols = _grid(size)
    distance = np.full((size, size), np.inf, dtype=np.float32)
    for start, end in itertools.pairwise(curve):
        segment = end - start
        along = ((rows - start[0]) * segment[0] + (cols - start[1]) * segment[1]) / max(segment @ segment, 1e-6)
        along = np.clip(along, 0, 1)
        distance = np.minimum(
            distance, np.hypot(rows - start[0] - along * segment[0], cols - start[1] - along * segment[1])
        )
    # At least 1.5 px wide, so even a 32 px image gets a scratch that changes whole pixels.
    width = max(1.5, rng.uniform(1.5, 2.5) * size / 128)
    alpha = np.clip(width / 2 + 0.5 - distance, 0, 1)
    # Scratches catch the light on dark surfaces and expose dark material on bright ones.
    surface = (base.mean(axis=-1) * alpha).sum() / max(alpha.sum(), 1e-6)
    shade = rng.uniform(0.85, 1.0) if surface < 0.5 else rng.uniform(0.0, 0.12)
    return np.full_like(base, shade), alpha


def _chaikin(points: np.ndarray, iterations: int) -> np.ndarray:
    # Corner cutting turns the polyline into a smooth curve with the same end points.
    for _ in range(iterations):
        inner = np.stack([0.75 * points[:-1] + 0.25 * points[1:], 0.25 * points[:-1] + 0.75 * points[1:]], axis=1)
        points = np.concatenate([points[:1], inner.reshape(-1, 2), points[-1:]])
    return points


def _hole(rng: np.random.Generator, base: np.ndarray, category: str) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    centre, radii, angle = _centre(rng, size), rng.uniform(0.045, 0.1, size=2) * size, rng.uniform(0, np.pi)
    rows, cols = _grid(size)
    along = (rows - centre[0]) * np.cos(angle) + (cols - centre[1]) * np.sin(angle)
    across = (cols - centre[1]) * np.cos(angle) - (rows - centre[0]) * np.sin(angle)
    radius = np.hypot(along / radii[0], across / radii[1])
    alpha = np.clip((1.15 - radius) / 0.3, 0, 1)
    # Black at the bottom, the surface faintly visible towards the rim, as in a real hole.
    target = 0.02 + 0.2 * base * np.clip(radius, 0, 1)[..., None]
    return target, alpha


def _stain(rng: np.random.Generator, base: np.ndarray, category: str) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    centre = _centre(rng, size)
    rows, cols = _grid(size)
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    outline = np.ones_like(angle)
    for lobes in (2, 3, 4):
        outline += rng.uniform(0, 0.15) * np.cos(lobes * angle + rng.uniform(0, 2 * np.pi))
    radius = np.hypot(rows - centre[0], cols - centre[1]) / (rng.uniform(0.06, 0.11) * size * outline)
    alpha = rng.uniform(0.6, 0.85) * np.clip((1.1 - radius) / 0.25, 0, 1)
    # Any hue, but darker than a bright surface and lighter than a dark one, so it never blends in.
    surface = (base.mean(axis=-1) * alpha).sum() / max(alpha.sum(), 1e-6)
    value = rng.uniform(0.1, 0.35) if surface > 0.5 else rng.uniform(0.65, 0.9)
    colour = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.9), value))
    ring = 1 - 0.35 * np.exp(-(((radius - 0.9) / 0.12) ** 2))
    return (colour * ring[..., None]).astype(np.float32), alpha


def _patch(rng: np.random.Generator, base: np.ndarray, category: str) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    if rng.random() < 0.5:
        others = sorted(set(_SOURCES) - {category})
        source = _good_image(rng, others[int(rng.integers(len(others)))], size)
    else:
        # The same photograph, magnified and turned, so the patch breaks the surface's scale and
        # orientation even on a uniform texture.
        source = np.rot90(_good_image(rng, category, size, zoom=rng.uniform(0.45, 0.6)), k=int(rng.integers(1, 4)))
    height, width = (rng.uniform(0.12, 0.2, size=2) * size).astype(int)
    from_row, from_col = rng.integers(0, size - height), rng.integers(0, size - width)
    to_row, to_col = (_centre(rng, size) - np.array([height, width]) / 2).astype(int)
    target = base.copy()
    target[to_row : to_row + height, to_col : to_col + width] = (
        source[from_row : from_row + height, from_col : from_col + width].astype(np.float32) / 255
    )
    alpha = np.zeros((size, size), dtype=np.float32)
    alpha[to_row : to_row + height, to_col : to_col + width] = 1
    return target, alpha


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, str], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "patch": _patch,
}
