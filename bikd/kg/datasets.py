"""Datasets by name or location.

- ``nations``, ``kinships``, ``umls``: the files PyKEEN's wheel ships (read from its package folder; no
  network, and pykeen itself is not imported).
- ``fb15k237_slice``: a dense slice of FB15k-237 (about 2,000 entities) with its entity text, shipped in bikd's
  own package folder ``bikd/kg/data/fb15k237_slice/`` (every file xz-compressed; built by
  ``bench/data/make_fb15k237_slice.py``, sources, licences and counts in its README.md): the default KG with
  text, needing no external data.
- ``fb15k237``: a directory holding FB15k-237 (``train/valid/test.txt`` and optionally the text files);
  from the ``path`` argument, else ``$BIKD_FB15K237_DIR``, else ``$BIKD_DATA_DIR/fb15k-237``, else
  ``../shared/data/fb15k-237`` beside the checkout.
- anything else: a directory URL (local, ``file://``, ``s3://``) holding ``train.txt``, ``valid.txt``,
  ``test.txt`` in the triples TSV format.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from bikd.kg.text import KGText, load_entity_text, load_relation_text, load_wikidata
from bikd.kg.triples import SPLITS, KGDataError, KGSplits, UnknownPolicy, build_splits, read_triples
from bikd.storage import Storage, join_url, url_exists

PYKEEN_EMBEDDED = ("nations", "kinships", "umls")
#: shipped in bikd's package folder (``bikd/kg/data/<name>/``), each file stored as ``<file>.xz``
BIKD_EMBEDDED = ("fb15k237_slice",)
KNOWN_DATASETS = (*PYKEEN_EMBEDDED, "fb15k237", *BIKD_EMBEDDED)
_PACKAGE_DATA = Path(__file__).resolve().parent / "data"


#: the benchmark data folder beside a checkout (../shared/data), the last place fb15k237 is looked for
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


#: lookup key (``fb15k237slice``) -> the built-in name as KNOWN_DATASETS spells it (``fb15k237_slice``)
_KNOWN_KEYS = {_dataset_key(n): n for n in KNOWN_DATASETS}
_BIKD_EMBEDDED_KEYS = tuple(_dataset_key(n) for n in BIKD_EMBEDDED)


def _file_name(name_or_path: str, fname: str) -> str:
    """A dataset file's name in its folder: bikd's embedded sets store each one xz-compressed."""
    return f"{fname}.xz" if _dataset_key(name_or_path) in _BIKD_EMBEDDED_KEYS else fname


def _pykeen_dataset_dir(name: str) -> str:
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"dataset {name!r} is read from PyKEEN's wheel, but pykeen is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "datasets" / name)


def dataset_dir(name_or_path: str, path: str | None = None) -> str:
    """The directory URL a dataset name or path resolves to."""
    key = _dataset_key(name_or_path)
    if key in PYKEEN_EMBEDDED:
        return _pykeen_dataset_dir(key)
    if key in _BIKD_EMBEDDED_KEYS:
        return str(_PACKAGE_DATA / _KNOWN_KEYS[key])
    if key == "fb15k237":
        if path:
            return path
        if os.environ.get("BIKD_FB15K237_DIR"):
            return os.environ["BIKD_FB15K237_DIR"]
        if os.environ.get("BIKD_DATA_DIR"):
            return join_url(os.environ["BIKD_DATA_DIR"], "fb15k-237")
        beside = SHARED_DATA / "fb15k-237"
        if beside.is_dir():
            return str(beside)
        raise ValueError("fb15k237 needs its directory: pass path=, or set BIKD_FB15K237_DIR or BIKD_DATA_DIR "
                         f"(or place it at {beside})")
    return name_or_path


def _check_dir(root: str, storage_options: Mapping | None) -> None:
    """A missing folder or a file where a folder belongs, said in words (fsspec would raise
    NotADirectoryError for ``<file>/train.txt``)."""
    storage = Storage(root, dict(storage_options or {}))
    if storage.fs.isdir(storage.root):
        return
    what = "is a file" if storage.exists() else "does not exist"
    raise KGDataError(root, None, f"{what}; expected a folder holding train.txt, valid.txt and test.txt "
                                  "(head<TAB>relation<TAB>tail per line)")


def load_dataset(
    name_or_path: str,
    *,
    path: str | None = None,
    unknown: UnknownPolicy = "drop",
    id_map_from: str = "train",
    storage_options: Mapping | None = None,
    name: str | None = None,
) -> KGSplits:
    """Load the three splits over one id map; valid/test triples with entities unknown to train are
    dropped and counted (PyKEEN's behaviour) unless ``unknown='error'``. ``name`` labels the result
    (default: the built-in name, else the folder URL)."""
    root = dataset_dir(name_or_path, path)
    _check_dir(root, storage_options)
    raw = {s: read_triples(join_url(root, _file_name(name_or_path, f"{s}.txt")), storage_options) for s in SPLITS}
    if name is None:
        name = name_or_path if _dataset_key(name_or_path) in _KNOWN_KEYS else root
    return build_splits(name, raw, unknown=unknown, id_map_from=id_map_from)  # type: ignore[arg-type]


def load_text(name_or_path: str, *, path: str | None = None, storage_options: Mapping | None = None) -> KGText:
    """Whatever text files the dataset directory has (``entity2text.txt``, else ``entity2name.txt``;
    ``relation2text.txt``; ``entity2wikidata.json``; each ``.xz`` in bikd's embedded sets); missing ones give
    empty maps."""
    root = dataset_dir(name_or_path, path)
    opts = dict(storage_options or {})

    def present(fname: str) -> str | None:
        url = join_url(root, _file_name(name_or_path, fname))
        return url if url_exists(url, opts) else None

    entities = {}
    if url := present("entity2text.txt") or present("entity2name.txt"):
        entities = load_entity_text(url, opts)
    relations = load_relation_text(url, opts) if (url := present("relation2text.txt")) else {}
    wikidata = load_wikidata(url, opts) if (url := present("entity2wikidata.json")) else {}
    return KGText(entities, relations, wikidata)


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Which KG a job reads. One way to name each kind of KG:

    - an embedded set: ``dataset: nations | kinships | umls`` (the default, umls, when neither key is set),
      or ``dataset: fb15k237_slice`` (about 2,000 FB15k-237 entities with names, descriptions, relation text
      and Wikidata aliases; shipped in the bikd package);
    - FB15k-237: ``dataset: fb15k237`` with its folder in ``path`` (or $BIKD_FB15K237_DIR / $BIKD_DATA_DIR);
    - a KG of your own: ``path: <folder URL>`` alone (local, ``file://``, ``s3://``), holding train.txt,
      valid.txt and test.txt; the run is labelled with the folder's name.

    A key that would be ignored is an error (``path`` with an embedded set; a folder in ``dataset``).
    """

    #: nations, kinships, umls, fb15k237 or fb15k237_slice; null: umls, or the KG at ``path``
    dataset: str | None = None
    #: folder URL of fb15k237, or of a KG of your own (then leave ``dataset`` unset)
    path: str | None = None
    #: valid/test triples whose entities train lacks: dropped and counted, or an error
    unknown: Literal["drop", "error"] = "drop"

    def __post_init__(self):
        if self.dataset is not None:
            key = _dataset_key(self.dataset)
            if key not in _KNOWN_KEYS:
                if "/" in self.dataset or "\\" in self.dataset or os.path.exists(self.dataset):
                    raise ValueError(f"data.dataset names a built-in dataset ({', '.join(KNOWN_DATASETS)}), got the "
                                     f"location {self.dataset!r}: put a KG of your own in data.path instead")
                close = difflib.get_close_matches(key, _KNOWN_KEYS, n=1)
                hint = f" (did you mean {_KNOWN_KEYS[close[0]]!r}?)" if close else ""
                raise ValueError(f"data.dataset {self.dataset!r} is not a built-in dataset{hint}; expected one of "
                                 f"{', '.join(KNOWN_DATASETS)}, or leave it unset and put a KG folder in data.path")
            if key in PYKEEN_EMBEDDED and self.path is not None:
                raise ValueError(f"data.path {self.path!r} would be ignored: data.dataset {self.dataset!r} is embedded "
                                 f"(PyKEEN's wheel). Drop data.dataset to train on the KG at data.path, or drop data.path")
            if key in _BIKD_EMBEDDED_KEYS and self.path is not None:
                raise ValueError(f"data.path {self.path!r} would be ignored: data.dataset {self.dataset!r} is embedded "
                                 f"(shipped in the bikd package). Drop data.dataset to train on the KG at data.path, "
                                 f"or drop data.path")
        if self.path is not None and not self.path.strip():
            raise ValueError("data.path is empty")

    @property
    def name(self) -> str:
        """The run's label: the built-in set's name, else the KG folder's name."""
        if self.dataset is not None:
            return _KNOWN_KEYS[_dataset_key(self.dataset)]
        if self.path is not None:
            return posixpath.basename(self.path.rstrip("/")) or self.path
        return "umls"

    @property
    def source(self) -> str:
        """What ``load_dataset`` is given: a built-in name or the folder URL."""
        if self.dataset is None and self.path is not None:
            return self.path
        return self.dataset or "umls"


def load_from_config(cfg: DataConfig) -> KGSplits:
    return load_dataset(cfg.source, path=cfg.path if cfg.dataset is not None else None, unknown=cfg.unknown,
                        name=cfg.name)


def text_from_config(cfg: DataConfig) -> KGText:
    return load_text(cfg.source, path=cfg.path if cfg.dataset is not None else None)
