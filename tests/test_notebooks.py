"""The notebooks run top to bottom in a fresh kernel, offline, so that they cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_are_there_without_outputs() -> None:
    assert [path.stem for path in NOTEBOOKS] == ["01_quickstart", "02_openvino_deployment", "03_your_own_data"]
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        # Stored clean: what a reader sees is what this test ran, never stale outputs.
        assert all(
            not cell.get("outputs") and cell.get("execution_count") is None
            for cell in cells
            if cell.cell_type == "code"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: the demo data in a scratch cache, no Hub access.
    monkeypatch.setenv("ANOMALIB_VQFLOW_DEMO_ROOT", str(tmp_path / "demo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    # Every notebook shows tables and pictures (anomaly maps, overlays), not only code that ran.
    shown = [output.data for output in outputs if output.output_type in {"execute_result", "display_data"}]
    assert any("text/html" in data for data in shown), "no table shown"
    assert any("image/png" in data for data in shown), "no picture shown"
    assert any((tmp_path / "outputs").iterdir())
