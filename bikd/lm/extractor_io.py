"""Saving and loading a :class:`~bikd.lm.extractor.RelationExtractor` (the layout of :func:`bikd.lm.train.export_fused`).

A folder (any :class:`~bikd.storage.Storage` URL) holds ``encoder/`` (``save_pretrained`` weights, config and
tokenizer: loadable by ``AutoModel``/``AutoTokenizer`` alone), ``extractor.safetensors`` (pair head, fusion
sites, temperature) and ``manifest.json``, written last: **an export is complete iff its manifest exists**.
The manifest records ``snapshot_id`` (:func:`snapshot_id`, a digest of every weight and the temperature),
which the miner writes into each mined triple's provenance, and, for a fusion-on model,
``requires_kg_table: true`` with the version and shape of the table it was trained with: the KG table is
not saved (it is the KG side's snapshot); pass one to :func:`load_extractor` or call ``set_kg_table``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bikd.config import from_dict, to_dict
from bikd.kge.export import ExportError
from bikd.lm.encoder import quiet_transformers
from bikd.lm.extractor import RelationExtractor
from bikd.lm.fusion import FusionConfig
from bikd.lm.kg_teacher import KGTable
from bikd.manifest import read_listed, sha256_hex, write_manifested
from bikd.storage import Storage

__all__ = ["FORMAT", "snapshot_id", "save_extractor", "load_extractor", "read_manifest"]

MANIFEST, FORMAT, FORMAT_VERSION = "manifest.json", "bikd-relation-extractor", 1
WEIGHTS = "extractor.safetensors"


def snapshot_id(model: RelationExtractor) -> str:
    """``"sha256:<hex>"`` over the names and float32 bytes of the whole ``state_dict`` (encoder, fusion
    sites, head, temperature): equal ids, equal predictions for the same KG table."""
    from bikd.lm.train import state_digest

    return "sha256:" + state_digest(model.state_dict())


_quiet = quiet_transformers  # transformers' per-file progress bars are noise in job logs


def _encoder_prefix(model: RelationExtractor) -> str:
    return "body.encoder." if model.fusion else "body."


def save_extractor(model: RelationExtractor, tokenizer, target: str | Storage, *,
                   relation_labels: Sequence[str] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``model`` and ``tokenizer`` to ``target`` (URL or Storage); the manifest is deleted first and
    written last. ``relation_labels``: the KG relation of each output column (recorded, so that a miner
    can check the extractor predicts *its* relations, not just as many). ``extra``: JSON-able notes kept
    in the manifest (training history, data counts). Returns the manifest (``snapshot_id``,
    ``requires_kg_table``, ``table``, ``relation_labels``, ``sha256`` of every file, ...)."""
    if relation_labels is not None and len(relation_labels) != model.num_relations:
        raise ValueError(f"{len(relation_labels)} relation labels for an extractor of {model.num_relations} relations")
    from safetensors.torch import save

    storage = target if isinstance(target, Storage) else Storage(target)
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        model.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files.update({f"encoder/{p.relative_to(tmp).as_posix()}": p.read_bytes()
                      for p in sorted(Path(tmp).rglob("*")) if p.is_file()})
    prefix = _encoder_prefix(model)
    files[WEIGHTS] = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                           if not k.startswith(prefix)})
    table = model.table
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "snapshot_id": snapshot_id(model),
        "num_relations": model.num_relations,
        "relation_labels": None if relation_labels is None else [str(r) for r in relation_labels],
        "fusion": model.fusion,
        "fusion_config": to_dict(dataclasses.replace(model.fusion_cfg, entity_dim=model.entity_dim)) if model.fusion else None,
        "head_dropout": float(model.head[0].p),
        "max_length": model.max_length,
        "temperature": float(model.temperature),
        "attn_implementation": model.encoder.config._attn_implementation,
        "requires_kg_table": model.fusion,
        "table": None if table is None or not model.fusion else {
            "version": table.version, "num_entities": table.num_entities, "num_relations": table.num_relations,
            "entity_dim": table.entity_dim, "interaction": table.interaction},
        "sha256": {name: sha256_hex(data) for name, data in files.items()},
        "extra": dict(extra or {}),
    }
    text = json.dumps(manifest, indent=2)  # before any write: a non-JSON `extra` fails here
    write_manifested(storage, files, MANIFEST, text.encode("utf-8"))
    return manifest


def read_manifest(source: str | Storage) -> dict:
    """The manifest of a complete export (ExportError, a ValueError, when there is none or it is another format)."""
    storage = source if isinstance(source, Storage) else Storage(source)
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError as e:
        raise ExportError(f"{storage.url_of(MANIFEST)}: not found; {storage.url} holds no relation-extractor export "
                          f"or an incomplete one (manifest.json is written last)") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{storage.url_of(MANIFEST)}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def load_extractor(source: str | Storage, *, table: KGTable | None = None, device: torch.device | str = "cpu"):
    """``(RelationExtractor, tokenizer)`` of a :func:`save_extractor` folder, in eval mode, computing what the
    saved model computed (its ``snapshot_id`` is checked). ``table``: the KG snapshot to fuse (fusion-on
    models need one before predicting; its relation count must match). ExportError when the folder is
    incomplete, a file fails its checksum, or the weights do not give the recorded snapshot id."""
    from safetensors.torch import load
    from transformers import AutoModel, AutoTokenizer

    storage = source if isinstance(source, Storage) else Storage(source)
    manifest = read_manifest(storage)
    files = {}
    for name, sha in manifest["sha256"].items():
        files[name] = read_listed(storage, name, sha, listed_in=storage.url_of(MANIFEST), error=ExportError)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        for name, data in files.items():
            if name.startswith("encoder/"):
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        folder = os.path.join(tmp, "encoder")
        encoder = AutoModel.from_pretrained(folder, local_files_only=True,
                                            attn_implementation=manifest["attn_implementation"])
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fusion_cfg = from_dict(FusionConfig, manifest["fusion_config"]) if manifest["fusion"] else None
    model = RelationExtractor(encoder, manifest["num_relations"], fusion=manifest["fusion"], fusion_cfg=fusion_cfg,
                              head_dropout=manifest["head_dropout"], max_length=manifest["max_length"])
    prefix = _encoder_prefix(model)
    missing, unexpected = model.load_state_dict(load(files[WEIGHTS]), strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise ExportError(f"{storage.url_of(WEIGHTS)} does not fit the model: missing {missing}, unexpected {unexpected}")
    if snapshot_id(model) != manifest["snapshot_id"]:
        raise ExportError(f"{storage.url}: the loaded weights give {snapshot_id(model)}, the manifest records "
                          f"{manifest['snapshot_id']}")
    if table is not None:
        model.set_kg_table(table)
    return model.to(device).eval(), tokenizer
