"""Training on cached frozen features: the Lightning side of :mod:`anomalib_vqflow.components.feature_cache`.

:class:`FeatureCacheMixin` computes the frozen features of every training image once, in one
ordered pass before the first step (the loader's batch size, the dataset's order), and feeds
them to the torch model in every training step; validation images are cached the first time
they are scored. Each torch model says what its frozen features are
(``frozen_features(images)``) and accepts them back (``forward(images, features=...)``).

Why a pass of its own instead of caching on the fly: the values a batched kernel computes can
depend on which images share the batch, and a resumed run sees other batches than the
uninterrupted one. One fixed pass gives both runs the same values bit for bit.

The cache is exact only when the training images are the same in every epoch: no random
training augmentation in the datamodule and a deterministic pre-processor transform (the
backbone is always frozen here). ``feature_cache=None`` (the default) caches where that holds
and trains uncached otherwise, saying why; ``True`` refuses with an error where it does not
hold; ``False`` never caches.

Under distributed training every rank caches the whole training set (each rank's share of an
epoch changes from epoch to epoch).

Example:
    >>> from anomalib_vqflow.models import MsFlow
    >>> MsFlow(backbone="tf_efficientnet_lite0", pre_trained=False).feature_cache is None  # on where exact
    True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from anomalib.data import Batch
from torchvision.transforms import v2

from anomalib_vqflow.components.feature_cache import FrozenFeatureCache
from anomalib_vqflow.models.base import preprocessed_batches
from anomalib_vqflow.models.mixins import MixinBase

logger = logging.getLogger(__name__)

# Transforms that map an image to the same output every time they are applied.
_DETERMINISTIC_TRANSFORMS = (
    v2.Resize,
    v2.Normalize,
    v2.CenterCrop,
    v2.ToDtype,
    v2.ToImage,
    v2.ToPureTensor,
    v2.Grayscale,
    v2.Identity,
)


def random_transform(transform: object) -> object | None:
    """Return the first transform in ``transform`` (a v2 transform or ``Compose``) not known to be deterministic.

    ``None`` when every one is.

    >>> from torchvision.transforms import v2
    >>> random_transform(v2.Compose([v2.Resize(64), v2.Normalize([0.5] * 3, [0.5] * 3)])) is None
    True
    >>> type(random_transform(v2.Compose([v2.Resize(64), v2.RandomHorizontalFlip()]))).__name__
    'RandomHorizontalFlip'
    """
    if transform is None or isinstance(transform, _DETERMINISTIC_TRANSFORMS):
        return None
    if isinstance(transform, v2.Compose):
        return next((found for t in transform.transforms if (found := random_transform(t)) is not None), None)
    return transform


class FeatureCacheMixin(MixinBase):
    """Frozen features computed once per training image and fed to the torch model in every epoch.

    A model calls :meth:`_init_feature_cache` in its constructor and passes
    ``features=self.cached_features(batch)`` to its torch model in its training and
    validation steps (``None`` means: compute them from the images).

    Example:
        >>> from anomalib_vqflow.models import VqFlow
        >>> model = VqFlow(backbone="tf_efficientnet_lite0", pre_trained=False, feature_cache=False)
        >>> model.feature_cache, model.feature_store is None
        (False, True)
    """

    feature_cache: bool | None
    feature_store: FrozenFeatureCache | None

    def _init_feature_cache(self, feature_cache: bool | None) -> None:
        self.feature_cache = feature_cache
        self.feature_store = None

    def _cache_refusal(self) -> str | None:
        """Why cached features would differ from the ones an uncached epoch computes, or ``None``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        sources = {
            "the datamodule's train_augmentations": getattr(datamodule, "train_augmentations", None),
            "the training dataset's augmentations": getattr(dataset, "augmentations", None),
            "the pre-processor's transform": getattr(getattr(self, "pre_processor", None), "transform", None),
        }
        for source, transform in sources.items():
            if (found := random_transform(transform)) is not None:
                return f"{source} holds {type(found).__name__}, which may change a training image from epoch to epoch"
        return None

    def on_train_start(self) -> None:
        """Fill the cache with the frozen features of every training image, in the dataset's order.

        Raises:
            ValueError: ``feature_cache=True`` where cached features would not be exact.
        """
        super().on_train_start()
        self.feature_store = None
        if self.feature_cache is False:
            return
        if reason := self._cache_refusal():
            if self.feature_cache:
                msg = f"feature_cache=True, but {reason}. Pass feature_cache=False or drop the random transform."
                raise ValueError(msg)
            logger.info("Training without the feature cache: %s.", reason)
            return
        start = time.perf_counter()
        store = FrozenFeatureCache()
        # A loader draws its workers' base seed from the global generator: restore it, so that dropout and
        # noise in the training steps draw the same numbers as without the cache.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch, images in preprocessed_batches(self, self.trainer.train_dataloader):
                if batch.image_path is None:
                    logger.info("Training without the feature cache: the training batches carry no image paths.")
                    return
                store.put_batch(batch.image_path, self.model.frozen_features(images))
        self.feature_store = store
        self._set_read_images(False)
        logger.info(
            "Cached the frozen features of %d training images in %.1f s (%.1f MiB in memory, %.1f MiB on disk).",
            len(store),
            time.perf_counter() - start,
            store.bytes_in_memory / 2**20,
            store.bytes_on_disk / 2**20,
        )

    def on_train_end(self) -> None:
        """Free the cache: testing, prediction and export read images."""
        super().on_train_end()
        if self.feature_store is not None:
            self.feature_store.clear()
            self._set_read_images(True)
        self.feature_store = None

    def _set_read_images(self, read: bool) -> None:
        """Let a dataset that can (``read_images``) skip decoding training images whose features are cached.

        On a 2-core CPU the loader's workers, decoding every file again in every epoch, took a
        third of a cached epoch.
        """
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "read_images"):
            dataset.read_images = read

    def cached_features(self, batch: Batch, images: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """Return the frozen features of ``batch`` for the torch model, or ``None`` to compute them from its images.

        Validation images are stored the first time they come (computed from ``images``, the
        batch's pre-processed images, by default ``batch.image``), so later validations read them.
        """
        store = self.feature_store
        paths: Iterable[str] | None = batch.image_path
        if store is None or paths is None or (not self.trainer.training and not self.trainer.validating):
            return None
        paths = list(paths)
        features = store.get_batch(paths, self.device)
        if features is None and self.trainer.training:
            # The loader may carry placeholder images (see _set_read_images): never compute from those.
            missing = [path for path in paths if path not in store]
            msg = f"Training images {missing[:5]} are not in the feature cache, which holds every training image."
            raise RuntimeError(msg)
        if features is None and self.trainer.validating:
            features = self.model.frozen_features(batch.image if images is None else images)
            store.put_batch(paths, features)
        return features
