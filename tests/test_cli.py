"""The plugin's own command: the demo job end to end, as the README's quick start runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from anomalib_vqflow.cli import CONFIG_DIR, main

pytestmark = pytest.mark.slow

COMMAND = str(Path(sys.executable).with_name("anomalib-vqflow"))


def test_configs_prints_the_packaged_folder(capsys) -> None:
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.strip() == str(CONFIG_DIR)


def test_weights_caches_the_packaged_weights_once(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert main(["weights", "tf_efficientnet_lite0"]) == 0
    (written,) = tmp_path.rglob("model.safetensors")
    assert str(written) in capsys.readouterr().out
    assert main(["weights", "tf_efficientnet_lite0"]) == 0
    assert "already in the Hugging Face cache" in capsys.readouterr().out


def test_demo_trains_tests_exports_and_scores(tmp_path: Path) -> None:
    environment = {**os.environ, "ANOMALIB_VQFLOW_DEMO_ROOT": str(tmp_path / "demo"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [COMMAND, "demo", "--max-epochs", "1", "--output", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_folder,) = (tmp_path / "results" / "MsFlow" / "demo" / "unified").glob("v*")
    table = pd.read_csv(run_folder / "metrics_per_category.csv", index_col=0)
    assert list(table.index) == ["brick", "coffee", "coins", "gravel", "mean", "pooled"]
    printed_rows = [line.split()[0] for line in result.stdout.splitlines() if line.split()]
    assert {"brick", "coffee", "coins", "gravel", "mean", "pooled"} <= set(printed_rows), "table printed"
    assert (run_folder / "weights" / "openvino" / "model.xml").is_file()
    assert not (tmp_path / "openvino_cache").exists(), "OpenVINO's cache belongs in the run folder"
    pictures = sorted((run_folder / "openvino_pictures").glob("*.png"))
    assert len(pictures) == 8
    assert {p.name.split("_")[0] for p in pictures} == {"brick", "coffee", "coins", "gravel"}
