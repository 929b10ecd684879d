"""The frozen-feature cache: same weights as uncached training, each image through the backbone once, refusals."""

import sys
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from torchvision.transforms import v2

from anomalib_vqflow.components.feature_cache import FrozenFeatureCache
from anomalib_vqflow.data import MultiClassMVTecAD
from anomalib_vqflow.models import Hgad

sys.path.insert(0, str(Path(__file__).parent))
from test_unified_models import TINY_MODELS

EPOCHS = 2


def _fit(name: str, demo_root: Path, folder: Path, **data: object) -> tuple[object, MultiClassMVTecAD, int, list]:
    """Two seeded epochs: the model, the datamodule, the images the backbone saw, whether each epoch decoded images."""
    seed_everything(0)
    model = TINY_MODELS[name]()
    for key, value in data.pop("model", {}).items():
        setattr(model, key, value)
    seen = []
    model.model.feature_extractor.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    decoded = []

    class RecordDecoding(Callback):
        def on_train_epoch_end(self, trainer: object, _module: object) -> None:
            decoded.append(trainer.train_dataloader.dataset.read_images)

    datamodule = MultiClassMVTecAD(
        root=demo_root, train_batch_size=4, eval_batch_size=4, num_workers=0, val_split_ratio=0.25, seed=0, **data
    )
    engine = Engine(
        max_epochs=EPOCHS,
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        callbacks=[RecordDecoding()],
    )
    engine.fit(model=model, datamodule=datamodule)
    assert datamodule.train_data.read_images  # decoding again after training
    return model, datamodule, sum(seen), decoded


@pytest.mark.parametrize("name", ["hgad", "ms_flow", "uni_ad", "vq_flow"])
def test_cached_training_gives_the_uncached_weights_and_reads_each_image_once(
    name: str, demo_root: Path, tmp_path: Path
) -> None:
    cached, datamodule, cached_images, cached_decoding = _fit(name, demo_root, tmp_path / "cached")
    uncached, _, uncached_images, uncached_decoding = _fit(
        name, demo_root, tmp_path / "uncached", model={"feature_cache": False}
    )
    # With the cache the loader stops decoding the training images (placeholders instead).
    assert (cached_decoding, uncached_decoding) == ([False] * EPOCHS, [True] * EPOCHS)

    train, val = len(datamodule.train_data), len(datamodule.val_data)
    levels = cached.model.pyramid_levels if isinstance(cached, Hgad) else 1
    # Cached: one pass over the training images, validation images the first time they come.
    assert cached_images == levels * (train + val)
    # Uncached: every epoch again, plus HGAD's fit of its standardisation and VqFlow's calibration in every validation.
    extra = {"hgad": train, "vq_flow": EPOCHS * val}.get(name, 0)
    assert uncached_images == levels * (EPOCHS * (train + val) + extra)
    assert cached.feature_store is None  # freed after training

    uncached_state = uncached.model.state_dict()
    for key, value in cached.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, uncached_state[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, uncached_state[key]), key


def test_random_training_augmentation_is_refused_when_the_cache_is_required(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"feature_cache=True.*RandomHorizontalFlip"):
        _fit(
            "ms_flow",
            demo_root,
            tmp_path,
            train_augmentations=v2.RandomHorizontalFlip(),
            model={"feature_cache": True},
        )


def test_random_training_augmentation_trains_uncached_by_default(demo_root: Path, tmp_path: Path) -> None:
    _, datamodule, images, decoding = _fit(
        "ms_flow", demo_root, tmp_path, train_augmentations=v2.RandomHorizontalFlip()
    )
    assert images == EPOCHS * (len(datamodule.train_data) + len(datamodule.val_data))
    assert decoding == [True] * EPOCHS


@pytest.mark.parametrize("memory_bytes", [0, 10**9])
def test_store_returns_exactly_what_was_put(memory_bytes: int) -> None:
    generator = torch.Generator().manual_seed(0)
    levels = [torch.randn(3, 5, 4, 4, generator=generator), torch.randn(3, 7, 2, 2, generator=generator)]
    cache = FrozenFeatureCache(memory_bytes=memory_bytes)
    cache.put_batch(["a", "b", "c"], levels)
    on_disk = memory_bytes == 0
    assert (cache.bytes_on_disk > 0, cache.bytes_in_memory > 0) == (on_disk, not on_disk)
    back = cache.get_batch(["c", "a"])
    for got, put in zip(back, levels, strict=True):
        assert torch.equal(got, put[[2, 0]])
    assert cache.get_batch(["a", "missing"]) is None
    cache.clear()
    assert len(cache) == 0
    assert cache.get_batch(["a"]) is None
