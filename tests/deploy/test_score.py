"""The standalone scorer's image reading and file discovery, without a model (the end-to-end runs are per model)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_vqflow.deploy.score import find_images, read_image


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def test_rgb_is_read_in_zero_one(tmp_path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, pixels / np.float32(255))


def test_conversions(tmp_path: Path, pixels: np.ndarray) -> None:
    """Grayscale, 16-bit, RGBA and palette images all come out as (H, W, 3) in [0, 1] with their content."""
    gray = pixels[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(np.dstack([pixels, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    expected_gray = np.repeat((gray / np.float32(255))[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), expected_gray)
    np.testing.assert_allclose(read_image(tmp_path / "gray16.png"), expected_gray, rtol=1e-6)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), pixels / np.float32(255))
    assert read_image(tmp_path / "palette.png").shape == (5, 7, 3)


def test_bad_files_raise_what_the_scorer_catches(tmp_path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.png", "text.png"):
        with pytest.raises(OSError):  # noqa: PT011 (PIL's UnidentifiedImageError is an OSError)
            read_image(tmp_path / name)


def test_find_images(tmp_path: Path, pixels: np.ndarray) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt"):
        Image.fromarray(pixels).save(tmp_path / name, format="PNG")
    found = find_images([tmp_path / "a", tmp_path / "a" / "notes.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.png", "a/b/2.JPG", "a/notes.txt"]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])
