"""The plugin inside Anomalib: short names in the stock `anomalib` command, list_models(), and the switch."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from anomalib.models import get_model, list_models
from PIL import Image

import anomalib_vqflow
from anomalib_vqflow.components.weights import cache_packaged_weights
from anomalib_vqflow.models import MsFlow, VqFlow
from stock_command import ANOMALIB, run_anomalib, small_model_arguments, small_pre_processor

pytestmark = pytest.mark.slow

CONFIGS = Path(anomalib_vqflow.__file__).parent / "configs"


def test_list_models_and_get_model_see_the_plugin() -> None:
    assert {"ms_flow", "vq_flow"} <= set(list_models())
    model = get_model("ms_flow", backbone="tf_efficientnet_lite0", num_blocks=[1, 1, 1], condition_channels=8)
    assert isinstance(model, MsFlow)
    model = get_model("vq_flow", backbone="tf_efficientnet_lite0", num_blocks=[1, 1, 1], prototype_channels=8)
    assert isinstance(model, VqFlow)


def test_autoload_hook_imports_nothing_heavy() -> None:
    result = run_anomalib(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules, 'anomalib' in sys.modules)"]
    )
    assert result.stdout.split() == ["False", "False"], result.stderr
    result = run_anomalib(
        [sys.executable, "-c", "import anomalib.cli.cli, sys; print('anomalib_vqflow' in sys.modules)"]
    )
    assert result.stdout.split()[-1] == "True", result.stderr


def test_autoload_can_be_switched_off() -> None:
    code = "import anomalib.cli.cli, sys; print('anomalib_vqflow' in sys.modules)"
    result = run_anomalib([sys.executable, "-c", code], env={"ANOMALIB_VQFLOW_AUTOLOAD": "0"})
    assert result.stdout.split()[-1] == "False", result.stderr


def _data_arguments(root: Path) -> list[str]:
    return ["--data.root", str(root), "--data.num_workers", "0", "--data.train_batch_size", "8"]


# Every model through `anomalib export` to OpenVINO (which exports ONNX on its way); the ONNX
# command once: what it adds is the same for every model, and Engine.export covers ONNX per model.
# Short names for three models, full class paths (model and data) for the fourth.
# `anomalib predict` on a folder of bad files once: PredictFolder does not depend on the model.
@pytest.mark.parametrize(
    ("model", "data", "export_types", "predicts"),
    [
        ("anomalib_vqflow.models.MsFlow", "anomalib_vqflow.data.MultiClassMVTecAD", ("openvino", "onnx"), False),
        ("VqFlow", "MultiClassMVTecAD", ("openvino",), True),
        ("Hgad", "MultiClassMVTecAD", ("openvino",), False),
        ("UniAd", "MultiClassMVTecAD", ("openvino",), False),
    ],
)
def test_stock_anomalib_command_trains_tests_and_exports(
    demo_root: Path, tmp_path: Path, model: str, data: str, export_types: tuple[str, ...], predicts: bool
) -> None:
    result = run_anomalib(
        [
            ANOMALIB,
            "train",
            "--model",
            model,
            "--data",
            data,
            *_data_arguments(demo_root),
            *small_model_arguments(model),
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--default_root_dir",
            str(tmp_path),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = list(tmp_path.rglob("metrics_per_category.csv"))
    assert len(tables) == 1, result.stdout[-2000:]
    table = pd.read_csv(tables[0], index_col=0)
    assert {"brick", "coffee", "mean", "pooled"} <= set(table.index)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    export_root = tmp_path / "exported"
    model_files = {"openvino": "model.xml", "onnx": "model.onnx"}
    for export_type in export_types:
        # As the README writes it: the architecture and all weights come from the checkpoint, and
        # `--model.pre_trained false` spares the placeholder model the CLI builds first a download.
        export = [
            ANOMALIB,
            "export",
            "--model",
            model,
            "--model.pre_trained",
            "false",
            "--ckpt_path",
            str(checkpoint),
            "--export_type",
            export_type,
            "--export_root",
            str(export_root),
        ]
        result = run_anomalib(export)
        assert result.returncode == 0, result.stderr[-3000:]
        folder = export_root / "weights" / export_type
        assert (folder / model_files[export_type]).is_file()
        assert (folder / "score.py").is_file(), "the standalone scorer travels with it"
    if predicts:
        _predict_on_a_folder_with_bad_files(model, checkpoint, demo_root, tmp_path / "predict")


def _predict_on_a_folder_with_bad_files(model: str, checkpoint: Path, demo_root: Path, folder: Path) -> None:
    """`anomalib predict` with PredictFolder: every readable image is scored, every bad file named, none stops it."""
    images = folder / "images"
    images.mkdir(parents=True)
    source = Image.open(next((demo_root / "brick" / "test" / "hole").glob("*.png"))).convert("RGB")
    source.save(images / "rgb.png")
    source.resize((200, 90)).save(images / "wrong_size.png")
    source.convert("L").save(images / "grayscale.png")
    source.convert("RGBA").save(images / "rgba.png")
    source.convert("I;16").save(images / "sixteen_bit.png")
    (images / "truncated.png").write_bytes((images / "rgb.png").read_bytes()[:400])
    (images / "notes.txt").write_text("not an image")
    (folder / "empty").mkdir()
    # The model as trained (Lightning loads the checkpoint's weights into the model the command line builds).
    predict = [ANOMALIB, "predict", "--model", model, *small_model_arguments(model), "--model.pre_trained", "false"]
    predict += [
        "--ckpt_path",
        str(checkpoint),
        "--data",
        "PredictFolder",
        "--default_root_dir",
        str(folder / "results"),
    ]

    result = run_anomalib([*predict, "--data.path", str(images)])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for bad in ("sixteen_bit.png", "truncated.png", "notes.txt"):
        assert f"Skipping {images / bad}" in output, output[-3000:]
    written = sorted(path.name for path in (folder / "results").rglob("*.png"))
    assert written == ["grayscale.png", "rgb.png", "rgba.png", "wrong_size.png"], written

    result = run_anomalib([*predict, "--data.path", str(folder / "empty")])
    assert result.returncode != 0
    # The command line wraps long lines: compare without whitespace.
    expected = f"The folder {folder / 'empty'} holds no file to predict on"
    assert "".join(expected.split()) in "".join(result.stderr.split()), result.stderr[-3000:]


def test_yaml_config_with_class_path(demo_root: Path, tmp_path: Path) -> None:
    """The packaged CPU config, with the data root and a tiny budget overridden on the command line."""
    result = run_anomalib(
        [
            ANOMALIB,
            "train",
            "--config",
            str(CONFIGS / "model" / "ms_flow_cpu.yaml"),
            "--data",
            "MultiClassMVTecAD",
            *_data_arguments(demo_root),
            *small_model_arguments(),
            "--trainer.max_epochs",
            "1",
            "--default_root_dir",
            str(tmp_path),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("metrics_per_category.json"))


def test_switched_off_plugin_keeps_full_class_paths(tmp_path: Path) -> None:
    env = {"ANOMALIB_VQFLOW_AUTOLOAD": "0"}
    short = run_anomalib([ANOMALIB, "train", "--model", "MsFlow", "--print_config"], env=env)
    assert short.returncode != 0
    assert "MsFlow" in short.stderr
    full = run_anomalib([ANOMALIB, "train", "--model", "anomalib_vqflow.models.MsFlow", "--print_config"], env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    assert "anomalib_vqflow.models.MsFlow" in full.stdout


# Anomalib's built-in models on the packaged lite0 weights, each tapping the stages at the strides its
# paper taps on a ResNet (see benchmarks/baselines.py), at the demo images' own 64 px.
BUILTIN_MODEL_ARGUMENTS = {
    "Padim": ["--model.layers", "[blocks.1, blocks.2, blocks.4]", "--model.n_features", "100"],
    "Patchcore": ["--model.layers", "[blocks.2, blocks.4]", "--model.coreset_sampling_ratio", "0.1"],
    "Stfpm": ["--model.layers", "[blocks.1, blocks.2, blocks.4]"],
    # Fibres: 64 px at stride 32 leaves 2 x 2 per image, fewer than its default 64 per step.
    "Cflow": ["--model.layers", "[blocks.2, blocks.4, blocks.6]", "--model.fiber_batch_size", "16"],
}


@pytest.fixture(scope="module")
def packaged_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding the packaged lite0 weights, where the built-in models' timm looks."""
    cache = tmp_path_factory.mktemp("hub")
    cache_packaged_weights("tf_efficientnet_lite0", cache_dir=cache)
    return cache


def _run_builtin(
    verb: list[str], model: str, demo_root: Path, root_dir: Path, hub_cache: Path
) -> subprocess.CompletedProcess:
    """``anomalib <verb> --model <model>`` on the demo data, offline, with the packaged weights."""
    command = [ANOMALIB, *verb, "--model", model, "--model.backbone", "tf_efficientnet_lite0"]
    command += [*BUILTIN_MODEL_ARGUMENTS[model], "--model.pre_processor", json.dumps(small_pre_processor(64))]
    command += ["--data", "MultiClassMVTecAD", *_data_arguments(demo_root), "--trainer.max_epochs", "1"]
    command += ["--default_root_dir", str(root_dir)]
    return run_anomalib(command, env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("model", sorted(BUILTIN_MODEL_ARGUMENTS))
def test_builtin_model_gets_the_per_category_table_from_the_stock_command(
    demo_root: Path, tmp_path: Path, packaged_hub_cache: Path, model: str
) -> None:
    result = _run_builtin(["train"], model, demo_root, tmp_path, packaged_hub_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    (table_file,) = tmp_path.rglob("metrics_per_category.csv")
    assert table_file.parent.parent.name == "unified", "the table goes into the versioned run folder"
    table = pd.read_csv(table_file, index_col=0)
    assert list(table.index) == ["brick", "coffee", "mean", "pooled"]
    assert table.loc["mean", "image_AUROC"] == pytest.approx(table.loc[["brick", "coffee"], "image_AUROC"].mean())
    printed = {line.split()[0] for line in result.stdout.splitlines() if line.split()}
    assert {"brick", "coffee", "mean", "pooled"} <= printed, "the table is printed"
    for suffix in ("json", "md"):
        assert table_file.with_suffix(f".{suffix}").is_file()
    # Anomalib's own evaluator keeps its metrics (a row of its results table); the plugin's go under unified/.
    assert re.search(r"│\s+image_AUROC\s+│", result.stdout), result.stdout[-3000:]
    assert "unified/brick/image_AUROC" in result.stdout


def test_builtin_model_checkpoint_gets_the_same_table_from_anomalib_test(
    demo_root: Path, tmp_path: Path, packaged_hub_cache: Path
) -> None:
    trained = _run_builtin(["train"], "Padim", demo_root, tmp_path / "train", packaged_hub_cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (checkpoint,) = (tmp_path / "train").rglob("*.ckpt")
    test = ["test", "--ckpt_path", str(checkpoint)]
    tested = _run_builtin(test, "Padim", demo_root, tmp_path / "test", packaged_hub_cache)
    assert tested.returncode == 0, tested.stderr[-3000:]
    (train_table,) = (tmp_path / "train").rglob("metrics_per_category.csv")
    (test_table,) = (tmp_path / "test").rglob("metrics_per_category.csv")
    pd.testing.assert_frame_equal(pd.read_csv(test_table, index_col=0), pd.read_csv(train_table, index_col=0))
