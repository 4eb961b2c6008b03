"""Trained KG embeddings as plain files that other tools read without bikd.

An export is a folder (local or any fsspec URL, through :class:`~bikd.storage.Storage`) holding

- ``entity_embedding.npy``, ``relation_embedding.npy``: NumPy ``.npy`` float32 matrices, row i = id i.
  These are the files DGL-KE writes after training (``<dataset>_<model>_entity.npy`` and
  ``<dataset>_<model>_relation.npy``), so ``numpy.load`` is all a DGL-KE, PyKEEN or plain-NumPy user needs.
- ``entities.tsv``, ``relations.tsv``: one ``id<TAB>label`` line per row, ids 0..n-1 in order (the format of
  DGL-KE's ``entities.dict``/``relations.dict``); ``{label: id}`` from it is the ``entity_to_id`` /
  ``relation_to_id`` map to hand to PyKEEN's ``TriplesFactory``.
- ``model.json``: model name, dimension, table shapes, how the rows are laid out (ComplEx and RotatE store
  ``[real parts | imaginary parts]`` halves; RotatE relations are phases in radians), counts, and the
  sha256 of every data file.

Every file is written atomically, the data files first and ``model.json`` last (an existing ``model.json``
is deleted before anything else is written), so **an export is complete iff model.json exists**, and the
checksums in it tie it to exactly the data files written with it. ``load_embeddings`` checks all of that.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bikd.kge.models import ModelConfig, build_interaction
from bikd.manifest import check_listed, sha256_hex, write_manifested
from bikd.storage import Storage

__all__ = ["ENTITY_FILE", "RELATION_FILE", "ENTITY_LABELS_FILE", "RELATION_LABELS_FILE", "META_FILE",
           "ExportError", "export_embeddings", "load_embeddings"]

ENTITY_FILE, RELATION_FILE = "entity_embedding.npy", "relation_embedding.npy"
ENTITY_LABELS_FILE, RELATION_LABELS_FILE = "entities.tsv", "relations.tsv"
META_FILE = "model.json"
FORMAT, FORMAT_VERSION = "bikd-kge-export", 1

_SCORES = {
    "transe": "-||h + r - t||_p",
    "distmult": "sum_i h_i r_i t_i",
    "complex": "Re(sum_i h_i r_i conj(t_i))",
    "rotate": "-||h * exp(i r) - t||_2 (L2 norm of the complex difference; the paper and DGL-KE sum moduli)",
}
_LAYOUTS = {
    "transe": {"entity": "dim reals (rows L2-normalised during training)", "relation": "dim reals"},
    "distmult": {"entity": "dim reals", "relation": "dim reals"},
    "complex": {"entity": "2*dim reals: [real parts | imaginary parts] halves",
                "relation": "2*dim reals: [real parts | imaginary parts] halves"},
    "rotate": {"entity": "2*dim reals: [real parts | imaginary parts] halves",
               "relation": "dim phases theta in radians, wrapped into [-pi, pi); the rotation is exp(i theta) "
                           "(DGL-KE stores theta * emb_init / pi instead)"},
}


class ExportError(ValueError):
    """An export folder is incomplete or inconsistent; the message names the file."""


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _npy_bytes(x: torch.Tensor | np.ndarray) -> bytes:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _tsv_bytes(labels: Sequence[str], what: str) -> bytes:
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label or any(c in label for c in "\t\r\n"):
            raise ValueError(f"{what} label {i} ({label!r}) must be a non-empty string without tabs or line breaks")
    return "".join(f"{i}\t{label}\n" for i, label in enumerate(labels)).encode("utf-8")


def export_embeddings(
    storage: Storage,
    entity: torch.Tensor | np.ndarray,
    relation: torch.Tensor | np.ndarray,
    entity_labels: Sequence[str],
    relation_labels: Sequence[str],
    model_cfg: ModelConfig,
    prefix: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an export of ``entity (num_entities, d_e)`` and ``relation (num_relations, d_r)`` under
    ``prefix`` (a folder relative to ``storage``; "" = its root); returns the ``model.json`` contents.

    ``model_cfg`` is the config the tables were trained with: it fixes d_e and d_r, which are checked, and
    is recorded. ``extra`` (JSON-serialisable, e.g. the dataset name and test metrics) is stored in
    ``model.json`` under ``"extra"``. Shapes or labels that do not fit raise ValueError before any write.
    """
    interaction = build_interaction(model_cfg)
    num_entities, num_relations = len(entity_labels), len(relation_labels)
    expected = {"entity": (num_entities, model_cfg.dim * interaction.entity_factor),
                "relation": (num_relations, model_cfg.dim * interaction.relation_factor)}
    for kind, table in (("entity", entity), ("relation", relation)):
        if tuple(table.shape) != expected[kind]:
            raise ValueError(f"{kind} table has shape {tuple(table.shape)}, but {len(entity_labels if kind == 'entity' else relation_labels)} "
                             f"{kind} labels and {model_cfg.name} dim {model_cfg.dim} need {expected[kind]}")
    files = {
        ENTITY_FILE: _npy_bytes(entity),
        RELATION_FILE: _npy_bytes(relation),
        ENTITY_LABELS_FILE: _tsv_bytes(entity_labels, "entity"),
        RELATION_LABELS_FILE: _tsv_bytes(relation_labels, "relation"),
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_cfg.name,
        "dim": model_cfg.dim,
        "config": {"name": model_cfg.name, "dim": model_cfg.dim, "init_scale": model_cfg.init_scale,
                   **({"p": model_cfg.p} if model_cfg.name == "transe" else {})},
        "score": _SCORES[model_cfg.name].replace("_p", f"_{model_cfg.p}"),
        "layout": _LAYOUTS[model_cfg.name],
        "num_entities": num_entities,
        "num_relations": num_relations,
        "entity_shape": list(expected["entity"]),
        "relation_shape": list(expected["relation"]),
        "dtype": "float32",
        "files": {"entity": ENTITY_FILE, "relation": RELATION_FILE,
                  "entity_labels": ENTITY_LABELS_FILE, "relation_labels": RELATION_LABELS_FILE},
        "sha256": {name: sha256_hex(data) for name, data in files.items()},
        "extra": dict(extra or {}),
    }
    meta_bytes = json.dumps(meta, indent=2).encode("utf-8")  # serialise before writing: bad `extra` fails early
    write_manifested(storage, {_join(prefix, name): data for name, data in files.items()}, _join(prefix, META_FILE),
                     meta_bytes)
    return meta


def _read(storage: Storage, rel: str) -> bytes:
    try:
        return storage.read_bytes(rel)
    except FileNotFoundError as e:
        raise ExportError(f"{storage.url_of(rel)}: missing, although model.json lists it") from e


def _read_labels(data: bytes, url: str) -> list[str]:
    labels = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        cols = line.split("\t")
        if len(cols) != 2 or cols[0] != str(lineno - 1) or not cols[1]:
            raise ExportError(f"{url}:{lineno}: expected '{lineno - 1}<TAB>label', got {line[:80]!r}")
        labels.append(cols[1])
    return labels


def load_embeddings(storage: Storage, prefix: str = "") -> tuple[np.ndarray, np.ndarray, list[str], list[str], dict[str, Any]]:
    """Read back an export: ``(entity, relation, entity_labels, relation_labels, meta)``, the tables as
    float32 arrays and ``meta`` the ``model.json`` contents.

    Raises :class:`ExportError` (a ValueError) naming the file when ``model.json`` is missing (no export,
    or one that did not finish), a file is missing or differs from its checksum, or a table's shape does
    not match its label file or ``model.json``.
    """
    meta_rel = _join(prefix, META_FILE)
    meta_url = storage.url_of(meta_rel)
    try:
        meta = json.loads(storage.read_bytes(meta_rel))
    except FileNotFoundError as e:
        raise ExportError(f"{meta_url}: not found; {storage.url_of(prefix)} holds no export or an incomplete one "
                          f"(model.json is written last)") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{meta_url}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{meta_url}: not a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{meta_url}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    missing = [k for k in ("files", "sha256", "entity_shape", "relation_shape", "num_entities", "num_relations") if k not in meta]
    if missing:
        raise ExportError(f"{meta_url}: lacks {', '.join(missing)}")

    out, raw = {}, {}
    for key in ("entity", "relation", "entity_labels", "relation_labels"):
        rel = _join(prefix, meta["files"][key])
        raw[rel] = data = _read(storage, rel)
        if key.endswith("labels"):
            out[key] = _read_labels(data, storage.url_of(rel))
        else:
            try:
                out[key] = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as e:
                raise ExportError(f"{storage.url_of(rel)}: not a .npy array: {e}") from e

    for kind in ("entity", "relation"):
        table, labels = out[kind], out[f"{kind}_labels"]
        url = storage.url_of(_join(prefix, meta["files"][kind]))
        labels_url = storage.url_of(_join(prefix, meta["files"][f"{kind}_labels"]))
        if table.ndim != 2 or table.dtype != np.float32:
            raise ExportError(f"{url}: expected a 2-d float32 array, got shape {table.shape} {table.dtype}")
        if table.shape[0] != len(labels):
            raise ExportError(f"{url}: {table.shape[0]} rows, but {labels_url} has {len(labels)} labels")
        count = meta["num_entities" if kind == "entity" else "num_relations"]
        if list(table.shape) != meta[f"{kind}_shape"] or len(labels) != count:
            raise ExportError(f"{url}: shape {list(table.shape)} ({len(labels)} labels), but {meta_url} says "
                              f"{meta[f'{kind}_shape']} ({count} labels)")
    for rel, data in raw.items():  # shapes first (the clearer message), then the files' identity
        check_listed(data, meta["sha256"].get(rel.rsplit("/", 1)[-1]), storage.url_of(rel), listed_in=meta_url,
                     error=ExportError)
    return out["entity"], out["relation"], out["entity_labels"], out["relation_labels"], meta
