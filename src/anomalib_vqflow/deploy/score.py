"""Score a folder of images with an exported OpenVINO model, without PyTorch or Anomalib.

Every OpenVINO and ONNX export of a plugin model carries a copy of this file next to
``model.xml`` (``model.onnx``), so that an inspection PC needs only the exported folder,
``openvino`` and ``pillow``::

    pip install openvino pillow
    python weights/openvino/score.py --images ./line_camera --output ./scored

The exported graph holds the whole model: resizing and normalisation, the network, and
Anomalib's post-processing (score normalisation and the thresholds learned on validation
images). This script reads each image as Anomalib's ``OpenVINOInferencer`` does (RGB,
float in [0, 1], channels first), runs the graph, and writes:

- ``scores.csv``: one row per image, ``image,pred_score,pred_label`` (normalised score in
  [0, 1], label 1 = anomalous at the learned threshold);
- ``overlays/<image name>.png`` (unless ``--no-overlays``): the image next to its anomaly map
  blended over it, with the region above the threshold outlined;
- ``failed.csv``: files that could not be scored and why (unreadable, truncated, not an
  image, too large, an unsupported mode, a size a fixed-size export refuses). Scoring goes
  on past them; they are listed at the end and the exit status is 1.

At the end it prints its speed on this machine: images per second of the whole run (reading,
scoring, writing) and of the model alone (the graph's calls), so that an inspection PC's
throughput is measured where it runs.

Images are converted to RGB exactly as Anomalib reads them for training and testing
(grayscale, palette, CMYK and 1-bit expanded, RGBA loses its alpha), so scores match.
16-bit, 32-bit and float single-channel images are refused (Anomalib's reader clips them to
white): convert them to 8-bit first. Exports made without ``input_size`` accept any image
size (the graph resizes, without antialiasing; for the exact training-time behaviour, give
images at the model's input size).

OpenVINO picks bf16 on CPUs that support it, which moves scores by about 1e-2; the default
here is f32 (``--precision f32``), ``--precision auto`` leaves the choice to OpenVINO.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image, ImageFilter

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def read_image(path: Path) -> np.ndarray:
    """Return the image at ``path`` as ``(H, W, 3)`` float32 in [0, 1], converted as Anomalib's ``read_image``.

    Raises:
        ValueError: For 16-bit, 32-bit or float single-channel images, which that conversion clips.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith(("I", "F")):
            msg = f"unsupported image mode {image.mode} ({path}); convert it to 8-bit RGB or grayscale"
            raise ValueError(msg)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def find_images(sources: list[Path]) -> list[Path]:
    """Return the image files among ``sources``: files whatever their suffix, folders searched recursively."""
    images: list[Path] = []
    for source in sources:
        if source.is_dir():
            images.extend(sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif source.is_file():
            images.append(source)
        else:
            msg = f"No such file or folder: {source}"
            raise FileNotFoundError(msg)
    return images


class ExportedModel:
    """An exported Anomalib model compiled for one device.

    Args:
        model_file: ``model.xml`` (or ``.onnx``) written by ``anomalib export`` / ``Engine.export``.
        device: OpenVINO device name.
        precision: ``"f32"`` to match PyTorch, ``"auto"`` for OpenVINO's default (bf16 where the CPU has it).

    Example:
        >>> import tempfile
        >>> import torch
        >>> class Brightest(torch.nn.Module):
        ...     def forward(self, image: torch.Tensor) -> torch.Tensor:
        ...         return image.amax(dim=(1, 2, 3))
        >>> model_file = Path(tempfile.mkdtemp()) / "model.onnx"
        >>> torch.onnx.export(Brightest(), (torch.rand(1, 3, 8, 8),), model_file, output_names=["pred_score"],
        ...                   dynamo=False)
        >>> model = ExportedModel(model_file)
        >>> image = np.zeros((8, 8, 3), dtype=np.float32)
        >>> image[2, 3, 1] = 0.75
        >>> model.output_names, model(image)["pred_score"].tolist()
        (['pred_score'], [0.75])
    """

    def __init__(self, model_file: Path, device: str = "CPU", precision: str = "f32") -> None:
        if not model_file.is_file():
            msg = f"No exported model at {model_file}"
            raise FileNotFoundError(msg)
        config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
        try:
            self.compiled = ov.Core().compile_model(str(model_file), device, config)
        except RuntimeError as error:
            msg = f"Cannot load {model_file} on {device}: {error}"
            raise RuntimeError(msg) from error
        self.output_names = [output.any_name for output in self.compiled.outputs]
        # The graph's own time, for the rate printed at the end of a run.
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on one ``(H, W, 3)`` image: ``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``."""
        batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
        start = time.perf_counter()
        results = self.compiled(batch)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return {name: np.asarray(results[name]) for name in self.output_names}


def _jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a jet-like colour ramp (blue, cyan, yellow, red)."""
    values = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * values - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * values - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * values - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
    """Save the image and, next to it, its anomaly map blended over it with the predicted region outlined."""
    height, width = image.shape[:2]
    anomaly_map = outputs["anomaly_map"].squeeze().astype(np.float32)
    resized_map = np.asarray(Image.fromarray(anomaly_map).resize((width, height), Image.Resampling.BILINEAR))
    heat = _jet(resized_map).astype(np.float32)
    picture = (255 * image).astype(np.float32)
    blended = (0.5 * picture + 0.5 * heat).astype(np.uint8)
    if "pred_mask" in outputs:
        mask = Image.fromarray((outputs["pred_mask"].squeeze() > 0).astype(np.uint8) * 255)
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
        edge = np.asarray(mask.filter(ImageFilter.FIND_EDGES)) > 0
        blended[edge] = (255, 255, 255)
    side_by_side = np.concatenate([picture.astype(np.uint8), blended], axis=1)
    Image.fromarray(side_by_side).save(path)


def score_images(
    model: ExportedModel, images: list[Path], output: Path, overlays: bool = True
) -> tuple[int, list[tuple[Path, str]]]:
    """Score ``images`` into ``output`` (``scores.csv``, overlays); return the number scored and the failures."""
    output.mkdir(parents=True, exist_ok=True)
    if overlays:
        (output / "overlays").mkdir(exist_ok=True)
    failures: list[tuple[Path, str]] = []
    scored = 0
    with (output / "scores.csv").open("w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["image", "pred_score", "pred_label"])
        for index, path in enumerate(images):
            try:
                image = read_image(path)
                outputs = model(image)
            # Any error: one bad file (a decompression bomb, a size a fixed-size export refuses) must not stop all.
            except Exception as error:
                failures.append((path, f"{type(error).__name__}: {error}"))
                continue
            score = float(outputs["pred_score"].squeeze())
            label = int(bool(outputs["pred_label"].squeeze())) if "pred_label" in outputs else ""
            writer.writerow([str(path), f"{score:.6g}", label])
            scored += 1
            if overlays and "anomaly_map" in outputs:
                try:
                    # The index keeps images of the same name from different folders apart.
                    save_overlay(output / "overlays" / f"{index:05d}_{path.stem}.png", image, outputs)
                # The score is already written; only the picture is lost.
                except Exception as error:
                    failures.append((path, f"overlay: {type(error).__name__}: {error}"))
    with (output / "failed.csv").open("w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["image", "reason"])
        writer.writerows([str(path), reason] for path, reason in failures)
    return scored, failures


def default_model_file() -> Path:
    """Return the export next to this script: ``model.xml`` (OpenVINO export), else ``model.onnx`` (ONNX export)."""
    openvino_file = Path(__file__).with_name("model.xml")
    return openvino_file if openvino_file.is_file() else openvino_file.with_suffix(".onnx")


def main(argv: list[str] | None = None) -> int:
    """Command line: score images, print a summary; exit 1 if some files failed, 2 on a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", type=Path, default=Path("scored"), help="folder for scores.csv and overlays")
    parser.add_argument(
        "--model", type=Path, default=None, help="exported model (default: model.xml, else model.onnx, alongside)"
    )
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, NPU, AUTO)")
    parser.add_argument("--precision", choices=["f32", "auto"], default="f32", help="f32 matches PyTorch")
    parser.add_argument("--no-overlays", action="store_true", help="write scores only")
    args = parser.parse_args(argv)
    try:
        images = find_images(args.images)
        if not images:
            msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, args.images))}"
            raise FileNotFoundError(msg)
        model = ExportedModel(args.model or default_model_file(), device=args.device, precision=args.precision)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    scored, failures = score_images(model, images, args.output, overlays=not args.no_overlays)
    seconds = time.perf_counter() - start
    print(f"Scored {scored} of {len(images)} images -> {args.output / 'scores.csv'}")
    if model.calls:
        print(
            f"Speed: {scored / seconds:.1f} images/s for the whole run (reading, scoring, writing), "
            f"{model.calls / model.seconds:.1f} images/s for the model alone ({args.device}, {args.precision})"
        )
    if failures:
        print(f"{len(failures)} files could not be scored (also in {args.output / 'failed.csv'}):", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
