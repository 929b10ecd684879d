"""The non-finite checks by hand."""

import pytest
import torch

from anomalib_vqflow.components.guards import check_non_finite_action, first_non_finite, non_finite_names


def test_first_non_finite_names_the_tensor_and_counts() -> None:
    finite = torch.zeros(3)
    assert first_non_finite(loss=torch.tensor(2.0), latents=[finite, finite]) is None
    bad = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0])
    assert first_non_finite(loss=torch.tensor(2.0), latents=[finite, bad]) == (
        "latents[1]",
        "1 NaN and 2 infinite of 4 values",
    )
    assert first_non_finite(loss=torch.tensor(float("nan")), latents=[bad])[0] == "loss"


def test_non_finite_names_skips_integer_buffers() -> None:
    tensors = {"weight": torch.tensor([1.0, float("nan")]), "count": torch.tensor([3]), "bias": torch.zeros(2)}
    assert non_finite_names(tensors.items()) == ["weight"]


def test_unknown_action_is_refused_by_name() -> None:
    assert check_non_finite_action("skip") == "skip"
    with pytest.raises(ValueError, match="non_finite"):
        check_non_finite_action("ignore")
