"""Datasets by name or location.

- ``nations``, ``kinships``, ``umls``: the files PyKEEN's wheel ships (read from its package folder; no
  network, and pykeen itself is not imported).
- ``fb15k237``: a directory holding FB15k-237 (``train/valid/test.txt`` and optionally the text files);
  from the ``path`` argument, else ``$BIKD_FB15K237_DIR``, else ``$BIKD_DATA_DIR/fb15k-237``.
- anything else: a directory URL (local, ``file://``, ``s3://``) holding ``train.txt``, ``valid.txt``,
  ``test.txt`` in the triples TSV format.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from bikd.kg.text import KGText, load_entity_text, load_relation_text, load_wikidata
from bikd.kg.triples import SPLITS, KGSplits, UnknownPolicy, build_splits, read_triples
from bikd.storage import join_url, url_exists

PYKEEN_EMBEDDED = ("nations", "kinships", "umls")


def _pykeen_dataset_dir(name: str) -> str:
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"dataset {name!r} is read from PyKEEN's wheel, but pykeen is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "datasets" / name)


def dataset_dir(name_or_path: str, path: str | None = None) -> str:
    """The directory URL a dataset name or path resolves to."""
    key = name_or_path.lower().replace("-", "").replace("_", "")
    if key in PYKEEN_EMBEDDED:
        return _pykeen_dataset_dir(key)
    if key == "fb15k237":
        if path:
            return path
        if os.environ.get("BIKD_FB15K237_DIR"):
            return os.environ["BIKD_FB15K237_DIR"]
        if os.environ.get("BIKD_DATA_DIR"):
            return join_url(os.environ["BIKD_DATA_DIR"], "fb15k-237")
        raise ValueError("fb15k237 needs its directory: pass path=, or set BIKD_FB15K237_DIR or BIKD_DATA_DIR")
    return name_or_path


def load_dataset(
    name_or_path: str,
    *,
    path: str | None = None,
    unknown: UnknownPolicy = "drop",
    id_map_from: str = "train",
    storage_options: Mapping | None = None,
) -> KGSplits:
    """Load the three splits over one id map; valid/test triples with entities unknown to train are
    dropped and counted (PyKEEN's behaviour) unless ``unknown='error'``."""
    root = dataset_dir(name_or_path, path)
    raw = {s: read_triples(join_url(root, f"{s}.txt"), storage_options) for s in SPLITS}
    name = name_or_path if name_or_path.lower() in PYKEEN_EMBEDDED + ("fb15k237",) else root
    return build_splits(name, raw, unknown=unknown, id_map_from=id_map_from)  # type: ignore[arg-type]


def load_text(name_or_path: str, *, path: str | None = None, storage_options: Mapping | None = None) -> KGText:
    """Whatever text files the dataset directory has (``entity2text.txt``, else ``entity2name.txt``;
    ``relation2text.txt``; ``entity2wikidata.json``); missing ones give empty maps."""
    root = dataset_dir(name_or_path, path)
    opts = dict(storage_options or {})

    def present(fname: str) -> str | None:
        url = join_url(root, fname)
        return url if url_exists(url, opts) else None

    entities = {}
    if url := present("entity2text.txt") or present("entity2name.txt"):
        entities = load_entity_text(url, opts)
    relations = load_relation_text(url, opts) if (url := present("relation2text.txt")) else {}
    wikidata = load_wikidata(url, opts) if (url := present("entity2wikidata.json")) else {}
    return KGText(entities, relations, wikidata)


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    #: a name (nations, kinships, umls, fb15k237) or a directory URL with train/valid/test.txt
    dataset: str = "umls"
    #: directory of a named dataset that is not embedded (fb15k237)
    path: str | None = None
    #: valid/test triples whose entities train lacks: dropped and counted, or an error
    unknown: Literal["drop", "error"] = "drop"

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("data.dataset is empty")


def load_from_config(cfg: DataConfig) -> KGSplits:
    return load_dataset(cfg.dataset, path=cfg.path, unknown=cfg.unknown)
