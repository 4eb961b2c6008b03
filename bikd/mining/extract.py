"""Fit the relation extractor a mining round scores with (distant supervision from the KG's train split, the
temperature from pairs labelled by valid) and export it. Shared by jobs/train_extractor.py and the
bidirectional driver, where the encoder is the fused LM's own (``encoder_from_export``): the LM that took in
the KG's knowledge is the one that reads the text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bikd.config import to_dict
from bikd.kg.store import KGVersion
from bikd.lm.encoder import EncoderConfig
from bikd.lm.extractor import ExtractorConfig, build_extractor, calibrate_temperature, save_extractor, train_extractor
from bikd.lm.kg_teacher import KGTable
from bikd.mining.inputs import LinkedText, calibration_split, split_tensor
from bikd.storage import Storage

__all__ = ["FittedExtractor", "fit_extractor", "encoder_from_export"]


@dataclass(frozen=True)
class FittedExtractor:
    manifest: dict[str, Any]  # what save_extractor wrote (snapshot_id, ...)
    history: dict[str, Any]
    temperature: float | None
    counts: dict[str, int]


def fit_extractor(version: KGVersion, linked: LinkedText, out: Storage, *, encoder: EncoderConfig,
                  extractor: ExtractorConfig, num_calib_pairs: int, table: KGTable | None = None,
                  kg_snapshot_id: str | None = None, device: str = "cpu", log=print) -> FittedExtractor:
    """Train on ``linked``'s pairs labelled by ``version``'s train split (``table``: fused when
    ``extractor.fusion``, the KD teacher when ``extractor.teacher_weight``), fit the temperature on
    ``num_calib_pairs`` held-out pairs labelled from valid, and export to ``out`` (manifest last)."""
    R = len(version.relations)
    split = calibration_split(linked.pairs, split_tensor(version, "train"), split_tensor(version, "valid"), R,
                              num_calib_pairs, extractor.seed)
    log("pairs: " + ", ".join(f"{k} {v}" for k, v in split.counts.items()))
    model, tokenizer = build_extractor(extractor, R, encoder_cfg=encoder,
                                       table=table.to(device) if extractor.fusion else None)
    model.to(device)
    history = train_extractor(model, tokenizer, split.train_pairs, split.train_labels, extractor,
                              teacher=None if table is None or extractor.teacher_weight == 0 else table.to(device))
    log(f"trained: {history['num_steps']} steps over {history['num_pairs']} pairs ({history['num_positive']} "
        f"related) in {history['seconds']:.0f} s, loss per epoch {[round(x, 4) for x in history['epoch_loss']]}")
    temperature = None
    if split.calib_pairs:
        temperature = calibrate_temperature(model, tokenizer, split.calib_pairs, split.calib_labels)
        log(f"temperature {temperature:.3f} (fitted on {len(split.calib_pairs)} pairs labelled from valid)")
    else:
        log("temperature 1: fewer than 2 unrelated pairs, none held out to fit it on")
    history = {k: v for k, v in history.items() if k not in ("loss", "kd_loss")}
    counts = {**linked.counts, **split.counts}
    extra = {"kg_version": version.version, "kg_snapshot_id": kg_snapshot_id, "counts": counts, "history": history,
             "encoder": to_dict(encoder), "extractor": to_dict(extractor)}
    manifest = save_extractor(model.cpu(), tokenizer, out, relation_labels=version.relations, extra=extra)
    return FittedExtractor(manifest, history, temperature, counts)


def encoder_from_export(export_url: str, local_dir: str, storage_options: dict | None = None) -> EncoderConfig:
    """An EncoderConfig for the encoder of a fused-LM export (``bikd.lm.train.export_fused``), copied to
    ``local_dir`` (checksums checked): a mining round starts its extractor from the LM's weights."""
    from bikd.lm.train import read_export_files

    files = read_export_files(Storage(export_url, dict(storage_options or {})))
    for name, data in files.items():
        if name.startswith("encoder/"):
            path = os.path.join(local_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return EncoderConfig(name_or_path=os.path.join(local_dir, "encoder"))
