"""Lightning's DDP on two CPU processes (gloo) trains and tests every plugin model, and the per-category
table of a distributed test equals the table of the same checkpoint tested in one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = Path(__file__).with_name("ddp_run.py")
MODELS = ["hgad", "ms_flow", "uni_ad", "vq_flow"]


@pytest.fixture(scope="module")
def odd_demo_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo with 13 test images: two ranks get 7 each, so DistributedSampler repeats one image."""
    root = shutil.copytree(demo_root, tmp_path_factory.mktemp("odd_demo") / "demo")
    sorted((root / "coffee" / "test" / "good").iterdir())[-1].unlink()
    return root


def _run(demo_root: Path, folder: Path, devices: int) -> None:
    # One thread per process in both runs: CPU kernels sum in an order that depends on the thread count
    # (and on the batch, hence batches of one image), which would move pixel scores in their last bits.
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(RUN), str(demo_root), str(folder), "--models", *MODELS, "--devices", str(devices)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def test_distributed_test_equals_one_process_test_of_the_same_checkpoint(odd_demo_root: Path, tmp_path: Path) -> None:
    _run(odd_demo_root, tmp_path, devices=2)
    _run(odd_demo_root, tmp_path, devices=1)
    for model in MODELS:
        folder = tmp_path / model
        seen = [json.loads((folder / f"images_2_rank{rank}.json").read_text()) for rank in range(2)]
        assert seen == [7, 7], model  # one of the 13 images was scored twice: the padding was there to drop
        assert json.loads((folder / "images_1_rank0.json").read_text()) == 13
        distributed = json.loads((folder / "table_2.json").read_text())
        single = json.loads((folder / "table_1.json").read_text())
        assert distributed == single, model  # exactly: same images, same order, same arithmetic
