"""How a job names its KG (data.dataset / data.path): one way per kind, no option silently ignored, the run
labelled with what it trains on; a data location that is not a folder said in words."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bikd.kg.datasets import DataConfig, dataset_dir, load_from_config, text_from_config
from bikd.kg.triples import KGDataError


def kg_folder(root: Path, name: str = "my-kg") -> Path:
    folder = root / name
    folder.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(Path(dataset_dir("nations")) / f"{split}.txt", folder / f"{split}.txt")
    return folder


def test_default_is_umls():
    cfg = DataConfig()
    assert cfg.name == "umls" and load_from_config(cfg).num_entities == 135


def test_a_path_alone_is_a_kg_of_your_own_labelled_by_its_folder(tmp_path):
    folder = kg_folder(tmp_path)
    cfg = DataConfig(path=str(folder))
    kg = load_from_config(cfg)
    assert cfg.name == "my-kg" and kg.name == "my-kg"  # not "umls", the default it replaces
    assert kg.num_entities == 14  # Nations, not UMLS
    assert DataConfig(path=f"file://{folder}/").name == "my-kg"
    assert text_from_config(cfg).entities == {}


def test_a_path_beside_an_embedded_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.path .* would be ignored: data.dataset 'umls' is embedded"):
        DataConfig(dataset="umls", path=str(tmp_path))


def test_a_folder_in_dataset_points_to_data_path(tmp_path):
    with pytest.raises(ValueError, match="put a KG of your own in data.path"):
        DataConfig(dataset=str(kg_folder(tmp_path)))
    with pytest.raises(ValueError, match="put a KG of your own in data.path"):
        DataConfig(dataset="s3://bucket/kg")


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'umls'"):
        DataConfig(dataset="umsl")


def test_fb15k237_takes_its_folder_from_path(fb15k237_dir):
    cfg = DataConfig(dataset="fb15k237", path=str(fb15k237_dir))
    assert cfg.name == "fb15k237" and cfg.source == "fb15k237"
    assert dataset_dir(cfg.source, cfg.path) == str(fb15k237_dir)


def test_a_file_where_the_folder_belongs_is_named(tmp_path):
    file = kg_folder(tmp_path) / "train.txt"
    with pytest.raises(KGDataError, match=r"train.txt: is a file; expected a folder holding train.txt, valid.txt and test.txt"):
        load_from_config(DataConfig(path=str(file)))
    with pytest.raises(KGDataError, match=r"nowhere: does not exist; expected a folder"):
        load_from_config(DataConfig(path=str(tmp_path / "nowhere")))
