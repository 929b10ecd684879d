"""Tiny plugin models trained and tested with Lightning's DDP on CPU, or tested in one process (for test_ddp.py).

``python ddp_run.py <demo root> <folder> --models NAME... --devices 2`` trains every model for one
epoch on two CPU processes (gloo) and tests its checkpoint on both; ``--devices 1`` tests the
checkpoints found under ``<folder>`` in this one process. Rank 0 writes
``<folder>/<model>/table_<devices>.json``; every rank writes how many test images it scored to
``<folder>/<model>/images_<devices>_rank<rank>.json``. Lightning's DDP launcher starts the second
process by running this script again.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EVAL_BATCH_SIZE = 1


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("demo_root", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--devices", type=int, choices=(1, 2), required=True)
    args = parser.parse_args()

    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from anomalib_vqflow.data import MultiClassMVTecAD

    sys.path.insert(0, str(Path(__file__).parent))
    from test_unified_models import TINY_MODELS

    class CountTestImages(Callback):
        def __init__(self) -> None:
            self.count = 0

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
            self.count += len(batch.image_path)

    for name in args.models:
        seed_everything(0, workers=True)
        folder = args.folder / name
        model = TINY_MODELS[name]()
        datamodule = MultiClassMVTecAD(
            root=args.demo_root,
            train_batch_size=8,
            eval_batch_size=EVAL_BATCH_SIZE,
            num_workers=0,
            val_split_ratio=0.25,
            seed=0,
        )
        counter = CountTestImages()
        distributed = {"strategy": "ddp", "devices": 2} if args.devices == 2 else {"devices": 1}
        engine = Engine(
            max_epochs=1,
            default_root_dir=folder,
            logger=False,
            enable_progress_bar=False,
            callbacks=[counter],
            accelerator="cpu",
            **distributed,
        )
        if args.devices == 2:
            engine.fit(model=model, datamodule=datamodule)
        (checkpoint,) = folder.rglob("model.ckpt")
        engine.test(model=model, datamodule=datamodule, ckpt_path=checkpoint)
        rank = engine.trainer.global_rank
        (folder / f"images_{args.devices}_rank{rank}.json").write_text(json.dumps(counter.count))
        if rank == 0:
            (folder / f"table_{args.devices}.json").write_text(json.dumps(model.evaluator.table.to_dict()))


if __name__ == "__main__":
    main()
