"""Every plugin model, trained a few steps on the demo data: per-category testing, no labels, export, checkpoints.

One tiny instance per model is trained once per module (two epochs on two demo categories)
and shared by the tests below, each of which runs for every model.
"""

import copy
import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_vqflow.cli import openvino_inferencer
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.deploy import write_scorer
from anomalib_vqflow.deploy.quantization import backbone_operations
from anomalib_vqflow.models import Hgad, MsFlow, UniAd, VqFlow
from anomalib_vqflow.models.hgad.torch_model import HgadEncoding
from anomalib_vqflow.models.mixins import EXPORT_OPSET
from anomalib_vqflow.models.vqflow.torch_model import VqFlowEncoding

pytestmark = pytest.mark.slow

IMAGE_SIZE = 64


def _pre_processor(model: type[AnomalibModule]) -> object:
    return model.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE))


def _tiny_hgad(labels: str) -> Hgad:
    # The stride-8 stage, so that the 64 px demo images still give 8, 4 and 2 px maps.
    return Hgad(
        backbone="tf_efficientnet_lite0",
        layer=2,
        labels=labels,
        num_components=2,
        num_intra_centers=3,
        num_blocks=2,
        position_channels=8,
        map_size=64,
        blur_sigma=1.0,
        inter_class_epochs=1,
        lr=1e-3,
        warmup_epochs=1,
        pre_processor=_pre_processor(Hgad),
    )


TINY_MODELS: dict[str, Callable[[], AnomalibModule]] = {
    "hgad": lambda: _tiny_hgad("none"),
    "hgad_dataset": lambda: _tiny_hgad("dataset"),
    # The shipped CPU configs' scoring, so that export parity covers it (VqFlow keeps the paper's).
    "ms_flow": lambda: MsFlow(
        backbone="tf_efficientnet_lite0",
        num_blocks=(1, 1, 2),
        condition_channels=8,
        anomaly_map_mode="nll",
        warmup_epochs=1,
        pre_processor=_pre_processor(MsFlow),
    ),
    # The 4 x 4 grid of 64 px images leaves room for a 3 x 3 neighbour mask, not the paper's 7 x 7.
    # Average resampling of the stages, as the CPU config, so that export parity covers it.
    "uni_ad": lambda: UniAd(
        backbone="tf_efficientnet_lite0",
        stage_resampling="average",
        hidden_channels=32,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        feedforward_channels=64,
        neighbor_size=3,
        lr=5e-3,
        pre_processor=_pre_processor(UniAd),
    ),
    "vq_flow": lambda: VqFlow(
        backbone="tf_efficientnet_lite0",
        num_blocks=(1, 1, 2),
        num_prototypes=4,
        prototype_channels=8,
        num_patterns=16,
        position_channels=8,
        restart_dead_codes=True,
        concept_calibration=True,
        min_calibration_images=1,
        warmup_epochs=1,
        pre_processor=_pre_processor(VqFlow),
    ),
}

Trained = tuple[str, AnomalibModule, Engine, MultiClassMVTecAD]


def _train(name: str, demo_root: Path, folder: Path) -> Trained:
    """Seed 0, two epochs on the demo data, then the test loop (which fills the per-category table)."""
    seed_everything(0)
    model = TINY_MODELS[name]()
    datamodule = MultiClassMVTecAD(
        root=demo_root, train_batch_size=8, eval_batch_size=8, num_workers=0, val_split_ratio=0.25, seed=0
    )
    engine = Engine(max_epochs=2, default_root_dir=folder, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)
    return name, model, engine, datamodule


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def trained(request: pytest.FixtureRequest, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(request.param, demo_root, tmp_path_factory.mktemp(request.param))


Exports = dict[tuple[ExportType, bool], Path]
# (format, post-processed): the deployed graph in OpenVINO, the raw outputs in both formats. A deployed ONNX
# file adds nothing to test: the OpenVINO export converts that very file.
EXPORTED = ((ExportType.OPENVINO, True), (ExportType.OPENVINO, False), (ExportType.ONNX, False))


def _copy(model: AnomalibModule, post_processed: bool) -> AnomalibModule:
    """An eval-mode copy, without Anomalib's post-processor unless ``post_processed`` (raw outputs)."""
    model = copy.deepcopy(model).eval()
    if not post_processed:
        model.post_processor = None
    return model


@pytest.fixture(scope="module")
def exports(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """The trained model exported once for each of ``EXPORTED``: ``{(type, post-processed): file}``.

    Anomalib's OpenVINO export is its ONNX export converted by ``ov.convert_model`` and saved in f32;
    the raw IR is made the same way from the raw ONNX export, which spares a second trace of the model
    (the longest step of an export). The deployed IR goes through Anomalib's own OpenVINO export.
    """
    name, model, engine, _ = trained
    folder = tmp_path_factory.mktemp(f"{name}_exports")
    deployed = engine.export(
        model=_copy(model, post_processed=True), export_type=ExportType.OPENVINO, export_root=folder / "deployed"
    )
    raw_onnx = engine.export(
        model=_copy(model, post_processed=False), export_type=ExportType.ONNX, export_root=folder / "raw"
    )
    raw_openvino = raw_onnx.parent.parent / "openvino" / "model.xml"
    raw_openvino.parent.mkdir()
    ov.save_model(ov.convert_model(raw_onnx), raw_openvino, compress_to_fp16=False)
    write_scorer(raw_openvino.parent)
    return {
        (ExportType.OPENVINO, True): deployed,
        (ExportType.OPENVINO, False): raw_openvino,
        (ExportType.ONNX, False): raw_onnx,
    }


def _training_loss(model: AnomalibModule, datamodule: MultiClassMVTecAD) -> float:
    """Loss of a copy in training mode (training mode moves batch-norm statistics and codebooks)."""
    images = torch.stack([datamodule.train_data[index].image for index in range(8)])
    model = copy.deepcopy(model)
    model.model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.model(model.pre_processor.transform(images))
        if isinstance(output, HgadEncoding):
            return model.loss_terms(output, intra=False)["loss"].item()
        if isinstance(output, VqFlowEncoding):
            return model.loss(output.latents, output.log_jacobian, output.commitment).item()
        return model.loss(*output).item()


def test_training_lowers_the_loss_and_tests_per_category(trained: Trained) -> None:
    name, model, engine, datamodule = trained
    seed_everything(0)
    untrained = TINY_MODELS[name]()
    if isinstance(model, Hgad):
        # HGAD fits its feature standardisation and components before the first step; compare
        # with those in place, so that only the optimisation steps make the difference.
        for part in ("standardizer", "component_assigner"):
            getattr(untrained.model, part).load_state_dict(getattr(model.model, part).state_dict())
    # Four small steps (two at a tenth of the rate during warm-up): a clear but modest drop.
    assert _training_loss(model, datamodule) < 0.98 * _training_loss(untrained, datamodule)
    table = model.evaluator.table
    assert table.categories == ["brick", "coffee"]
    run_folder = Path(engine.trainer.default_root_dir)
    assert (run_folder / "metrics_per_category.md").is_file()
    # Pictures of different categories land in different folders, so none overwrites another.
    assert sorted(p.name for p in (run_folder / "images").iterdir()) == ["brick", "coffee"]
    assert all(np.isfinite(table[c]["image_AUROC"]) for c in table.categories)


def test_same_seed_gives_identical_metrics(trained: Trained, demo_root: Path, tmp_path: Path) -> None:
    """A second run with the same seed on CPU: every per-category metric equal, bit for bit."""
    name, model, _, _ = trained
    _, again, _, _ = _train(name, demo_root, tmp_path)
    assert again.evaluator.table.to_dict() == model.evaluator.table.to_dict()


def test_scores_do_not_depend_on_categories(trained: Trained) -> None:
    """The model is label-free: scrambling the categories a batch carries changes nothing it predicts."""
    _, model, _, datamodule = trained
    batch = next(iter(datamodule.test_dataloader()))
    batch.image = model.pre_processor.transform(batch.image)
    model.eval()
    first = model.test_step(batch, 0)
    scores = first.pred_score.clone()
    batch.category = list(reversed(batch.category))
    second = model.test_step(batch, 0)
    torch.testing.assert_close(second.pred_score, scores, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("export_type", "post_processed"), EXPORTED, ids=["openvino-deployed", "openvino-raw", "onnx-raw"]
)
def test_export_matches_pytorch(
    trained: Trained, exports: Exports, tmp_path: Path, post_processed: bool, export_type: ExportType
) -> None:
    """Exported model (OpenVINO IR, or the ONNX file run by OpenVINO) vs PyTorch on images at the input size.

    With and without the post-processor. Both exports carry the standalone ``score.py``.

    The raw outputs are the strict check: the post-processor clamps to [0, 1], which can hide differences.
    Relative difference: max |openvino - torch| divided by the max |torch| of the same output, over the
    pixels of each map and over the tested images for the score (a deployed score near 0, say 1e-3, would
    otherwise turn a difference of 1e-6 into a relative 1e-3).
    """
    _, trained_model, _, datamodule = trained
    model = _copy(trained_model, post_processed)
    exported = exports[export_type, post_processed]
    assert (exported.parent / "score.py").is_file()
    inferencer = openvino_inferencer(exported, cache_folder=tmp_path)
    samples = datamodule.test_data.samples
    torch_scores, openvino_scores = [], []
    for index in range(0, len(samples), max(len(samples) // 6, 1)):
        image = datamodule.test_data[index].image
        assert image.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad():
            expected = model(image.unsqueeze(0))
        predicted = inferencer.predict(samples.image_path.iloc[index])
        torch_scores.append(float(expected.pred_score))
        openvino_scores.append(float(np.asarray(predicted.pred_score).squeeze()))
        reference = expected.anomaly_map.squeeze().numpy()
        actual = np.asarray(predicted.anomaly_map).squeeze()
        relative = np.abs(actual - reference).max() / max(np.abs(reference).max(), 1e-12)
        assert relative <= 1e-3, f"anomaly_map of image {index}: relative difference {relative:.2e}"
    reference = np.array(torch_scores)
    relative = np.abs(np.array(openvino_scores) - reference).max() / max(np.abs(reference).max(), 1e-12)
    assert relative <= 1e-3, f"pred_score: relative difference {relative:.2e}"
    if not post_processed:
        assert len(set(torch_scores)) == len(torch_scores), "raw scores must differ between images"


def test_onnx_export_is_written_at_the_exporters_own_opset(exports: Exports) -> None:
    """Opset 18 as torch writes it: asking for Anomalib's 14 fails to convert and prints a traceback."""
    opsets = {entry.domain: entry.version for entry in onnx.load(exports[ExportType.ONNX, False]).opset_import}
    assert opsets[""] == EXPORT_OPSET == 18


def test_fp16_export_scores_like_fp32(trained: Trained, exports: Exports, tmp_path: Path) -> None:
    """FP16 stores the weights in half precision and computes in f32: raw scores within a relative 5e-2.

    Anomalib's ``CompressionType.FP16`` is ``ov.save_model(..., compress_to_fp16=True)`` of the f32 graph;
    done here to the raw export. The rounded weights of 10 to 15 couplings move the tiny models' scores by
    up to 1.4%, VqFlow's per-prototype z-scores most.
    """
    _, trained_model, _, datamodule = trained
    model = _copy(trained_model, post_processed=False)
    core = ov.Core()
    ov.save_model(
        core.read_model(str(exports[ExportType.OPENVINO, False])), tmp_path / "fp16.xml", compress_to_fp16=True
    )
    compiled = core.compile_model(str(tmp_path / "fp16.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.stack([item.image for item in datamodule.test_data])
    with torch.no_grad():
        expected = model(images).pred_score.numpy()
    actual = np.array([float(compiled([image[None].numpy()])["pred_score"].squeeze()) for image in images])
    assert np.abs(actual - expected).max() <= 5e-2 * np.abs(expected).max()


def test_int8_quantizes_the_backbone_only(trained: Trained, exports: Exports) -> None:
    """INT8 PTQ (NNCF, calibrated on validation images) quantizes backbone operations only; scores stay finite.

    HGAD's export does not name its backbone's weights: INT8 is refused with an error, not applied to the head.

    What INT8 does to AUROC is measured on real data by ``benchmarks/deploy_accuracy.py`` (README).
    """
    _, trained_model, _, datamodule = trained
    model = _copy(trained_model, post_processed=False)
    graph = ov.convert_model(exports[ExportType.ONNX, False])
    if isinstance(model, Hgad):
        # Its pyramid runs the backbone three times; the exporter renames the shared weights.
        with pytest.raises(ValueError, match="cannot tell the backbone apart"):
            model._compress_ov_model(graph, CompressionType.INT8_PTQ, datamodule)
        return
    backbone = backbone_operations(graph)
    quantized = model._compress_ov_model(graph, CompressionType.INT8_PTQ, datamodule)
    # ShapeOf reads a tensor's shape, not its values: a head may take the shape of a quantized activation.
    inputs_quantized = {
        port.get_node().get_friendly_name()
        for operation in quantized.get_ops()
        if operation.get_type_name() == "FakeQuantize"
        for port in operation.output(0).get_target_inputs()
        if port.get_node().get_type_name() != "ShapeOf"
    }
    assert inputs_quantized, "nothing was quantized"
    assert inputs_quantized <= backbone, f"head operations quantized: {sorted(inputs_quantized - backbone)[:5]}"
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    scores = [float(compiled([item.image[None].numpy()])["pred_score"].squeeze()) for item in datamodule.test_data]
    assert np.isfinite(scores).all()


# Loads a checkpoint the safe way (no pickled code) in a fresh interpreter and predicts saved images.
_PREDICT_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
import torch
import anomalib_vqflow.models as models
checkpoint, class_name, images, output = sys.argv[1:]
model = getattr(models, class_name).load_from_checkpoint(checkpoint, weights_only=True).eval()
with torch.no_grad():
    prediction = model(torch.from_numpy(np.load(images)))
np.savez(output, pred_score=prediction.pred_score.numpy(), anomaly_map=prediction.anomaly_map.numpy())
"""


def test_checkpoint_predicts_in_a_fresh_process_what_training_predicted(trained: Trained, tmp_path: Path) -> None:
    """``load_from_checkpoint`` with ``weights_only=True`` in a new interpreter: bit-identical predictions."""
    _, model, engine, _ = trained
    checkpoint = Path(engine.trainer.default_root_dir) / "weights" / "lightning" / "model.ckpt"
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "images.npy", images.numpy())
    model.eval()
    with torch.no_grad():
        expected = model(images)
    command = [sys.executable, "-c", _PREDICT_IN_A_FRESH_PROCESS, str(checkpoint), type(model).__name__]
    result = subprocess.run(
        [*command, str(tmp_path / "images.npy"), str(tmp_path / "predicted.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.load(tmp_path / "predicted.npz")
    np.testing.assert_array_equal(predicted["pred_score"], expected.pred_score.numpy())
    np.testing.assert_array_equal(predicted["anomaly_map"], expected.anomaly_map.numpy())


# Runs the exported folder's score.py as a script and reports whether torch was ever imported.
_SCORE_WITHOUT_TORCH = """
import runpy, sys
script, arguments = sys.argv[1], sys.argv[2:]
sys.argv = [script, *arguments]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("torch imported:", "torch" in sys.modules, "anomalib imported:", "anomalib" in sys.modules)
sys.exit(code)
"""


def _bad_and_converted_images(source: Path, folder: Path) -> None:
    """Grayscale, RGBA and (refused) 16-bit versions of ``source``; a truncated PNG; a text file named like an image."""
    rgb = Image.open(source).convert("RGB")
    gray = rgb.convert("L")
    gray.save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257).save(folder / "gray16.png")  # 8-bit value v -> 257 v
    (folder / "truncated.png").write_bytes((folder / "gray.png").read_bytes()[:100])
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("ignored: not an image suffix")


def _score(exported: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _SCORE_WITHOUT_TORCH, str(exported.parent / "score.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as table:
        return list(csv.DictReader(table))


def test_exported_folder_scores_images_without_torch(trained: Trained, exports: Exports, tmp_path: Path) -> None:
    """The OpenVINO export carries score.py: it scores like PyTorch, never imports torch, and reports bad files.

    Raw outputs (no post-processor) for the strict comparison, as in the parity test above: the
    deployed scores are clamped to [0, 1], which hides differences. The deployed export adds labels.
    """
    _, trained_model, _, datamodule = trained
    model = _copy(trained_model, post_processed=False)
    exported = exports[ExportType.OPENVINO, False]
    images = tmp_path / "images"
    images.mkdir()
    samples = datamodule.test_data.samples
    chosen = list(range(0, len(samples), max(len(samples) // 3, 1)))
    for index in chosen:
        image = datamodule.test_data[index].image  # at the input size, as the parity tests
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(images / f"{index}.png")
    _bad_and_converted_images(images / f"{chosen[0]}.png", images)

    result = _score(exported, "--images", str(images), "--output", str(tmp_path / "raw_scored"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "torch imported: False anomalib imported: False" in result.stdout
    assert "truncated.png" in result.stderr
    assert "notes.png" in result.stderr
    failed = _read_csv(tmp_path / "raw_scored" / "failed.csv")
    assert sorted(Path(row["image"]).name for row in failed) == ["gray16.png", "notes.png", "truncated.png"]
    rows = _read_csv(tmp_path / "raw_scored" / "scores.csv")
    scores = {Path(row["image"]).name: float(row["pred_score"]) for row in rows}
    assert set(scores) == {f"{index}.png" for index in chosen} | {"gray.png", "rgba.png"}
    assert len(list((tmp_path / "raw_scored" / "overlays").glob("*.png"))) == len(scores)
    for index in chosen:
        image = torch.from_numpy(np.asarray(Image.open(images / f"{index}.png"), dtype=np.float32) / 255.0)
        with torch.no_grad():
            expected = float(model(image.permute(2, 0, 1).unsqueeze(0)).pred_score)
        assert abs(scores[f"{index}.png"] - expected) <= 1e-3 * max(abs(expected), 1e-12), index
    assert len({scores[f"{index}.png"] for index in chosen}) == len(chosen), "raw scores must differ between images"

    deployed = exports[ExportType.OPENVINO, True]
    result = _score(deployed, "--images", str(images), "--output", str(tmp_path / "scored"), "--no-overlays")
    assert result.returncode == 1, result.stderr[-2000:]
    rows = _read_csv(tmp_path / "scored" / "scores.csv")
    assert all(0.0 <= float(row["pred_score"]) <= 1.0 for row in rows)
    assert {row["pred_label"] for row in rows} <= {"0", "1"}
    assert not (tmp_path / "scored" / "overlays").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = _score(deployed, "--images", str(empty))
    assert result.returncode == 2
    assert "No images" in result.stderr
