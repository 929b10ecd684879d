"""HGAD's mixture components: fitted on the training images before the first step, from clusters or categories.

Where the components come from (``labels``, :class:`LabelSource`): ``"none"`` clusters the
training images' descriptors with k-means; ``"dataset"`` takes the categories the items carry,
in training only. :class:`ComponentFittingMixin` fits the feature standardisation and the
image-to-component centroids in one pass before training (rank 0's fit for every rank), keeps
the category numbering and a health report (purity and NMI of the components against the
categories, for reporting only) in the checkpoint, and gives each training image its component.

Example:
    >>> LabelSource("none") is LabelSource.NONE
    True
"""

import logging
from enum import Enum
from typing import Any

import torch
from anomalib.data import Batch

from anomalib_vqflow.evaluation.clustering import cluster_purity, normalized_mutual_information
from anomalib_vqflow.models.base import preprocessed_batches

logger = logging.getLogger(__name__)

_CATEGORY_INDEX_KEY = "hgad_category_index"
_COMPONENT_HEALTH_KEY = "hgad_component_health"


class LabelSource(str, Enum):
    """Where HGAD's mixture components come from: self-assigned clusters, or the dataset's categories.

    Example:
        >>> LabelSource("dataset") is LabelSource.DATASET
        True
    """

    NONE = "none"
    DATASET = "dataset"


class ComponentFittingMixin:
    """Fit HGAD's components before training, keep them with the checkpoint, and pick each training image's.

    Example:
        >>> callable(ComponentFittingMixin.fit_components)
        True
    """

    labels: LabelSource
    category_index: dict[str, int]
    component_health: dict[str, float]
    model: Any
    trainer: Any
    device: torch.device
    cached_features: Any

    def on_train_start(self) -> None:
        """Fit the feature standardisation and the image-to-component centroids on the training images.

        One pass of the backbone over the training set, before the first step; skipped when
        a resumed checkpoint already holds them (and, with ``labels="dataset"``, its category
        numbering). Under distributed training every rank fits from all images and then takes
        rank 0's fit, so that all ranks use the same components.
        """
        super().on_train_start()
        resumed = bool(self.model.component_assigner.fitted)
        if resumed and (self.labels == LabelSource.NONE or self.category_index):
            return
        descriptors, categories, moments = [], [], []
        with torch.no_grad():
            for batch, images in preprocessed_batches(self, self.trainer.train_dataloader):
                features = self.cached_features(batch, images) or self.model.frozen_features(images)
                moments.append(self.model.standardizer.moments(features))
                descriptors.append(self.model.descriptors(features[0]))
                categories.extend(getattr(batch, "category", None) or [])
        self.model.standardizer.fit(torch.stack(moments).sum(dim=0).to(self.device))
        self.fit_components(torch.cat(descriptors), categories)
        for module in (self.model.standardizer, self.model.component_assigner):
            for buffer in module.buffers():
                buffer.copy_(self.trainer.strategy.broadcast(buffer, src=0))

    def fit_components(self, descriptors: torch.Tensor, categories: list[str]) -> None:
        """Fit the centroids from the training descriptors ``(N, C)``.

        With ``labels="dataset"`` the categories of the images are the classes. With
        ``labels="none"`` they fit nothing: they are only compared with the clusters afterwards,
        for the ``component_purity`` and ``component_nmi`` that training logs (empty when
        the data carries no categories).

        Raises:
            ValueError: With ``labels="dataset"``, if the images carry no category or their number of
                categories is not ``num_components``.
        """
        assigner = self.model.component_assigner
        if self.labels == LabelSource.DATASET:
            if len(categories) != len(descriptors):
                msg = (
                    "Hgad(labels='dataset') needs the category of every training image, but the training items "
                    "carry none; use a datamodule whose items have a category (MultiClassMVTecAD, MultiClassVisa, "
                    "DemoMultiClass) or labels='none'."
                )
                raise ValueError(msg)
            names = sorted(set(categories))
            if len(names) != assigner.num_components:
                msg = (
                    f"Hgad(labels='dataset') has num_components={assigner.num_components}, but the training data has "
                    f"{len(names)} categories {names}; set num_components={len(names)}."
                )
                raise ValueError(msg)
            self.category_index = {name: index for index, name in enumerate(names)}
            labels = torch.tensor([self.category_index[name] for name in categories], device=descriptors.device)
            assigner.fit_class_means(descriptors, labels)
        else:
            generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
            assigner.fit_clusters(descriptors.cpu(), generator)
        self.component_health = self._component_health(assigner(descriptors).tolist(), categories)
        logger.info("HGAD components fitted on %d training images: %s", len(descriptors), self.component_health)

    def _component_health(self, assignments: list[int], categories: list[str]) -> dict[str, float]:
        health = {"components_used": float(len(set(assignments)))}
        if categories and len(categories) == len(assignments):
            health["component_purity"] = cluster_purity(assignments, categories)
            health["component_nmi"] = normalized_mutual_information(assignments, categories)
        return health

    def _components_of(self, batch: Batch, assigned: torch.Tensor) -> torch.Tensor:
        """Training components: the image's own cluster, or its category's index with ``labels="dataset"``."""
        if self.labels == LabelSource.NONE:
            return assigned
        categories = getattr(batch, "category", None) or []
        unknown = sorted(set(categories) - set(self.category_index))
        if len(categories) != len(assigned) or unknown:
            msg = (
                f"Hgad(labels='dataset') was fitted on the categories {sorted(self.category_index)}; a training batch "
                f"carries {categories or 'no categories'}."
            )
            raise ValueError(msg)
        return torch.tensor([self.category_index[name] for name in categories], device=assigned.device)

    def on_train_epoch_end(self) -> None:
        """Log how the components match the categories (for reporting; the model never reads them)."""
        for name, value in self.component_health.items():
            self.log(f"components/{name}", value, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the category numbering of ``labels="dataset"`` and the components' health report.

        With the numbering, training resumes with the same components.
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CATEGORY_INDEX_KEY] = dict(self.category_index)
        checkpoint[_COMPONENT_HEALTH_KEY] = dict(self.component_health)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the category numbering and the health report saved with the checkpoint."""
        super().on_load_checkpoint(checkpoint)
        self.category_index = dict(checkpoint.get(_CATEGORY_INDEX_KEY, {}))
        self.component_health = dict(checkpoint.get(_COMPONENT_HEALTH_KEY, {}))
