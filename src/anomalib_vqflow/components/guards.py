"""Non-finite guards: a NaN or an infinity in training stops it loudly, or skips its batch when asked.

A flow's NaN does not announce itself: one poisoned step turns every trainable weight into
NaN, training goes on, and the checkpoint written at the end holds nothing usable. The
plugin's models therefore check every training step (see
:class:`~anomalib_vqflow.models.mixins.NonFiniteGuardMixin`): the batch's images before anything
reads them, then the loss and what the model computed from them (the flows: latents and
log-determinants; UniAd: its reconstruction). With ``non_finite="stop"`` (the
default) :class:`NonFiniteError` names the step, the batch's image files and the tensor; with
``"skip"`` the batch is dropped before it changes any weight and the skips are counted in the
log (``train_skipped_batches``). Either way the trainable weights are checked after every
optimizer step, and a checkpoint whose weights are not finite is never written.

Example:
    >>> import torch
    >>> first_non_finite(loss=torch.tensor(1.0), latents=[torch.zeros(2), torch.tensor([0.0, float("nan")])])
    ('latents[1]', '1 NaN and 0 infinite of 2 values')
"""

from collections.abc import Iterable, Sequence

import torch

NON_FINITE_ACTIONS = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training met a NaN or an infinity.

    Example:
        >>> import torch
        >>> try:
        ...     if first_non_finite(loss=torch.tensor(float("nan"))):
        ...         raise NonFiniteError("Non-finite loss at training step 3")
        ... except RuntimeError as error:
        ...     print(type(error).__name__, error)
        NonFiniteError Non-finite loss at training step 3
    """


def check_non_finite_action(action: str) -> str:
    """Return ``action`` if it is one of :data:`NON_FINITE_ACTIONS`.

    Raises:
        ValueError: any other value, naming the argument.
    """
    if action not in NON_FINITE_ACTIONS:
        msg = f"non_finite must be one of {NON_FINITE_ACTIONS}, got {action!r}."
        raise ValueError(msg)
    return action


def first_non_finite(**tensors: torch.Tensor | Sequence[torch.Tensor]) -> tuple[str, str] | None:
    """Find the first tensor with a NaN or an infinity: its name (``name[i]`` in a list) and a count; else ``None``."""
    for name, value in tensors.items():
        named = (
            [(name, value)] if isinstance(value, torch.Tensor) else [(f"{name}[{i}]", t) for i, t in enumerate(value)]
        )
        for label, tensor in named:
            if not torch.isfinite(tensor).all():
                nan = int(torch.isnan(tensor).sum())
                infinite = int(torch.isinf(tensor).sum())
                return label, f"{nan} NaN and {infinite} infinite of {tensor.numel()} values"
    return None


def non_finite_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors (weights, buffers) that hold a NaN or an infinity."""
    return [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
