"""Every packaged config parses and builds with the same machinery as the `anomalib` command."""

from pathlib import Path

import pytest
import yaml
from anomalib.data import AnomalibDataModule
from anomalib.models import AnomalibModule
from jsonargparse import ArgumentParser

from anomalib_vqflow.cli import CONFIG_DIR, build_from_config, config_path

MODEL_CONFIGS = sorted((CONFIG_DIR / "model").glob("*.yaml"))


def test_repository_configs_link_to_the_packaged_ones() -> None:
    repository_configs = Path(__file__).parents[1] / "configs"
    assert repository_configs.resolve() == CONFIG_DIR.resolve()


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=[c.stem for c in MODEL_CONFIGS])
def test_model_config_builds(config: Path) -> None:
    # Paper backbones have no offline weights here; the architecture is what this test checks.
    model, datamodule, trainer = build_from_config(config, {"pre_trained": False})
    assert isinstance(model, AnomalibModule)
    assert isinstance(datamodule, AnomalibDataModule)
    assert trainer["max_epochs"] > 0
    assert model.input_size is not None


@pytest.mark.parametrize(("name", "paper_size"), [("ms_flow", 512), ("vq_flow", 384), ("hgad", 1024), ("uni_ad", 224)])
def test_every_model_has_paper_and_cpu_config(name: str, paper_size: int) -> None:
    paper = build_from_config(config_path(name, "paper"), {"pre_trained": False})[0]
    cpu = build_from_config(config_path(name, "cpu"), {"pre_trained": False})[0]
    assert tuple(paper.input_size) == (paper_size, paper_size)
    assert tuple(cpu.input_size) == (256, 256)
    assert cpu.hparams.backbone == "tf_efficientnet_lite0"


def test_unknown_config_lists_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match="ms_flow_cpu"):
        config_path("no_such_model")


DATA_CONFIGS = sorted((CONFIG_DIR / "data").glob("*.yaml"))


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=[c.stem for c in DATA_CONFIGS])
def test_data_config_builds(config: Path) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibDataModule, "data", fail_untyped=False)
    parsed = parser.parse_object({"data": yaml.safe_load(config.read_text())})
    datamodule = parser.instantiate_classes(parsed).data
    assert isinstance(datamodule, AnomalibDataModule)
    assert datamodule.val_split_mode == "from_train", "validation must come from good training images"
