"""Deployment without PyTorch: the scoring script that travels with every OpenVINO and ONNX export.

:mod:`.score` needs only ``openvino``, ``numpy`` and ``pillow``. The plugin's models copy it
next to ``model.xml`` (``model.onnx``) when they are exported (``anomalib export`` or
``Engine.export``), so the exported folder is all an inspection PC needs.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_scorer(Path(folder)).name
    'score.py'
"""

import shutil
from pathlib import Path

SCORER = Path(__file__).with_name("score.py")


def write_scorer(folder: Path) -> Path:
    """Copy the standalone scoring script into ``folder`` (an OpenVINO or ONNX export folder); return its path."""
    return Path(shutil.copyfile(SCORER, folder / SCORER.name))


__all__ = ["SCORER", "write_scorer"]
