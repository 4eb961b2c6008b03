"""Training pieces of the fused LM that are plain torch (the Ray/DeepSpeed driver in bikd.ray.lm_train calls them).

- :func:`build_task_data`: triple classification (KG-BERT style, any KG) or extractive QA (SQuAD v1.1 split by
  article) as :class:`TaskData`, every rank holding the same encoded rows and iterating its own shard
  (:func:`shard`), so that every rank runs the same number of steps;
- :func:`evaluate_task`: accuracy or SQuAD EM/F1 over the whole eval set, each rank scoring its shard;
- :func:`export_fused` / :func:`load_fused`: the trained model as ``save_pretrained`` encoder + tokenizer,
  the fusion sites, heads and KG snapshot as safetensors, and ``manifest.json`` written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bikd.config import from_dict, to_dict
from bikd.kg.text import KGText
from bikd.kg.triples import KGSplits
from bikd.kge.export import ExportError
from bikd.kge.models import ModelConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.lm import squad, triple_cls
from bikd.lm.encoder import TINY as ENCODER_TINY, EncoderConfig, load_encoder, quiet_transformers
from bikd.lm.kg_teacher import KGTable
from bikd.lm.linking import EntityLinker
from bikd.lm.model import FusedLM, LMConfig
from bikd.manifest import read_listed, sha256_hex, write_manifested
from bikd.storage import Storage

__all__ = ["TINY", "linker_for", "TaskConfig", "KGTableConfig", "TaskData", "shard", "build_lm", "encoder_num_layers",
           "load_kg_table", "build_linker", "build_task_data", "evaluate_task", "state_digest",
           "export_fused", "load_fused", "load_fused_tokenizer", "load_fused_and_tokenizer", "read_export_files", "default_squad_path"]

#: ``encoder.name_or_path`` of the small random BERT of :func:`bikd.lm.encoder.tiny_bert` (tests, smoke runs)
TINY = ENCODER_TINY  # kept for callers that import it from here
MANIFEST, FORMAT, FORMAT_VERSION = "manifest.json", "bikd-fused-lm", 1


@dataclass(kw_only=True, frozen=True)
class TaskConfig:
    """``name``: ``"triple_cls"`` (true/corrupted triples of the KG, ``eval_split`` for evaluation) or ``"qa"``
    (SQuAD v1.1 dev split by article: ``squad_eval_fraction`` of the articles evaluate, the rest fine-tune).
    ``max_train``/``max_eval``: at most this many positive triples / questions, a seeded sample (None: all).
    ``link``: tag entity mentions found in the text (relation texts, questions, contexts) for fusion and KD.
    ``squad_holdout``: for choosing hyperparameters, evaluate on a by-article held-out part of the *fine-tune*
    articles (the same fraction, split again with ``seed + 1``) and fine-tune on the rest; the eval articles
    are then never read."""

    name: Literal["triple_cls", "qa"] = "triple_cls"
    classifier_dropout: float = 0.1
    link: bool = False
    max_train: int | None = None
    max_eval: int | None = None
    seed: int = 0
    triple_cls: triple_cls.TripleClsConfig = field(default_factory=triple_cls.TripleClsConfig)
    eval_split: Literal["valid", "test"] = "valid"
    squad_path: str | None = None
    squad_eval_fraction: float = 0.2
    squad_holdout: bool = False
    qa: squad.SquadFeaturesConfig = field(default_factory=squad.SquadFeaturesConfig)

    def __post_init__(self):
        if self.name not in ("triple_cls", "qa"):
            raise ValueError(f"task.name must be 'triple_cls' or 'qa', got {self.name!r}")
        for key in ("max_train", "max_eval"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1 or null, got {getattr(self, key)}")
        if not 0.0 < self.squad_eval_fraction < 1.0:
            raise ValueError(f"task.squad_eval_fraction must be in (0, 1), got {self.squad_eval_fraction}")


@dataclass(kw_only=True, frozen=True)
class KGTableConfig:
    """The KG teacher: a :mod:`bikd.kge.export` folder (``export``, any URL), or, when null, embeddings trained
    in-process on the job's KG with ``train`` (a few seconds on UMLS), so the default needs no other job."""

    export: str | None = None
    train: KGETrainConfig = field(default_factory=lambda: KGETrainConfig(
        model=ModelConfig(name="complex", dim=32), batch_size=256, epochs=10))


def default_squad_path() -> str:
    """``$BIKD_DATA_DIR/squad-v1.1/dev-v1.1.json``, else ``../shared/data/...`` beside the checkout."""
    root = os.environ.get("BIKD_DATA_DIR") or str(Path(__file__).resolve().parents[3] / "shared" / "data")
    return os.path.join(root, "squad-v1.1", "dev-v1.1.json")


# ---- model, teacher, linker -------------------------------------------------------------------------

def encoder_num_layers(cfg: EncoderConfig) -> int:
    """Layers of the configured encoder, read from its config only (to validate fusion.layers early)."""
    if cfg.is_tiny:
        return cfg.tiny_num_layers
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(cfg.resolved_path(), local_files_only=cfg.local_files_only).num_hidden_layers


def build_lm(cfg: LMConfig, table: KGTable | None) -> tuple[FusedLM, Any]:
    """``(FusedLM, tokenizer)``; ``encoder.name_or_path == "tiny"`` gives :func:`tiny_bert` of the ``encoder.tiny_*``
    fields with MiniLM's tokenizer."""
    encoder, tokenizer = load_encoder(cfg.encoder)
    return FusedLM(cfg, encoder, table), tokenizer


def load_kg_table(cfg: KGTableConfig, kg: KGSplits, storage_options: Mapping[str, Any] | None = None) -> KGTable:
    """The teacher snapshot for ``kg``: read from ``cfg.export`` (its entity labels must be the KG's ids, in
    order) or trained with :class:`LocalTrainer` for ``cfg.train.epochs`` epochs (deterministic in its seed)."""
    if cfg.export is not None:
        table = KGTable.from_export(Storage(cfg.export, dict(storage_options or {})))
        for what, labels, ids in (("entity", table.entity_labels, kg.entities.labels),
                                  ("relation", table.relation_labels, kg.relations.labels)):
            if labels is not None and tuple(labels) != tuple(ids):
                raise ValueError(f"kg.export {cfg.export}: its {what} labels are not {kg.name}'s {what} ids in order "
                                 f"({len(labels)} vs {len(ids)} rows); export embeddings trained on this KG")
        return table
    trainer = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg.train)
    for _ in range(cfg.train.epochs):
        trainer.train_epoch()
    model = cfg.train.model
    return KGTable.from_arrays(trainer.model.entity, trainer.model.relation, interaction=model.name,
                               interaction_kwargs={"p": model.p} if model.name == "transe" else {},
                               entity_labels=kg.entities.labels, relation_labels=kg.relations.labels)


def build_linker(kg: KGSplits, text: KGText | None = None) -> EntityLinker:
    """:func:`linker_for` the KG's entities and train split."""
    return linker_for(kg.entities.labels, kg.train, text)


def linker_for(entity_labels: Sequence[str], train: Tensor, text: KGText | None = None) -> EntityLinker:
    """Aliases from the KG's text files (names, Wikidata aliases) when it has them, else each entity's
    label as words (UMLS: ``amino_acid_peptide_or_protein`` -> "amino acid peptide or protein"). Ambiguous
    aliases prefer the entity with more ``train (n, 3)`` triples: only train shapes the links."""
    degree = torch.bincount(train[:, [0, 2]].flatten(), minlength=len(entity_labels)).tolist()
    if text is not None and (text.entities or text.wikidata):
        return EntityLinker.from_kg_text(text, {e: i for i, e in enumerate(entity_labels)}, degree=degree)
    return EntityLinker.build({i: [triple_cls.label_to_text(e)] for i, e in enumerate(entity_labels)}, degree=degree)


# ---- data -------------------------------------------------------------------------------------------

def shard(index: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's part of ``index (N,)``: ``(ceil(N / W),)`` entries ``rank, rank + W, ...`` of ``index``
    padded by wrapping around to a multiple of W (DistributedSampler's rule). Every rank gets as many rows,
    hence as many steps: each step is a collective, and one rank stepping alone would hang the others."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if len(index) == 0:
        raise ValueError("nothing to shard: no rows")
    total = math.ceil(len(index) / world_size) * world_size
    return index.repeat(math.ceil(total / len(index)))[:total][rank::world_size]


@dataclass(frozen=True)
class TaskData:
    """Encoded rows (identical on every rank) and this rank's view of them. ``answers``: QA ground truths of
    every question in ``features`` (None for triple classification)."""

    features: squad.TokenFeatures
    rank: int = 0
    world_size: int = 1
    answers: Mapping[str, tuple[str, ...]] | None = None

    def rows(self, epoch: int | None = None, seed: int = 0) -> Tensor:
        """This rank's row ids: a permutation shared by all ranks (``epoch`` given) or the rows in order."""
        n = len(self.features)
        order = torch.arange(n) if epoch is None else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return shard(order, self.rank, self.world_size)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(math.ceil(len(self.features) / self.world_size) / batch_size)

    def batches(self, batch_size: int, *, epoch: int | None = None, seed: int = 0) -> Iterator[tuple[Tensor, dict]]:
        """``(row ids (b,), batch dict)`` over this rank's rows, ``batch_size`` at a time."""
        rows = self.rows(epoch, seed)
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size], self.features.batch(rows[i:i + batch_size])


def _sample(items: list, k: int | None, seed: int) -> list:  # a seeded subset, in the original order
    return items if k is None or k >= len(items) else [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), k))]


def build_task_data(cfg: TaskConfig, tokenizer, kg: KGSplits, linker: EntityLinker | None, *, text: KGText | None = None,
                    rank: int = 0, world_size: int = 1) -> tuple[TaskData, TaskData]:
    """``(train, eval)`` for ``cfg.name``; every rank builds the same rows (seeded), so any rank can decode
    any prediction. QA reads ``cfg.squad_path`` (default :func:`default_squad_path`)."""
    link = linker.link if linker is not None and cfg.link else None
    if cfg.name == "triple_cls":
        verbaliser = triple_cls.TripleVerbaliser.from_kg(kg, text)
        out = []
        for k, (split, limit) in enumerate((("train", cfg.max_train), (cfg.eval_split, cfg.max_eval))):
            positives = kg.split(split)
            positives = positives[_sample(list(range(len(positives))), limit, cfg.seed + k)]
            split_cfg = dataclasses.replace(cfg.triple_cls, seed=cfg.triple_cls.seed * 3 + {"train": 0, "valid": 1, "test": 2}[split])
            triples, labels = triple_cls.corrupt(positives, kg.all_triples(), kg.num_entities, split_cfg)
            feats = triple_cls.build_features(triples, labels, verbaliser, tokenizer, cfg.triple_cls, link)
            out.append(TaskData(feats, rank, world_size))
        return out[0], out[1]
    finetune, evaluation = squad.split_by_article(squad.load_squad(cfg.squad_path or default_squad_path()),
                                                  cfg.squad_eval_fraction, cfg.seed)
    if cfg.squad_holdout:
        finetune, evaluation = squad.split_by_article(finetune, cfg.squad_eval_fraction, cfg.seed + 1)
    train_ex = _sample(squad.examples_of(finetune), cfg.max_train, cfg.seed)
    eval_ex = _sample(squad.examples_of(evaluation), cfg.max_eval, cfg.seed + 1)
    return (TaskData(squad.build_features(train_ex, tokenizer, cfg.qa, link), rank, world_size),
            TaskData(squad.build_features(eval_ex, tokenizer, cfg.qa, link), rank, world_size, squad.answers_of(eval_ex)))


def _gather(obj: Any) -> list:  # every rank's obj, on every rank
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


@torch.no_grad()
def evaluate_task(model: nn.Module, data: TaskData, task: str, batch_size: int,
                  device: torch.device | str = "cpu", *, kg: bool = True) -> dict[str, float]:
    """Score the whole eval set: each rank runs ``model`` (a FusedLM, a wrapper or a DeepSpeed engine: any
    ``model(batch) -> outputs``) on its shard, predictions are all-gathered, and every rank returns the same
    metrics: ``accuracy`` (triple_cls) or SQuAD ``exact_match``/``f1`` in percent (qa). ``kg=False``: the batches
    go in without their entity links, so no KG row is fused (the LM alone)."""
    was_training = model.training
    model.eval()
    keys = ("logits",) if task == "triple_cls" else ("start_logits", "end_logits")
    rows, outs = [], {k: [] for k in keys}
    try:
        for ids, batch in data.batches(batch_size):
            batch.pop("mention_spans")  # KD losses are not evaluated; fusion reads token_entity
            if not kg:
                batch.pop("token_entity", None)
            result = model({k: v.to(device) for k, v in batch.items()})
            rows.append(ids)
            for k in keys:
                outs[k].append(result[k].float().cpu())
    finally:
        model.train(was_training)
    parts = _gather((torch.cat(rows), {k: torch.cat(v) for k, v in outs.items()}))
    full = {k: torch.zeros(len(data.features), *parts[0][1][k].shape[1:]) for k in keys}
    for ids, values in parts:  # padding rows come back twice with equal values
        for k in keys:
            full[k][ids] = values[k]
    if task == "triple_cls":
        return {"accuracy": triple_cls.accuracy(full["logits"], data.features.tensors["labels"]), "num_examples": len(data.features)}
    preds = squad.postprocess(data.features, full["start_logits"], full["end_logits"])
    return squad.evaluate(data.answers, preds)


def state_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names and float32 bytes of ``tensors`` (sorted by name): equal digests, equal weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- export -----------------------------------------------------------------------------------------

def export_fused(model: FusedLM, tokenizer, target: str | Storage, *, extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``model`` to ``target`` (a URL or Storage): ``encoder/`` (``save_pretrained`` weights + config +
    tokenizer, loadable by ``AutoModel``/``AutoTokenizer`` alone), ``fused.safetensors`` (fusion sites and
    heads), ``kg_table.safetensors`` (the teacher snapshot, when set) and ``manifest.json`` (the LMConfig,
    table version, sha256 of every file, ``extra``). The manifest is deleted first and written last, so
    **an export is complete iff manifest.json exists**. Returns the manifest."""
    from safetensors.torch import save
    storage = target if isinstance(target, Storage) else Storage(target)
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.fused.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files.update({f"encoder/{p.relative_to(tmp).as_posix()}": p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()})
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("fused.encoder.")}
    files["fused.safetensors"] = save(heads)
    table = model.table
    if table is not None:
        files["kg_table.safetensors"] = save({"entity": table.entity.cpu().contiguous(), "relation": table.relation.cpu().contiguous()})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lm_config": to_dict(model.cfg),
        "attn_implementation": model.fused.encoder.config._attn_implementation,
        "table": None if table is None else {
            "version": table.version, "interaction": table.interaction, "interaction_kwargs": dict(table.interaction_kwargs),
            "entity_labels": list(table.entity_labels) if table.entity_labels else None,
            "relation_labels": list(table.relation_labels) if table.relation_labels else None},
        "sha256": {name: sha256_hex(data) for name, data in files.items()},
        "extra": dict(extra or {}),
    }
    text = json.dumps(manifest, indent=2)  # before any write: a non-JSON `extra` fails here
    write_manifested(storage, files, MANIFEST, text.encode("utf-8"))
    return manifest


def _read_export(source: str | Storage) -> tuple[Storage, dict, dict[str, bytes]]:
    storage = source if isinstance(source, Storage) else Storage(source)
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError as e:
        raise ExportError(f"{storage.url_of(MANIFEST)}: not found; {storage.url} holds no fused-LM export or an "
                          f"incomplete one (manifest.json is written last)") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{storage.url_of(MANIFEST)}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    files = {}
    for name, sha in manifest["sha256"].items():
        files[name] = read_listed(storage, name, sha, listed_in=storage.url_of(MANIFEST), error=ExportError)
    return storage, manifest, files


def read_export_files(source: str | Storage) -> dict[str, bytes]:
    """Every file of a complete export by name, checksums checked (ExportError otherwise)."""
    return _read_export(source)[2]


def _encoder_dir(files: Mapping[str, bytes], tmp: str) -> str:
    for name, data in files.items():
        if name.startswith("encoder/"):
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return os.path.join(tmp, "encoder")


def load_fused(source: str | Storage, device: torch.device | str = "cpu") -> FusedLM:
    """The FusedLM of an :func:`export_fused` folder, in eval mode, computing exactly what the exported
    model computed. ExportError (a ValueError) when the folder is incomplete or a file fails its checksum."""
    _, manifest, files = _read_export(source)
    return _fused_from_files(manifest, files, device)


def load_fused_tokenizer(source: str | Storage):
    """The tokenizer saved with an export."""
    return _tokenizer_from_files(_read_export(source)[2])


def load_fused_and_tokenizer(source: str | Storage, device: torch.device | str = "cpu"):
    """``(load_fused(source), load_fused_tokenizer(source))`` from one read of the export."""
    _, manifest, files = _read_export(source)
    return _fused_from_files(manifest, files, device), _tokenizer_from_files(files)


def _tokenizer_from_files(files: Mapping[str, bytes]):
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        return AutoTokenizer.from_pretrained(_encoder_dir(files, tmp), local_files_only=True)


def _fused_from_files(manifest: dict, files: Mapping[str, bytes], device) -> FusedLM:
    from safetensors.torch import load
    from transformers import AutoModel
    cfg = from_dict(LMConfig, manifest["lm_config"])
    with tempfile.TemporaryDirectory() as tmp:
        with quiet_transformers():
            encoder = AutoModel.from_pretrained(_encoder_dir(files, tmp), local_files_only=True,
                                                attn_implementation=manifest["attn_implementation"])
    table = None
    if manifest["table"] is not None:
        t, meta = load(files["kg_table.safetensors"]), manifest["table"]
        table = KGTable.from_arrays(t["entity"], t["relation"], interaction=meta["interaction"], version=meta["version"],
                                    interaction_kwargs=meta["interaction_kwargs"], entity_labels=meta["entity_labels"],
                                    relation_labels=meta["relation_labels"])
    model = FusedLM(cfg, encoder, table)
    missing, unexpected = model.load_state_dict(load(files["fused.safetensors"]), strict=False)
    if unexpected or any(not k.startswith("fused.encoder.") for k in missing):
        raise ExportError(f"fused.safetensors does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()
