"""Shared fixtures: a tiny embedded demo data set, generated once per test session."""

from pathlib import Path

import pytest

from anomalib_vqflow.data.demo import generate_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo categories (a texture and an object) at 64 px, few images: enough to train one step and score."""
    return generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "demo",
        categories=["brick", "coffee"],
        image_size=64,
        num_train=8,
        num_test_good=3,
        num_test_defect=4,
        seed=0,
    )
