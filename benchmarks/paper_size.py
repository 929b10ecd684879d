"""Size, training speed, training memory and inference speed of the plugin models at their paper settings.

What: each model of ``--models`` is built from its packaged paper config
(``configs/model/<name>.yaml``) and measured on random images at the config's input size
(MsFlow 512 px, VqFlow 384 px, Hgad 1024 px, UniAd 224 px) and a batch size (default 16, VQ-Flow's):

* trainable and total parameters;
* the time of one fp32 training step: forward in training mode, the model's own loss,
  backward, gradient-norm clipping as the model's ``trainer_arguments`` ask (the flows' 2.0, UniAD's 0.1)
  and an Adam step on the trainable parameters; a few warm-up steps, then the mean of
  ``--steps`` timed steps (the device is synchronised before and after);
* the peak GPU memory of training (``torch.cuda.max_memory_allocated``, reset per model),
  and of inference at the batch size;
* inference throughput in eval mode under ``torch.no_grad`` at batch 1 and at the batch size
  (the model's full eval output: image scores and anomaly maps at the input size).

Why: the paper configs are GPU-sized (VqFlow has about 309M trainable parameters); these
numbers say what a training run and a deployment at the papers' settings cost, which the
CPU configs and the demo data cannot tell.

The backbone weights are random (``pre_trained=False``), so nothing is downloaded: the
architecture, the parameter counts, the time and the memory are those of the real model,
but the losses printed mean nothing (no accuracy is measured). The backbone is frozen
either way. No data is read: inputs are standard-normal tensors.

How to run (a GPU for the paper sizes; ``--image-size`` and a small ``--batch-size`` make a
quick check on a CPU)::

    python benchmarks/paper_size.py --output benchmarks/results/paper_size_h100.json
    python benchmarks/paper_size.py --device cpu --batch-size 2 --steps 1 --warmup 1 --image-size 64
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from anomalib_vqflow.cli import build_from_config, config_path


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Free cached blocks and restart the peak-memory count of a CUDA device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset, in MiB; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean seconds of ``step`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def training_loss(lightning_model: Any, output: Any) -> torch.Tensor:
    """The model's loss on its training-mode output, as its ``training_step`` computes it."""
    if hasattr(output, "commitment"):  # VqFlowEncoding: latents, log-Jacobian, commitment, prototypes
        return lightning_model.loss(output.latents, output.log_jacobian, output.commitment)
    if hasattr(output, "components"):  # HgadEncoding: every term, the intra-class ones included
        return lightning_model.loss_terms(output, intra=True)["loss"]
    return lightning_model.loss(*output)  # MsFlow: (latents, log-Jacobian); UniAd: (reconstruction, target)


def measure_training(
    lightning_model: Any, size: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float | None]:
    """Time fp32 training steps (forward in train mode, loss, backward, clipping, Adam) and take their peak memory."""
    torch_model: nn.Module = lightning_model.model
    trainable = [parameter for parameter in torch_model.parameters() if parameter.requires_grad]
    clip = lightning_model.trainer_arguments.get("gradient_clip_val")
    reset_peak_memory(device)
    optimizer = torch.optim.Adam(trainable, lr=float(getattr(lightning_model, "lr", 1e-4)))
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    losses: list[torch.Tensor] = []

    def train_step() -> None:
        torch_model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = training_loss(lightning_model, torch_model(images))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, float(clip))
        optimizer.step()
        losses.append(loss.detach())

    seconds = timed(train_step, device, args.warmup, args.steps)
    optimizer.zero_grad(set_to_none=True)
    return {
        "train_step_ms": seconds * 1e3,
        "train_images_per_s": args.batch_size / seconds,
        "train_peak_memory_mib": peak_memory_mib(device),
        "last_train_loss": float(losses[-1]),
    }


def measure_inference(
    torch_model: nn.Module, batch: int, size: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float | None]:
    """Time eval-mode passes under ``torch.no_grad`` at one batch size and take their peak memory."""
    torch_model.eval()
    reset_peak_memory(device)
    images = torch.randn(batch, 3, size, size, device=device)

    def infer_step() -> None:
        with torch.no_grad():
            torch_model(images)

    seconds = timed(infer_step, device, args.warmup, args.inference_steps)
    return {
        f"infer_b{batch}_ms": seconds * 1e3,
        f"infer_b{batch}_images_per_s": batch / seconds,
        f"infer_b{batch}_peak_memory_mib": peak_memory_mib(device),
    }


def measure_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build ``name`` from its paper config with a random backbone and measure it; return one result row."""
    torch.manual_seed(args.seed)
    lightning_model, _, trainer_settings = build_from_config(config_path(name, "paper"), {"pre_trained": False})
    torch_model: nn.Module = lightning_model.model.to(device)
    config_size = int(lightning_model.input_size[0])
    size = args.image_size or config_size
    parameters = list(torch_model.parameters())
    row: dict[str, Any] = {
        "model": name,
        "config": config_path(name, "paper").name,
        "config_input_size": config_size,
        "input_size": size,
        "batch_size": args.batch_size,
        "trainable_parameters": sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
        "total_parameters": sum(parameter.numel() for parameter in parameters),
        "gradient_clip_val": lightning_model.trainer_arguments.get("gradient_clip_val"),
        "config_train_batch_size": config_batch_size(name),
        "config_max_epochs": trainer_settings.get("max_epochs"),
    }
    print(f"[{name}] {row['trainable_parameters'] / 1e6:.1f}M trainable parameters, input {size} px", flush=True)
    row.update(measure_training(lightning_model, size, args, device))
    print(f"[{name}] train step {row['train_step_ms']:.1f} ms, peak {row['train_peak_memory_mib']} MiB", flush=True)
    for batch in dict.fromkeys((1, args.batch_size)):
        row.update(measure_inference(torch_model, batch, size, args, device))
        print(f"[{name}] inference batch {batch}: {row[f'infer_b{batch}_images_per_s']:.1f} images/s", flush=True)
    return row


def config_batch_size(name: str) -> int | None:
    """The training batch size of the paper config's data section."""
    settings = yaml.safe_load(config_path(name, "paper").read_text())
    return settings.get("data", {}).get("init_args", {}).get("train_batch_size")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device, for the JSON."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table of the results."""

    def number(value: float | None, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    lines = [
        "| model | input | batch | trainable params | train step (ms) | train img/s | train peak mem (GiB) "
        "| infer b1 (img/s) | infer b1 (ms) | infer bN (img/s) | infer bN peak mem (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | | | | {row['error']} | | | | | | |")
            continue
        train_memory = row["train_peak_memory_mib"]
        batch = row["batch_size"]
        infer_memory = row[f"infer_b{batch}_peak_memory_mib"]
        lines.append(
            f"| {row['model']} | {row['input_size']} | {row['batch_size']} "
            f"| {row['trainable_parameters'] / 1e6:.1f}M | {number(row['train_step_ms'])} "
            f"| {number(row['train_images_per_s'])} | {number(train_memory and train_memory / 1024, 2)} "
            f"| {number(row['infer_b1_images_per_s'])} | {number(row['infer_b1_ms'])} "
            f"| {number(row[f'infer_b{batch}_images_per_s'])} "
            f"| {number(infer_memory and infer_memory / 1024, 2)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["ms_flow", "vq_flow", "hgad", "uni_ad"], help="list_models() names"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="training and inference batch (VQ-Flow paper: 16)")
    parser.add_argument("--image-size", type=int, default=None, help="override the config's input size (quick tests)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--inference-steps", type=int, default=None, help="timed inference passes (default: 2 x steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/paper_size.json"), help="JSON file")
    args = parser.parse_args(argv)
    if args.inference_steps is None:
        args.inference_steps = 2 * args.steps
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every model, print the table, write the JSON."""
    args = parse_args(argv)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        try:
            rows.append(measure_model(name, args, device))
        except torch.OutOfMemoryError as error:
            print(f"[{name}] out of memory: {error}", flush=True)
            rows.append({"model": name, "error": "out of memory"})
        reset_peak_memory(device)
    table = markdown_table(rows)
    print(table)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "environment": environment(device),
        "pretrained_backbone": False,
        "results": rows,
        "table": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
