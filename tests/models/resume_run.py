"""One seeded training run of a tiny plugin model on the demo data, in a process of its own (for test_resume.py).

``python resume_run.py <model> <demo root> <folder> [--kill-at-epoch E] [--resume CHECKPOINT]``
trains three epochs and tests, writing the per-category table to ``<folder>/table.json``.
``--kill-at-epoch`` kills the process (SIGKILL: no clean-up of any kind) after the first
training batch of that epoch; ``--resume`` continues from a checkpoint.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

MAX_EPOCHS = 3


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("demo_root", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kill-at-epoch", type=int, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()

    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from anomalib_vqflow.data import MultiClassMVTecAD

    sys.path.insert(0, str(Path(__file__).parent))
    from test_unified_models import TINY_MODELS

    class KillMidEpoch(Callback):
        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if trainer.current_epoch == args.kill_at_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    seed_everything(0, workers=True)
    model = TINY_MODELS[args.model]()
    # One loader worker, so that the workers' seeds are part of what a resume must repeat.
    datamodule = MultiClassMVTecAD(
        root=args.demo_root, train_batch_size=8, eval_batch_size=8, num_workers=1, val_split_ratio=0.25, seed=0
    )
    callbacks = [KillMidEpoch()] if args.kill_at_epoch is not None else []
    engine = Engine(
        max_epochs=MAX_EPOCHS,
        default_root_dir=args.folder,
        logger=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    engine.fit(model=model, datamodule=datamodule, ckpt_path=args.resume)
    engine.test(model=model, datamodule=datamodule)
    (args.folder / "table.json").write_text(json.dumps(model.evaluator.table.to_dict()))


if __name__ == "__main__":
    main()
