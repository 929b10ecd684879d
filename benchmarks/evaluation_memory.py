"""Test-time memory of a plugin model's test run, for growing numbers of test images at 256 px.

The per-category evaluator keeps, per test image, what the exact metrics need: the raw score,
the label, the category, the path, the anomaly map (float32) and the mask (bool), 5 bytes per
pixel, and nothing else. This script checks that the resident memory of a test run grows by
that much per image and no more, and reports the peak, including the exact pixel metrics,
which sort every pixel of a category and then every pixel of all categories (the pooled row).

Each size runs in a fresh process (so that its peak is its own) on a generated data set in
MVTec layout (the demo's photographs, 4 categories, 256 px, 60 % defective test images with
masks): VqFlow from its CPU config (256 px), untrained (memory does not depend on the weights),
``Engine.test`` with no visualizer, data loading in the main process.

    python benchmarks/evaluation_memory.py --images 200 500 1000 --output benchmarks/results/evaluation_memory

Columns (MiB; RSS is the process's resident memory, sampled every 2 ms):

- held outputs: the evaluator's arrays at the end of the test loop;
- loop growth: RSS at the end of the test loop minus RSS at its start;
- loop peak: highest RSS during the loop, above its start;
- metrics peak: highest RSS while the metrics are computed, above the start of the loop;
- process peak: the process's highest RSS overall (model, libraries and data included).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

CATEGORIES = ["brick", "coffee", "coins", "grass"]
IMAGE_SIZE = 256
MIB = 2**20


def _rss() -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    msg = "no VmRSS in /proc/self/status (this script needs Linux)"
    raise RuntimeError(msg)


class RssSampler(threading.Thread):
    """Sample the resident memory every ``interval`` seconds; ``peak_since(mark)`` is the highest since a mark."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[int] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            self.samples.append(_rss())
            time.sleep(self.interval)

    def mark(self) -> int:
        self.samples.append(_rss())
        return len(self.samples) - 1

    def peak_since(self, mark: int) -> int:
        return max(self.samples[mark:])


def dataset(folder: Path, num_images: int) -> Path:
    """A generated data set with ``num_images`` test images (60 % defective), cached in ``folder``."""
    from anomalib_vqflow.data.demo import generate_demo_dataset

    per_category = num_images // len(CATEGORIES)
    good = round(0.4 * per_category)
    return generate_demo_dataset(
        folder / f"test_images_{num_images}",
        categories=CATEGORIES,
        image_size=IMAGE_SIZE,
        num_train=4,
        num_test_good=good,
        num_test_defect=per_category - good,
        seed=0,
    )


def measure(root: Path, output: Path) -> dict[str, Any]:
    """One test run over ``root`` in this (fresh) process; the measurements in MiB."""
    import warnings

    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from anomalib_vqflow.cli import build_from_config, config_path
    from anomalib_vqflow.data import MultiClassMVTecAD

    warnings.filterwarnings("ignore")
    seed_everything(0)
    model, _, _ = build_from_config(config_path("vq_flow"), {"visualizer": False})
    datamodule = MultiClassMVTecAD(root=root, eval_batch_size=16, num_workers=0, seed=0)
    sampler = RssSampler()
    marks: dict[str, Any] = {}

    class Marks(Callback):
        # A trainer callback: its hooks run before the model's, so this sees the end of the loop before the metrics.
        def on_test_start(self, *_: Any) -> None:
            marks["start"] = sampler.mark()

        def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            marks["loop_end"] = sampler.mark()
            outputs = pl_module.evaluator._outputs
            arrays = [*outputs.scores, *outputs.labels, *outputs.maps, *outputs.masks]
            marks["held"] = sum(array.nbytes for array in arrays)

    engine = Engine(
        default_root_dir=output, logger=False, enable_progress_bar=False, accelerator="cpu", callbacks=[Marks()]
    )
    sampler.start()
    engine.test(model=model, datamodule=datamodule)
    end = sampler.mark()
    sampler.running = False
    start_rss = sampler.samples[marks["start"]]
    samples = sampler.samples
    return {
        "test_images": len(datamodule.test_data),
        "held_outputs": marks["held"] / MIB,
        "loop_growth": (samples[marks["loop_end"]] - start_rss) / MIB,
        "loop_peak": (max(samples[marks["start"] : marks["loop_end"] + 1]) - start_rss) / MIB,
        "metrics_peak": (max(samples[marks["loop_end"] : end + 1]) - start_rss) / MIB,
        "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pixels_per_image": IMAGE_SIZE * IMAGE_SIZE,
    }


def main() -> int:
    """Measure every requested size in a fresh process and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/evaluation_memory"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomalib_vqflow_evaluation_memory"))
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from unified import machine_description

    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for num_images in args.images:
        root = dataset(args.work, num_images)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(measure, root, args.work / f"run_{num_images}").result()
        results.append(result)
        print(json.dumps(result))

    lines = [
        f"Test-time memory, VqFlow (vq_flow_cpu.yaml, {IMAGE_SIZE} px), {machine_description()}.",
        f"Command: python benchmarks/evaluation_memory.py --images {' '.join(map(str, args.images))}",
        "",
        "| test images | held outputs | loop growth | loop peak | metrics peak | process peak | "
        "loop growth per image (KiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        per_image = 1024 * row["loop_growth"] / row["test_images"]
        lines.append(
            f"| {row['test_images']} | {row['held_outputs']:.0f} | {row['loop_growth']:.0f} | {row['loop_peak']:.0f} "
            f"| {row['metrics_peak']:.0f} | {row['process_peak']:.0f} | {per_image:.0f} |"
        )
    lines.append("")
    lines.append(
        "MiB. Held outputs: 5 bytes per pixel (float32 map, bool mask) plus score and label, "
        f"{5 * IMAGE_SIZE * IMAGE_SIZE / 1024:.0f} KiB per image. Metrics peak: above the loop's start, while the "
        "exact pixel metrics sort every pixel (per category, then pooled)."
    )
    (args.output / "evaluation_memory.md").write_text("\n".join(lines) + "\n")
    (args.output / "evaluation_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
