"""The standalone scorer's image reading, file discovery and report on a one-operation graph (end to end: per model)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_vqflow.deploy.score import find_images, main, read_image, score_images


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def test_rgb_is_read_in_zero_one(tmp_path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, pixels / np.float32(255))


def test_conversions_match_anomalib(tmp_path: Path, pixels: np.ndarray) -> None:
    """Grayscale, RGBA, palette and CMYK come out as Anomalib's reader gives them: what the model was trained on."""
    from anomalib.data.utils import read_image as anomalib_read_image

    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([pixels, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg"):
        image = read_image(tmp_path / name)
        assert image.shape == (5, 7, 3)
        np.testing.assert_allclose(image, anomalib_read_image(tmp_path / name, as_tensor=False), atol=1e-7)


def test_high_bit_depth_is_refused(tmp_path: Path, pixels: np.ndarray) -> None:
    """Anomalib's reader clips 16-bit images to white; refusing them beats scoring what the model never saw."""
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    with pytest.raises(ValueError, match=r"mode I.*gray16.png"):
        read_image(tmp_path / "gray16.png")


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


def test_a_failing_file_does_not_stop_the_batch(tmp_path: Path, pixels: np.ndarray) -> None:
    """Whatever a file raises (here the model refuses one), the others are scored and it is listed."""
    images = []
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(pixels).save(tmp_path / name)
        images.append(tmp_path / name)

    def model(image: np.ndarray) -> dict[str, np.ndarray]:
        if model.calls == 1:  # type: ignore[attr-defined]
            model.calls += 1  # type: ignore[attr-defined]
            message = "incompatible input shape"
            raise RuntimeError(message)
        model.calls += 1  # type: ignore[attr-defined]
        return {"pred_score": np.array([image.mean()]), "anomaly_map": image[..., 0]}

    model.calls = 0  # type: ignore[attr-defined]
    scored, failures = score_images(model, images, tmp_path / "out")  # type: ignore[arg-type]
    assert scored == 2
    assert [(path.name, reason) for path, reason in failures] == [("b.png", "RuntimeError: incompatible input shape")]
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2
    assert "b.png" in (tmp_path / "out" / "failed.csv").read_text()


def test_a_run_reports_its_images_per_second(
    tmp_path: Path, pixels: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line ends with the rate of the whole run and of the model alone."""

    class Brightest(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return image.amax(dim=(1, 2, 3))

    model_file = tmp_path / "model.onnx"
    image = torch.rand(1, 3, *pixels.shape[:2])
    torch.onnx.export(Brightest(), (image,), model_file, output_names=["pred_score"], dynamo=False)
    for name in ("a.png", "b.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    arguments = ["--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(model_file)]
    assert main([*arguments, "--output", str(tmp_path / "out"), "--no-overlays"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Speed: \d+\.\d images/s for the whole run \(reading, scoring, writing\), "
        r"\d+\.\d images/s for the model alone \(CPU, f32\)",
        last,
    ), last
