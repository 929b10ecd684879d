"""Images to score from a folder, where one bad file is reported instead of stopping the job.

Anomalib's ``PredictDataset`` reads every file when its batch comes: one truncated PNG or stray
text file ends a long ``anomalib predict`` run with a traceback. :class:`PredictFolder` decodes
every file when it is created, keeps the ones it can score, and lists the others with the
reason (``bad_files``, and a warning per file), so the job scores the rest. A kept file is
decoded again when its batch comes: holding the decoded images instead would cost the memory
of the whole folder, not of one batch.

Conversions, the same as Anomalib's reader makes for training and testing and as
``deploy/score.py`` makes for the OpenVINO path, so that scores match:

- any size: kept; the model's pre-processor resizes (Anomalib predicts one image per batch);
- grayscale, palette, CMYK, 1-bit: expanded to RGB; RGBA and LA: the alpha channel is dropped;
- 16-bit, 32-bit and float single-channel images (PNG ``I;16``, TIFF): refused and listed, since
  Anomalib's reader would clip them to white; convert them to 8-bit first.

Use it from the command line::

    anomalib predict --model VqFlow --ckpt_path model.ckpt --data PredictFolder --data.path ./new_images

"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anomalib.data import ImageBatch, ImageItem
from torch.utils.data import Dataset
from torchvision.tv_tensors import Image as ImageTensor

logger = logging.getLogger(__name__)


def _read(path: Path) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1], read by the OpenVINO scorer's reader: one conversion for both paths.

    Raises:
        OSError: For a file that is not an image or is truncated (PIL's ``UnidentifiedImageError`` is an OSError).
        ValueError: For 16-bit, 32-bit or float single-channel images, which Anomalib's reader clips.
    """
    # Imported here: the scorer imports OpenVINO, which importing the package should not load.
    from anomalib_vqflow.deploy.score import read_image

    return read_image(path)


class PredictFolder(Dataset):
    """The image files under ``path`` (a folder, searched recursively, or one file) that can be scored.

    Args:
        path: Folder of images, or one image file.

    Attributes:
        image_paths: The files that will be scored, sorted.
        bad_files: ``(path, reason)`` of every file that cannot be read as an image.

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no file.
        ValueError: If no file under ``path`` can be read as an image (the message lists them).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("L", (40, 30)).save(folder / "gray.png")
        >>> Image.new("RGBA", (40, 30)).save(folder / "with_alpha.png")
        >>> Image.new("I;16", (40, 30)).save(folder / "sixteen_bit.png")
        >>> _ = (folder / "notes.txt").write_text("not an image")
        >>> dataset = PredictFolder(folder)
        >>> len(dataset), [path.name for path, _ in dataset.bad_files]
        (2, ['notes.txt', 'sixteen_bit.png'])
        >>> [item.image.shape for item in dataset]  # RGB, alpha dropped, as Anomalib reads training images
        [torch.Size([3, 30, 40]), torch.Size([3, 30, 40])]
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        root = Path(path)
        if not root.exists():
            msg = f"No such file or folder to predict on: {root}"
            raise FileNotFoundError(msg)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.name[0] != ".")
        if not files:
            msg = f"The folder {root} holds no file to predict on."
            raise FileNotFoundError(msg)
        self.image_paths: list[Path] = []
        self.bad_files: list[tuple[Path, str]] = []
        for file in files:
            try:
                _read(file)
            except (OSError, ValueError, SyntaxError) as err:  # PIL reports broken headers as SyntaxError too.
                self.bad_files.append((file, f"{type(err).__name__}: {err}"))
                logger.warning("Skipping %s: not a readable image (%s).", file, err)
            else:
                self.image_paths.append(file)
        if not self.image_paths:
            listed = "; ".join(f"{p}: {reason}" for p, reason in self.bad_files[:5])
            msg = f"No readable image under {root} ({len(self.bad_files)} files): {listed}"
            raise ValueError(msg)
        if self.bad_files:
            logger.warning("%d of %d files under %s are skipped (see above).", len(self.bad_files), len(files), root)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> ImageItem:
        path = self.image_paths[index]
        image = ImageTensor(torch.from_numpy(_read(path)).permute(2, 0, 1))
        return ImageItem(image=image, image_path=str(path))

    @property
    def collate_fn(self) -> Callable:
        """Anomalib's batch of images (Anomalib's ``Engine.predict`` uses it)."""
        return ImageBatch.collate
