"""Edge speed: every model in PyTorch eager and exported to OpenVINO on this CPU, next to its bare backbone.

For each model (the plugin's models from their ``configs/model/<name>_cpu.yaml``, Anomalib's
PaDiM and PatchCore on the same backbone and input size through ``baselines.py``), the
model is exported as Anomalib exports it (``Engine.export``: pre-processing, model and
post-processing in one graph) to PyTorch (``model.pt``) and OpenVINO (``model.xml``), and the
part of it that runs the backbone (the frozen feature extractor on the pre-processed image,
as the model runs it: HGAD runs it on every level of its image pyramid) to ONNX. Each
runtime is then timed in a fresh process of its own, so that peak memory is that runtime's
alone (the OpenVINO process never imports torch, as on an inspection PC):

- images per second at batch 1 and 8, latency p50 and p95 at batch 1 (random images at the
  input size, after warm-up);
- peak resident memory of the process (the kernel's ``VmHWM``) after the model's timings;
- size on disk of ``model.xml`` + ``model.bin`` and of ``model.pt``;
- the bare backbone's batch-1 rate in the same runtime, and the head's time: the model's
  batch-1 median minus the backbone's, both from the same worker (flows, priors, quantizers,
  transformer, scoring, pre- and post-processing), with its share of the model's time;
- with ``--accuracy`` (a ``benchmarks/unified.py`` ``results.json``), each model's mean image
  AUROC over the categories of that benchmark run (averaged over its seeds; blank where the
  run has no such model), so that speed and accuracy stand in one table.

OpenVINO runs in f32 (``INFERENCE_PRECISION_HINT``), the precision that matches PyTorch.
Speed does not depend on the weights, so the plugin's models are timed untrained; PaDiM
and PatchCore are fitted on the embedded demo data first (their size and PatchCore's search
depend on it). PatchCore keeps a 1% coreset of the training patches (``--coreset-ratio``):
its default 10% means a greedy k-center search over all 245,760 patches of the 240 demo
images that takes far longer than everything else here on a 2-core CPU, and its nearest-
neighbour search, the bulk of its inference, grows linearly with the bank (the row says its
size), so the 1% bank flatters PatchCore's speed. No number here is a test: run it on the
machine you care about::

    python benchmarks/edge_speed.py --output benchmarks/results/edge_speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PLUGIN_MODELS = ("ms_flow", "vq_flow", "hgad", "uni_ad")
BASELINES = ("padim", "patchcore")
TARGET_BACKBONE_RATE_SHARE = 2 / 3


def model_key(name: str) -> str:
    """The name as both benchmarks can match it: ``ms_flow`` here is ``MsFlow`` in ``unified.py``."""
    return name.lower().replace("_", "")


def mean_image_auroc(results_file: Path) -> dict[str, float]:
    """Mean image AUROC (%) over a ``unified.py`` run's categories, per model (:func:`model_key`), seeds averaged."""
    by_model: dict[str, list[float]] = {}
    for run in json.loads(results_file.read_text())["results"]:
        by_model.setdefault(model_key(run["model"]), []).append(run["table"]["rows"]["mean"]["image_AUROC"])
    return {name: round(100 * float(np.mean(values)), 1) for name, values in by_model.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    From the kernel's high-water mark of this program (``VmHWM``): ``ru_maxrss`` of a
    subprocess also counts the parent's memory at the time it was forked.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    msg = "No VmHWM in /proc/self/status (peak memory is read from Linux's process status)."
    raise RuntimeError(msg)


def cpu_name() -> str:
    """The processor's model name (and its vector extensions, which decide OpenVINO's kernels and precisions)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{names[0] if names else platform.machine()} ({', '.join(extensions) or 'no AVX2'})"


def time_calls(run: Any, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def summarise(batch_one: list[float], batch_eight: list[float] | None) -> dict[str, float | None]:
    """Rates at batch 1 and 8 (from median times; ``None`` where not timed) and batch-1 latency percentiles, in ms."""
    return {
        "batch1_images_per_second": round(1.0 / float(np.median(batch_one)), 2),
        "batch8_images_per_second": None if batch_eight is None else round(8.0 / float(np.median(batch_eight)), 2),
        "latency_p50_ms": round(1000 * float(np.percentile(batch_one, 50)), 2),
        "latency_p95_ms": round(1000 * float(np.percentile(batch_one, 95)), 2),
    }


def openvino_worker(model_file: Path, backbone_file: Path, size: int, repeats: int) -> dict[str, Any]:
    """Time the exported model and its backbone with OpenVINO alone (this process never imports torch)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    generator = np.random.default_rng(0)
    batch_one = generator.random((1, 3, size, size), dtype=np.float32)
    batch_eight = generator.random((8, 3, size, size), dtype=np.float32)
    compiled = core.compile_model(str(model_file), "CPU", config)
    request = compiled.create_infer_request()
    batch = compiled.input(0).partial_shape[0]
    fixed_batch = batch.get_length() if batch.is_static else None
    result = summarise(
        time_calls(lambda: request.infer([batch_one]), repeats, warmup=10),
        None
        if fixed_batch is not None
        else time_calls(lambda: request.infer([batch_eight]), max(repeats // 5, 3), warmup=2),
    )
    result["fixed_batch"] = fixed_batch
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    profiled = core.compile_model(str(model_file), "CPU", {**config, "PERF_COUNT": "YES"})
    result["operation_ms"] = operation_times(profiled, size)
    backbone = core.compile_model(str(backbone_file), "CPU", config).create_infer_request()
    normalised = generator.standard_normal((1, 3, size, size), dtype=np.float32)
    result["backbone_latency_p50_ms"] = round(
        1000 * float(np.median(time_calls(lambda: backbone.infer([normalised]), repeats, warmup=10))), 2
    )
    assert "torch" not in sys.modules, "the OpenVINO timing must run without torch"
    return result


def operation_times(compiled: Any, size: int, runs: int = 20) -> dict[str, float]:
    """Mean batch-1 milliseconds per OpenVINO operation type (its profiling counters), largest first."""
    request = compiled.create_infer_request()
    image = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
    totals: dict[str, float] = {}
    for _ in range(runs):
        request.infer([image])
        for node in request.get_profiling_info():
            totals[node.node_type] = totals.get(node.node_type, 0.0) + node.real_time.total_seconds() * 1000 / runs
    return {kind: round(ms, 3) for kind, ms in sorted(totals.items(), key=lambda item: -item[1])}


def torch_worker(model_file: Path, size: int, repeats: int) -> dict[str, Any]:
    """Time the model in PyTorch eager (the pickled module Anomalib's ``to_torch`` writes) and its backbone."""
    import torch

    model = torch.load(model_file, map_location="cpu", weights_only=False)["model"].eval()
    generator = torch.Generator().manual_seed(0)
    batch_one = torch.rand(1, 3, size, size, generator=generator)
    batch_eight = torch.rand(8, 3, size, size, generator=generator)
    with torch.inference_mode():
        result = summarise(
            time_calls(lambda: model(batch_one), repeats, warmup=5),
            time_calls(lambda: model(batch_eight), max(repeats // 5, 3), warmup=1),
        )
        result["peak_rss_mib"] = round(peak_rss_mib(), 1)
        backbone = backbone_part(model)
        normalised = torch.randn(1, 3, size, size, generator=generator)
        seconds = time_calls(lambda: backbone(normalised), repeats, warmup=5)
    result["backbone_latency_p50_ms"] = round(1000 * float(np.median(seconds)), 2)
    result["threads"] = torch.get_num_threads()
    return result


def backbone_part(model: Any) -> Any:
    """The module that maps a pre-processed image to the backbone features, as ``model`` runs its backbone."""
    from torch import nn

    class Method(nn.Module):
        def __init__(self, module: nn.Module, name: str) -> None:
            super().__init__()
            self.module, self.name = module, name

        def forward(self, images: Any) -> Any:
            return getattr(self.module, self.name)(images)

    torch_model = model.model
    if hasattr(torch_model, "pyramid_levels"):
        return Method(torch_model, "frozen_features")
    return torch_model.feature_extractor


def build_and_export(name: str, size: int, folder: Path, coreset_ratio: float) -> dict[str, Any]:
    """Build (and for the baselines fit) one model, export it and its backbone; return the paths and its sizes."""
    import torch
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_vqflow.cli import build_from_config, config_path
    from anomalib_vqflow.data import DemoMultiClass

    sys.path.insert(0, str(Path(__file__).parent))
    from baselines import build_baseline

    seed_everything(0)
    engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False)
    if name in BASELINES:
        arguments = {"coreset_sampling_ratio": coreset_ratio} if name == "patchcore" else {}
        model = build_baseline(name, image_size=size, **arguments)
        engine.fit(model=model, datamodule=DemoMultiClass(num_workers=0))
    else:
        model, _, _ = build_from_config(config_path(name))
        model_size = int(model.input_size[0])
        if model_size != size:
            msg = f"{name}'s CPU config is built for {model_size} px, not --image-size {size}."
            raise ValueError(msg)
    model.eval()
    # Anomalib's export of a fitted PatchCore fixes the batch at the example input's 2, which
    # no other batch can run; exported with a static batch of 1 instead, it runs at batch 1 only.
    onnx_kwargs = {"dynamic_axes": {"input": {2: "height", 3: "width"}}} if name == "patchcore" else None
    openvino_file = engine.export(
        model=model, export_type=ExportType.OPENVINO, export_root=folder, onnx_kwargs=onnx_kwargs
    )
    torch_file = engine.export(model=model, export_type=ExportType.TORCH, export_root=folder)
    backbone_file = folder / "backbone.onnx"
    torch.onnx.export(backbone_part(model), (torch.randn(1, 3, size, size),), str(backbone_file), dynamo=True)
    # PatchCore's bank of patches; PaDiM's attribute of the same name is emptied once its Gaussians are fitted.
    memory_bank = getattr(model.model, "memory_bank", None)
    return {
        "memory_bank_patches": len(memory_bank) if memory_bank is not None and len(memory_bank) else None,
        "openvino_file": openvino_file,
        "torch_file": torch_file,
        "backbone_file": backbone_file,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "openvino_size_mib": round(
            sum(path.stat().st_size for path in (openvino_file, openvino_file.with_suffix(".bin"))) / 2**20, 2
        ),
        "torch_size_mib": round(torch_file.stat().st_size / 2**20, 2),
    }


def run_worker(*arguments: str) -> dict[str, Any]:
    """Run this script as a worker in a fresh process and return the JSON it prints last."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        msg = f"Worker {' '.join(arguments)} failed:\n{completed.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(name: str, size: int, repeats: int, coreset_ratio: float, folder: Path) -> dict[str, Any]:
    """Export one model and time it in both runtimes."""
    print(f"{name}: building and exporting", file=sys.stderr, flush=True)
    exported = build_and_export(name, size, folder / name, coreset_ratio)
    print(f"{name}: timing", file=sys.stderr, flush=True)
    openvino = run_worker(
        "openvino", str(exported["openvino_file"]), str(exported["backbone_file"]), str(size), str(repeats)
    )
    eager = run_worker("torch", str(exported["torch_file"]), str(size), str(repeats))
    row: dict[str, Any] = {"model": name}
    row.update({k: v for k, v in exported.items() if not k.endswith("_file")})
    row["openvino"], row["pytorch"] = openvino, eager
    for runtime in (openvino, eager):
        runtime["backbone_share"] = round(runtime["backbone_latency_p50_ms"] / runtime["latency_p50_ms"], 3)
        runtime["head_ms"] = round(runtime["latency_p50_ms"] - runtime["backbone_latency_p50_ms"], 2)
    row["openvino_over_pytorch_batch1"] = round(
        openvino["batch1_images_per_second"] / eager["batch1_images_per_second"], 2
    )
    return row


def label(row: dict[str, Any]) -> str:
    """The model's name, with the size of its memory bank if it has one."""
    bank = row["memory_bank_patches"]
    return row["model"] if bank is None else f"{row['model']} (bank of {bank:,} patches)"


def markdown(rows: list[dict[str, Any]], image_auroc: dict[str, float] | None = None) -> str:
    """The two tables: throughput and latency; the head against its backbone, accuracy, memory and size."""
    lines = [
        "| model | PyTorch b1 img/s | PyTorch b8 img/s | OpenVINO b1 img/s | OpenVINO b8 img/s "
        "| OpenVINO / PyTorch (b1) | OpenVINO b1 p50 / p95 ms | PyTorch b1 p50 / p95 ms |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ov, pt = row["openvino"], row["pytorch"]
        lines.append(
            f"| {label(row)} | {pt['batch1_images_per_second']} | {pt['batch8_images_per_second']} "
            f"| {ov['batch1_images_per_second']} | {ov['batch8_images_per_second'] or 'n/a (a)'} "
            f"| {row['openvino_over_pytorch_batch1']} | {ov['latency_p50_ms']} / {ov['latency_p95_ms']} "
            f"| {pt['latency_p50_ms']} / {pt['latency_p95_ms']} |"
        )
    lines += [
        "",
        "| model | OpenVINO b1 img/s | OpenVINO b8 img/s | OpenVINO b1 p95 ms | backbone alone, OpenVINO b1 img/s "
        "| model rate / backbone rate (target >= 0.67) | head ms (model - backbone), OpenVINO b1 "
        "| head share of b1 time, OpenVINO / PyTorch | image AUROC % | peak RSS MiB, OpenVINO / PyTorch "
        "| size MiB, OpenVINO / PyTorch | parameters (M) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ov, pt = row["openvino"], row["pytorch"]
        backbone_rate = 1000 / ov["backbone_latency_p50_ms"]
        accuracy = (image_auroc or {}).get(model_key(row["model"]), "")
        lines.append(
            f"| {label(row)} | {ov['batch1_images_per_second']} | {ov['batch8_images_per_second'] or 'n/a (a)'} "
            f"| {ov['latency_p95_ms']} | {backbone_rate:.1f} | {ov['backbone_share']:.2f} | {ov['head_ms']:.2f} "
            f"| {100 * (1 - ov['backbone_share']):.0f}% / {100 * (1 - pt['backbone_share']):.0f}% | {accuracy} "
            f"| {ov['peak_rss_mib']:.0f} / {pt['peak_rss_mib']:.0f} "
            f"| {row['openvino_size_mib']} / {row['torch_size_mib']} | {row['parameters_millions']} |"
        )
    lines += [
        "",
        "| model | where OpenVINO's b1 time goes, whole graph (ms per image, by operation type; top 6) |",
        "|:---|:---|",
    ]
    for row in rows:
        top = list(row["openvino"]["operation_ms"].items())[:6]
        lines.append(f"| {row['model']} | " + ", ".join(f"{kind} {ms:.2f}" for kind, ms in top) + " |")
    if any(row["openvino"]["fixed_batch"] for row in rows):
        lines += ["", "(a) the export runs at a fixed batch of 1 (see PatchCore in `build_and_export`)."]
    return "\n".join(lines)


def main() -> int:
    """Measure every model and print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=[*PLUGIN_MODELS, *BASELINES], choices=[*PLUGIN_MODELS, *BASELINES]
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=100, help="timed batch-1 calls (batch 8: a fifth of them)")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore's coreset sampling ratio")
    parser.add_argument("--output", type=Path, default=None, help="folder for edge_speed.json and edge_speed.md")
    parser.add_argument(
        "--accuracy",
        type=Path,
        default=None,
        help="a benchmarks/unified.py results.json: its mean image AUROC per model becomes a column",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *values = args.worker
        if kind == "openvino":
            result = openvino_worker(Path(values[0]), Path(values[1]), int(values[2]), int(values[3]))
        else:
            result = torch_worker(Path(values[0]), int(values[1]), int(values[2]))
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(name, args.image_size, args.repeats, args.coreset_ratio, Path(folder)) for name in args.models]
    import openvino
    import torch

    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({rows[0]['pytorch']['threads']} threads), OpenVINO {openvino.__version__} f32"
    )
    image_auroc = mean_image_auroc(args.accuracy) if args.accuracy else None
    table = markdown(rows, image_auroc)
    accuracy = f" Image AUROC: mean over the categories of `{args.accuracy}`." if args.accuracy else ""
    text = f"Command: `{' '.join(sys.argv)}`\n\nMachine: {machine}; input {args.image_size} px.{accuracy}\n\n{table}\n"
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        summary = {
            "command": " ".join(sys.argv),
            "machine": machine,
            "image_size": args.image_size,
            "image_auroc": image_auroc,
            "rows": rows,
        }
        (args.output / "edge_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.output / "edge_speed.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
