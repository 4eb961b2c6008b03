"""Train the relation extractor that jobs/mine.py runs: distant supervision on linked entity pairs in text.

    python jobs/train_extractor.py --set out=runs/extractor [--set data.dataset=umls --set corpus=[notes.txt]]
        [--set extractor.fusion=true --set kg_export=runs/kg_demo/export] [--set encoder.name_or_path=tiny]

Passages: the entity descriptions of ``data`` and every file in ``corpus`` (plain text or JSONL), linked as
jobs/mine.py links them (bikd.mining.inputs). Every linked pair is labelled with the relations the KG's
**train** split holds between them, "no relation" otherwise; ``num_calib_pairs`` of the unrelated pairs are held
out, labelled from **valid**, and fit the softmax temperature. ``store``/``kg_version``: take the KG from a
KG store version instead (its train split; mined triples are not labels). ``kg_export``: the KG snapshot fused
at the mentions (``extractor.fusion``) and/or the KD teacher (``extractor.teacher_weight``). The extractor
is exported to ``out`` (manifest last; an existing extractor there is refused, never overwritten).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bikd.cli import job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml
from bikd.kg.datasets import DataConfig, load_from_config, text_from_config
from bikd.kg.store import KGStore, KGVersion
from bikd.kge.export import load_embeddings
from bikd.lm.encoder import EncoderConfig
from bikd.lm.extractor import ExtractorConfig
from bikd.lm.extractor_io import MANIFEST
from bikd.lm.kg_teacher import KGTable
from bikd.mining.extract import fit_extractor
from bikd.mining.inputs import link_text
from bikd.mining.round import check_id_maps, kg_snapshot_id
from bikd.storage import Storage


@dataclass(kw_only=True, frozen=True)
class ExtractorJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    store: str | None = None
    kg_version: int | None = None
    kg_export: str | None = None
    corpus: tuple[str, ...] = ()
    descriptions: bool = True
    max_pairs_per_passage: int | None = 20
    num_calib_pairs: int = 2000
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    out: str = ""
    #: "auto": the GPU when there is one
    device: str = "auto"
    num_threads: int | None = None

    def __post_init__(self):
        if not self.out:
            raise ValueError("out is required: where the extractor is exported (--set out=URL)")
        if (self.extractor.fusion or self.extractor.teacher_weight > 0) and self.kg_export is None:
            raise ValueError("extractor.fusion and extractor.teacher_weight need the KG snapshot: --set kg_export=URL")
        if self.num_calib_pairs < 1:
            raise ValueError(f"num_calib_pairs must be >= 1, got {self.num_calib_pairs}")
        if self.max_pairs_per_passage is not None and self.max_pairs_per_passage < 1:
            raise ValueError(f"max_pairs_per_passage must be >= 1 or null, got {self.max_pairs_per_passage}")


def read_version(cfg: ExtractorJobConfig) -> KGVersion:
    if cfg.store is not None:
        return KGStore(Storage(cfg.store)).read(cfg.kg_version)
    kg = load_from_config(cfg.data)
    return KGVersion.gold_only(kg)


def train(cfg: ExtractorJobConfig) -> int:
    print(dump_yaml(cfg))
    print(f"torch threads: {set_num_threads(cfg.num_threads)}")
    out = Storage(cfg.out)
    if out.exists(MANIFEST):
        raise ValueError(f"{out.url_of(MANIFEST)}: an extractor is already exported there; choose another out")
    version = read_version(cfg)
    table, kg_snap = None, None
    if cfg.kg_export is not None:
        loaded = load_embeddings(Storage(cfg.kg_export))
        kg_snap = kg_snapshot_id(loaded[-1])
        check_id_maps(loaded[2], loaded[3], kg_snap, version, cfg.store or cfg.data.name)
        table = KGTable.from_loaded(*loaded)
    linked = link_text(version, text_from_config(cfg.data), cfg.corpus, descriptions=cfg.descriptions,
                       max_pairs_per_passage=cfg.max_pairs_per_passage)
    print("passages: " + ", ".join(f"{k} {v}" for k, v in linked.counts.items()))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    fitted = fit_extractor(version, linked, out, encoder=cfg.encoder, extractor=cfg.extractor,
                           num_calib_pairs=cfg.num_calib_pairs, table=table, kg_snapshot_id=kg_snap, device=device,
                           log=lambda line: print(line, flush=True))
    manifest = fitted.manifest
    print(f"extractor {manifest['snapshot_id']} exported to {out.url}; mine with: python jobs/mine.py "
          f"--set extractor={cfg.out} ...")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    args, cfg = parse_job_config(parser, ExtractorJobConfig)
    run_main(lambda: train(cfg), args.debug)


if __name__ == "__main__":
    main()
