"""Tests for the offline demo dataset generator."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalib_vqflow.data.demo as demo
import anomalib_vqflow.data.demo_images as demo_images
from anomalib_vqflow.data.demo import DEMO_CATEGORIES, default_demo_root, generate_demo_dataset
from anomalib_vqflow.data.demo_images import DEFECT_TYPES, MIN_CHANGE, render_sample

# Small enough to be fast, large enough that every defect type gets one image and scratch two.
SMALL = {"num_train": 3, "num_test_good": 2, "num_test_defect": 5}
CATEGORIES = ("brick", "coins")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "root", categories=CATEGORIES, **SMALL)


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_default_categories_mix_textures_and_objects() -> None:
    kinds = [demo_images._SOURCES[category].texture for category in DEMO_CATEGORIES]
    assert len(DEMO_CATEGORIES) == 4
    assert kinds.count(True) == 2
    assert kinds.count(False) == 2


def test_layout_and_counts(small_root: Path) -> None:
    assert _names(small_root) == sorted([".complete.json", *CATEGORIES])
    # The staging folder was renamed, not left behind.
    assert _names(small_root.parent) == ["root"]
    for category in CATEGORIES:
        folder = small_root / category
        assert _names(folder) == ["ground_truth", "test", "train"]
        assert _names(folder / "train") == ["good"]
        assert _names(folder / "train" / "good") == ["000.png", "001.png", "002.png"]
        assert _names(folder / "test") == sorted(["good", *DEFECT_TYPES])
        assert _names(folder / "test" / "good") == ["000.png", "001.png"]
        assert _names(folder / "test" / "scratch") == ["000.png", "001.png"]
        for defect in ("hole", "stain", "patch"):
            assert _names(folder / "test" / defect) == ["000.png"]
        assert _names(folder / "ground_truth") == sorted(DEFECT_TYPES)
        for path in folder.rglob("*.png"):
            with Image.open(path) as image:
                assert image.size == (128, 128)
                assert image.mode == ("L" if path.parent.parent.name == "ground_truth" else "RGB")


def test_defect_images_have_exact_binary_masks(small_root: Path) -> None:
    for category in CATEGORIES:
        for defect in DEFECT_TYPES:
            images = sorted((small_root / category / "test" / defect).iterdir())
            masks = sorted((small_root / category / "ground_truth" / defect).iterdir())
            assert [path.stem + "_mask.png" for path in images] == [path.name for path in masks]
            for image_path, mask_path in zip(images, masks, strict=True):
                with Image.open(image_path) as image, Image.open(mask_path) as mask_file:
                    assert mask_file.size == image.size
                    mask = np.asarray(mask_file)
                assert mask.dtype == np.uint8
                assert set(np.unique(mask)) == {0, 255}
                assert 0.003 <= (mask == 255).mean() <= 0.06, f"{mask_path} covers {(mask == 255).mean():.2%}"
        assert not (small_root / category / "ground_truth" / "good").exists()


def test_written_files_match_render_sample(small_root: Path) -> None:
    for category in CATEGORIES:
        for split, label in [("train", "good"), ("test", "good"), ("test", "stain"), ("test", "scratch")]:
            _, image, mask = render_sample(category, split, label, 0)
            assert np.array_equal(np.asarray(Image.open(small_root / category / split / label / "000.png")), image)
            if label != "good":
                mask_path = small_root / category / "ground_truth" / label / "000_mask.png"
                assert np.array_equal(np.asarray(Image.open(mask_path)) == 255, mask)


@pytest.mark.parametrize("category", sorted(demo_images._SOURCES))
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_marks_exactly_the_changed_pixels(category: str, defect: str) -> None:
    for index in range(3):
        good, image, mask = render_sample(category, "test", defect, index, seed=7)
        assert good.shape == image.shape == (128, 128, 3)
        assert mask.shape == (128, 128)
        assert mask.any()
        assert np.array_equal((image != good).any(axis=-1), mask)
        change = np.abs(image.astype(int) - good).max(axis=-1)
        assert change[mask].min() >= MIN_CHANGE
        # Clearly visible, not just above the threshold.
        assert change[mask].mean() >= 2 * MIN_CHANGE


def test_small_images_still_get_defects() -> None:
    for defect in DEFECT_TYPES:
        _, _, mask = render_sample("gravel", "test", defect, 0, image_size=32)
        assert mask.shape == (32, 32)
        assert mask.any()


def test_good_samples_have_no_defect() -> None:
    for split in ("train", "test"):
        good, image, mask = render_sample("coffee", split, "good", 1)
        assert np.array_equal(good, image)
        assert not mask.any()


def test_good_images_vary_but_share_appearance() -> None:
    images = [render_sample("brick", "train", "good", index).image.astype(float) for index in range(6)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])
    other = render_sample("coffee", "train", "good", 0).image.astype(float)
    # Crops of one photograph are closer in colour statistics than crops of two photographs.
    within = max(np.abs(image.mean((0, 1)) - images[0].mean((0, 1))).max() for image in images[1:])
    assert within < np.abs(other.mean((0, 1)) - images[0].mean((0, 1))).max()


def test_train_and_test_images_differ() -> None:
    train = render_sample("coins", "train", "good", 0).image
    test = render_sample("coins", "test", "good", 0).image
    base_of_defect = render_sample("coins", "test", "hole", 0).good
    assert not np.array_equal(train, test)
    assert not np.array_equal(test, base_of_defect)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = generate_demo_dataset(tmp_path / "a", categories=CATEGORIES, **SMALL)
    print(f"generated {len(_hashes(first))} files in {time.perf_counter() - start:.2f} s")
    second = generate_demo_dataset(tmp_path / "b", categories=CATEGORIES, **SMALL)
    assert _hashes(first) == _hashes(second)
    other_seed = generate_demo_dataset(tmp_path / "c", categories=CATEGORIES, seed=1, **SMALL)
    changed = {name for name, digest in _hashes(other_seed).items() if _hashes(first)[name] != digest}
    assert "brick/train/good/000.png" in changed


def test_images_do_not_depend_on_the_process() -> None:
    # Python salts str hashes per process; seeds derived from them would differ run to run.
    code = (
        "import hashlib; from anomalib_vqflow.data.demo_images import render_sample; "
        "print(hashlib.sha256(render_sample('gravel', 'test', 'patch', 2).image.tobytes()).hexdigest())"
    )
    here = hashlib.sha256(render_sample("gravel", "test", "patch", 2).image.tobytes()).hexdigest()
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == here


def test_second_call_with_same_parameters_does_nothing(small_root: Path) -> None:
    image = small_root / "brick" / "train" / "good" / "000.png"
    before = image.stat().st_mtime_ns
    assert generate_demo_dataset(small_root, categories=CATEGORIES, **SMALL) == small_root
    assert image.stat().st_mtime_ns == before


def test_marker_records_parameters(small_root: Path) -> None:
    params = json.loads((small_root / ".complete.json").read_text())
    assert params["categories"] == list(CATEGORIES)
    assert params["image_size"] == 128
    assert params["seed"] == 0
    assert params["num_train"] == SMALL["num_train"]


def test_category_order_does_not_matter(small_root: Path) -> None:
    assert generate_demo_dataset(small_root, categories=CATEGORIES[::-1], **SMALL) == small_root


def test_different_parameters_raise_naming_the_folder(small_root: Path) -> None:
    with pytest.raises(ValueError, match="already holds a demo dataset") as error:
        generate_demo_dataset(small_root, categories=CATEGORIES, seed=1, **SMALL)
    assert str(small_root) in str(error.value)


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a demo dataset")
    with pytest.raises(ValueError, match="not a complete demo dataset") as error:
        generate_demo_dataset(tmp_path, categories=["brick"], num_train=1, num_test_good=0, num_test_defect=0)
    assert str(tmp_path) in str(error.value)
    assert _names(tmp_path) == ["mine.txt"]


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path, categories=["coins"], num_train=1, num_test_good=0, num_test_defect=0)
    assert root == tmp_path
    assert _names(root) == [".complete.json", "coins"]
    assert _names(root / "coins") == ["train"]


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(array: np.ndarray, path: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(demo, "_save_png", broken_save)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_dataset(tmp_path / "root", categories=["brick"], num_train=1, num_test_good=0, num_test_defect=0)
    assert _names(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["nope"]}, "unknown demo category"),
        ({"categories": []}, "non-empty"),
        ({"categories": ["brick", "brick"]}, "without repeats"),
        ({"image_size": 16}, "at least 32"),
        ({"num_train": 0}, "num_train >= 1"),
        ({"num_test_defect": -1}, "num_train >= 1"),
    ],
)
def test_invalid_parameters(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_dataset(tmp_path / "root", **kwargs)
    assert not (tmp_path / "root").exists()


def test_render_sample_rejects_unknown_folders() -> None:
    with pytest.raises(ValueError, match="no demo images in train/hole"):
        render_sample("brick", "train", "hole", 0)
    with pytest.raises(ValueError, match="no demo images in test/dent"):
        render_sample("brick", "test", "dent", 0)


def test_photographs_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object) -> None:
        raise AssertionError("the demo dataset must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    demo_images._photo.cache_clear()
    for category in demo_images._SOURCES:
        photo = demo_images._photo(category)
        assert photo.mode == "RGB"
        assert min(photo.size) >= 256


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANOMALIB_VQFLOW_DEMO_ROOT", str(tmp_path / "override"))
    assert default_demo_root() == tmp_path / "override"
    monkeypatch.delenv("ANOMALIB_VQFLOW_DEMO_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_root() == tmp_path / "xdg" / "anomalib_vqflow" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    assert default_demo_root() == Path.home() / ".cache" / "anomalib_vqflow" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_demo_root() == Path.home() / ".cache" / "anomalib_vqflow" / "demo"
