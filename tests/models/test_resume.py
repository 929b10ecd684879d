"""A training run killed mid-epoch and resumed from its last checkpoint ends where the uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

RUN = Path(__file__).with_name("resume_run.py")


def _run(model: str, demo_root: Path, folder: Path, *options: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(RUN), model, str(demo_root), str(folder), *options]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)


def _checkpoint(folder: Path) -> Path:
    (path,) = folder.rglob("model.ckpt")
    return path


@pytest.mark.parametrize("model", ["hgad", "ms_flow", "uni_ad", "vq_flow"])
def test_killed_run_resumes_to_the_uninterrupted_weights_and_metrics(
    model: str, demo_root: Path, tmp_path: Path
) -> None:
    straight = _run(model, demo_root, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run(model, demo_root, tmp_path / "killed", "--kill-at-epoch", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = _checkpoint(tmp_path / "killed")
    # The last complete epoch before the kill; the half-trained epoch 1 is lost, and nothing else.
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 0

    resumed = _run(model, demo_root, tmp_path / "resumed", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = torch.load(_checkpoint(tmp_path / "straight"), map_location="cpu", weights_only=True)["state_dict"]
    actual = torch.load(_checkpoint(tmp_path / "resumed"), map_location="cpu", weights_only=True)["state_dict"]
    assert actual.keys() == expected.keys()
    # Bit-identical on CPU: the same operations on the same data in the same order. (NaN equals NaN here: the
    # post-processor's pixel threshold is NaN without anomalous validation pixels.)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    table = json.loads((tmp_path / "resumed" / "table.json").read_text())
    assert table == json.loads((tmp_path / "straight" / "table.json").read_text())
