"""The stock ``anomalib`` command in a subprocess, with the smallest settings that run every code path."""

import json
import os
import subprocess
import sys
from pathlib import Path

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def run_anomalib(arguments: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command (the ``anomalib`` one, usually) without Python's warnings, and capture its output."""
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(arguments, capture_output=True, text=True, env=environment, timeout=600, check=False)


SMALL_MODEL_ARGUMENTS = {
    "MsFlow": ["--model.num_blocks", "[1, 1, 1]", "--model.condition_channels", "8"],
    "VqFlow": [
        "--model.num_blocks",
        "[1, 1, 1]",
        "--model.num_prototypes",
        "4",
        "--model.prototype_channels",
        "8",
        "--model.num_patterns",
        "8",
        "--model.position_channels",
        "8",
    ],
    "UniAd": [
        "--model.hidden_channels",
        "32",
        "--model.num_heads",
        "2",
        "--model.num_encoder_layers",
        "1",
        "--model.num_decoder_layers",
        "1",
        "--model.feedforward_channels",
        "64",
    ],
    # The paper's labelled training, so that the categories reach the model through the CLI's datamodule.
    "Hgad": [
        "--model.layer",
        "2",
        "--model.num_blocks",
        "1",
        "--model.position_channels",
        "8",
        "--model.labels",
        "dataset",
        "--model.num_components",
        "2",
        "--model.num_intra_centers",
        "2",
        "--model.map_size",
        "64",
    ],
}


def small_pre_processor(size: int = 128) -> dict:
    """A pre-processor at the demo images' own size instead of the models' paper sizes (up to 1024 px)."""
    return {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {
            "transform": {
                "class_path": "torchvision.transforms.v2.Compose",
                "init_args": {
                    "transforms": [
                        {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [size, size]}},
                        {
                            "class_path": "torchvision.transforms.v2.Normalize",
                            "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                        },
                    ]
                },
            }
        },
    }


def small_model_arguments(model: str = "MsFlow", size: int = 128) -> list[str]:
    """A plugin model's smallest arguments on the offline backbone, at ``size`` px, for the command line."""
    short_name = model.rsplit(".", 1)[-1]
    return [
        "--model.backbone",
        "tf_efficientnet_lite0",
        *SMALL_MODEL_ARGUMENTS[short_name],
        "--model.pre_processor",
        json.dumps(small_pre_processor(size)),
    ]
