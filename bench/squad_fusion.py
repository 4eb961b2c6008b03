"""Plain vs knowledge-fused all-MiniLM-L6-v2 on extractive QA (SQuAD v1.1 dev split by article) and the LAMA probe.

**Data.** Only SQuAD v1.1 *dev* is available here. It is split by article with a fixed seed
(``bikd.lm.squad.split_by_article``, seed 0, 20% of the articles evaluate); ``--train-questions`` questions
are sampled from the fine-tune articles and ``--eval-questions`` from the evaluation articles (seeded: the
same rows for every run), encoded into windows of ``--max-length`` tokens with doc stride ``--doc-stride``.
Every number this script writes is on that split, not on the official dev set.

**Teacher and linking.** TransE on FB15k-237 with ``configs/kge_fb15k237_transe.yaml``'s recipe
(``--kge-epochs`` epochs, in process, cached under ``--cache``); mentions linked over FB15k-237's names and
Wikidata aliases (``bikd.lm.linking``).

**Runs.** Per seed, two models start from the same weights (MiniLM + the heads and fusion sites of one
``FusedLM`` built under the seed) and take the same steps over the same windows in the same order:

- *plain*: batches without ``token_entity``/``mention_spans``: fusion and KD idle, i.e. MiniLM + a QA head;
- *fused*: entity fusion after ``--layers`` and both KD losses on (entity alignment and relation
  distillation, T = 2), each with the weight ``w`` chosen below.

**KD weight.** The losses' gradients differ in size (at step 0, entity alignment's norm is ~6x the QA
loss's), and under global clipping a weight of 1 leaves the task a small share of each update. So ``w`` is
chosen among ``--kd-weights`` by F1 on a by-article *held-out part of the fine-tune articles*
(``TaskConfig.squad_holdout``: ``--select-train-questions`` fit / ``--select-eval-questions`` held out,
first seed, plain run beside it for reference); the evaluation articles play no part in the choice.

AdamW (lr ``--lr``, weight decay 0.01), 10% linear warmup then linear decay, gradient clipping at 1.0;
attention-probability dropout ``--attention-dropout`` (default 0, MiniLM's is 0.1: with it torch's CPU
attention takes its unfused path, 1.5x the step time), hidden dropout as MiniLM's (0.1).
EM/F1 are the official SQuAD normalisation over the evaluation questions.

**Probe.** LAMA T-REx facts whose subject and object are FB15k-237 entities (``bikd.lm.probe``), P@1 of
the object among its relation's candidates, the object replaced by ``[MASK]`` and the subject's words tagged
with its entity. A plain encoder has no map into the KG's space, so each fine-tuned model gets the same
*linear probe*, fitted with the encoder frozen: from ``--probe-windows`` training windows, up to 4 linked
mentions per window are replaced by ``[MASK]`` tokens (and unlinked; the other mentions stay linked), and a
``Linear(H, d_e)`` is fitted so that the mean state over each masked span picks its entity among all
14,541 by cosine similarity (full softmax, scale 20). The fused model is also probed through its own KD
head (``entity_proj``), as ``probe_p1_fused_kd_head``.

    python bench/squad_fusion.py [--seeds 0 1 2] [--train-questions 2600] [--eval-questions 1000]

The defaults take about 100 minutes on 2 CPU cores (selection: 5 runs of ~110 steps; comparison: 6 runs of
1 epoch over ~3,500 windows of 192 tokens);
``--selection-from bench/results/squad_fusion.json`` reuses an earlier run's KD weight selection (same
recipe, checked) so that a run with more seeds costs only its comparison runs (~22 minutes per seed);
on a GPU use the full fine-tune part (``--train-questions 100000 --max-length 384 --doc-stride 128
--epochs 2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bikd.config import from_dict  # noqa: E402
from bikd.kg.datasets import load_dataset, load_text  # noqa: E402
from bikd.kge.training import KGETrainConfig  # noqa: E402
from bikd.lm import probe, squad  # noqa: E402
from bikd.lm.encoder import EncoderConfig, load_encoder  # noqa: E402
from bikd.lm.fusion import FusionConfig  # noqa: E402
from bikd.lm.kd import KDConfig, mention_representations  # noqa: E402
from bikd.lm.kg_teacher import KGTable  # noqa: E402
from bikd.lm.model import FusedLM, LMConfig  # noqa: E402
from bikd.lm.train import KGTableConfig, TaskConfig, build_linker, build_task_data, evaluate_task, load_kg_table  # noqa: E402
from bikd.lm.trainer import LOSSES, LMTrainer, TorchEngine, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from bikd.lm.trainer import NO_KG  # noqa: E402  (the keys the plain LM goes without)


class Plain(nn.Module):
    """The FusedLM fed without entities: what the plain encoder + head computes."""

    def __init__(self, lm: FusedLM):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        return self.lm({k: v for k, v in batch.items() if k not in NO_KG})


def teacher(kg, args) -> KGTable:
    """TransE on FB15k-237, the FB15k-237 config's recipe; cached by epochs and seed."""
    train = from_dict(KGETrainConfig, yaml.safe_load((ROOT / "configs" / "kge_fb15k237_transe.yaml").read_text())["train"])
    train = dataclasses.replace(train, epochs=args.kge_epochs)
    cache = Path(args.cache) / f"transe_fb15k237_e{train.epochs}_s{train.seed}.pt"
    if cache.exists():
        t = torch.load(cache)
        return KGTable.from_arrays(t["entity"], t["relation"], interaction="transe", interaction_kwargs={"p": train.model.p},
                                   entity_labels=kg.entities.labels, relation_labels=kg.relations.labels)
    start = time.perf_counter()
    table = load_kg_table(KGTableConfig(train=train), kg)
    print(f"teacher: TransE {train.epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"entity": table.entity, "relation": table.relation}, cache)
    return table


def build_model(table: KGTable, args, seed: int, kd_weight: float) -> FusedLM:
    torch.manual_seed(seed)
    encoder, _ = load_encoder(EncoderConfig(attention_dropout=args.attention_dropout))
    kd = KDConfig(seed=seed, entity_weight=kd_weight, relation_weight=kd_weight)
    return FusedLM(LMConfig(task="qa", fusion=FusionConfig(layers=tuple(args.layers)), kd=kd), encoder, table)


def finetune(model: nn.Module, data, args, seed: int, fused: bool) -> dict:
    """bikd's own LM step loop (bikd.lm.trainer, as the Ray Train worker runs it) in one process."""
    # plain: the fusion sites and KD heads are idle (FusedLM gives them zero gradients, which AdamW's
    # weight decay and momentum would still act on), so they are left out
    skip = set() if fused else {id(p) for p in model.conditional_parameters()}
    total = data.num_batches(args.batch_size) * args.epochs
    cfg = TrainConfig(lr=args.lr, weight_decay=0.01, warmup_steps=max(1, total // 10), batch_size=args.batch_size,
                      epochs=args.epochs, seed=seed)
    engine = TorchEngine(model, cfg, total, clip=1.0,
                         params=[p for p in model.parameters() if p.requires_grad and id(p) not in skip])
    trainer = LMTrainer(model, engine, data, data, cfg, task="qa", kg=fused)
    sums, start = torch.zeros(len(LOSSES), dtype=torch.float64), time.perf_counter()
    model.train()
    while not trainer.done:
        sums += trainer.train_step()
        if trainer.step % 50 == 0:
            print(f"  step {trainer.step}/{total}: " + ", ".join(f"{k} {v / trainer.step:.3f}" for k, v in zip(LOSSES, sums.tolist())), flush=True)
    return {"steps": trainer.step, "train_s": time.perf_counter() - start,
            **{f"mean_{k}": v / trainer.step for k, v in zip(LOSSES[1:], sums.tolist()[1:])}}


def qa_task(args, data_dir: Path, *, holdout: bool, max_train: int, max_eval: int) -> TaskConfig:
    return TaskConfig(name="qa", link=True, max_train=max_train, max_eval=max_eval, seed=0, squad_holdout=holdout,
                      squad_path=str(data_dir / "squad-v1.1" / "dev-v1.1.json"),
                      qa=squad.SquadFeaturesConfig(max_length=args.max_length, doc_stride=args.doc_stride,
                                                   max_query_length=args.max_query_length))


def select_kd_weight(table: KGTable, kg, linker, text, tokenizer, args, data_dir: Path) -> tuple[float, list[dict]]:
    """The KD weight (entity and relation alike) with the best F1 on a held-out part of the *fine-tune*
    articles (``TaskConfig.squad_holdout``), first seed only; the evaluation articles are not read.
    Plain runs too, for reference."""
    if args.selection_from:
        return selection_from(args)
    if len(args.kd_weights) == 1:
        return args.kd_weights[0], []
    task = qa_task(args, data_dir, holdout=True, max_train=args.select_train_questions,
                   max_eval=args.select_eval_questions)
    fit, held = build_task_data(task, tokenizer, kg, linker, text=text)
    seed, runs = args.seeds[0], []
    for weight in (None, *args.kd_weights):
        model = build_model(table, args, seed, weight or 0.0)
        log = finetune(model, fit, args, seed, fused=weight is not None)
        scores = evaluate_task(model if weight is not None else Plain(model), held, "qa", args.eval_batch_size)
        runs.append({"kd_weight": weight, "fit_windows": len(fit.features), "heldout_windows": len(held.features),
                     **log, "em": scores["exact_match"], "f1": scores["f1"]})
        print(f"  select: {runs[-1]}", flush=True)
    best = max((r for r in runs if r["kd_weight"] is not None), key=lambda r: r["f1"])
    return best["kd_weight"], runs


# the arguments a selection depends on: a recorded choice carries over only to a run with the same ones
SELECTION_ARGS = ("seeds", "max_length", "doc_stride", "max_query_length", "epochs", "batch_size", "lr",
                  "attention_dropout", "layers", "kd_weights", "select_train_questions", "select_eval_questions",
                  "kge_epochs")


def selection_from(args) -> tuple[float, list[dict]]:
    """The KD weight and selection runs recorded in an earlier squad_fusion JSON (same recipe), so that a
    run with more seeds need not repeat the selection; each run is tagged with the commit it ran at."""
    old = json.loads(Path(args.selection_from).read_text())
    if old.get("benchmark") != "squad_fusion" or not old["details"].get("kd_weight_selection"):
        raise ValueError(f"{args.selection_from}: not a squad_fusion result with a KD weight selection")
    for key in SELECTION_ARGS:
        mine, theirs = vars(args)[key], (old.get("args") or old["details"]["args"])[key]  # (args moved to the top)
        if key == "seeds":  # the selection used the first seed only
            mine, theirs = mine[0], theirs[0]
        if mine != theirs:
            raise ValueError(f"{args.selection_from}: selected with {key}={theirs}, this run has {key}={mine}")
    # a selection already carried over keeps the commit it ran at
    runs = [{"commit": old["commit"], **r} for r in old["details"]["kd_weight_selection"]]
    return old["metrics"]["kd_weight"], runs


def masked_mentions(data, args, mask_id: int) -> list[tuple[dict, torch.Tensor]]:
    """Probe-fitting batches: up to 4 mentions per window replaced by [MASK] and unlinked (seeded, so
    every model sees the same); returns (batch without mention_spans, masked spans (M, 4))."""
    gen = torch.Generator().manual_seed(12345)
    rows = torch.randperm(len(data.features), generator=gen)[: args.probe_windows]
    out = []
    for i in range(0, len(rows), args.eval_batch_size):
        batch = data.features.batch(rows[i : i + args.eval_batch_size])
        spans = batch.pop("mention_spans")
        keep = torch.zeros(len(spans), dtype=torch.bool)
        for b in range(len(batch["input_ids"])):
            mine = torch.nonzero(spans[:, 0] == b).flatten()
            keep[mine[torch.randperm(len(mine), generator=gen)[:4]]] = True
        chosen = spans[keep]
        for b, s, e, _ in chosen.tolist():
            batch["input_ids"][b, s:e] = mask_id
            batch["token_entity"][b, s:e] = -1
        out.append((batch, chosen))
    return out


def encode(model: FusedLM, batch: dict, fused: bool) -> torch.Tensor:
    """The encoder's last hidden states (B, S, H), fusing ``batch``'s linked tokens only when ``fused``."""
    return model.fused(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                       token_entity=batch["token_entity"] if fused else None).last_hidden_state


@torch.no_grad()
def probe_features(model: FusedLM, batches, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    xs, ys = [], []
    for batch, spans in batches:
        xs.append(mention_representations(encode(model, batch, fused), spans))
        ys.append(spans[:, 3])
    return torch.cat(xs), torch.cat(ys)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, entity: torch.Tensor, seed: int, epochs: int = 30) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(x.shape[1], entity.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    ent = nn.functional.normalize(entity.float(), dim=-1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            logits = 20.0 * nn.functional.normalize(lin(x[idx]), dim=-1) @ ent.T
            nn.functional.cross_entropy(logits, y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return lin.eval()


def probe_p1(model: FusedLM, facts, tokenizer, table: KGTable, head: nn.Module, fused: bool) -> float:
    def mention_vector(batch):
        hidden = encode(model, batch, fused)
        return head(hidden[torch.arange(len(hidden)), batch["mask_positions"]])
    model.eval()
    with torch.no_grad():
        return probe.evaluate_probe(facts, probe.MaskedEntityScorer(tokenizer, mention_vector, table.entity)).p_at_1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-questions", type=int, default=2600)
    p.add_argument("--eval-questions", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--doc-stride", type=int, default=64)
    p.add_argument("--max-query-length", type=int, default=48)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--attention-dropout", type=float, default=0.0, help="MiniLM's own is 0.1 (slow on CPU)")
    p.add_argument("--layers", type=int, nargs="+", default=[3])
    p.add_argument("--kd-weights", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                   help="KD weight candidates (entity = relation); several: chosen on held-out fine-tune articles")
    p.add_argument("--selection-from", default=None,
                   help="an earlier squad_fusion JSON whose KD weight selection (same recipe) this run reuses")
    p.add_argument("--select-train-questions", type=int, default=1300)
    p.add_argument("--select-eval-questions", type=int, default=500)
    p.add_argument("--kge-epochs", type=int, default=30)
    p.add_argument("--probe-windows", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--cache", default="/tmp/bikd_squad_fusion")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    add_common_args(p)
    args = p.parse_args()
    run = start_run("squad_fusion", args)
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    start = time.perf_counter()

    kg = load_dataset("fb15k237", path=str(data_dir / "fb15k-237"))
    text = load_text("fb15k237", path=str(data_dir / "fb15k-237"))
    table = teacher(kg, args)
    linker = build_linker(kg, text)
    _, tokenizer = load_encoder(EncoderConfig())
    kd_weight, selection = select_kd_weight(table, kg, linker, text, tokenizer, args, data_dir)
    print(f"KD weight {kd_weight}", flush=True)
    task = qa_task(args, data_dir, holdout=False, max_train=args.train_questions, max_eval=args.eval_questions)
    train, evaluation = build_task_data(task, tokenizer, kg, linker, text=text)
    facts = probe.load_lama_trex(str(data_dir / "lama-trex"), probe.wikidata_to_entity(text, kg.entities))
    fit_batches = masked_mentions(train, args, tokenizer.mask_token_id)
    tok = train.features.tensors["token_entity"]
    data = {"train_windows": len(train.features), "eval_windows": len(evaluation.features),
            "train_mentions_per_window": len(train.features.mention_spans) / len(train.features),
            "linked_token_fraction": float((tok >= 0).sum() / train.features.tensors["attention_mask"].sum()),
            "probe_facts": len(facts), "probe_fit_mentions": sum(len(s) for _, s in fit_batches)}
    print(f"data: {data}", flush=True)

    runs = []
    for seed in args.seeds:
        for fused in (False, True):
            name = "fused" if fused else "plain"
            print(f"seed {seed} {name}", flush=True)
            model = build_model(table, args, seed, kd_weight)
            log = finetune(model, train, args, seed, fused)
            t = time.perf_counter()
            scores = evaluate_task(model if fused else Plain(model), evaluation, "qa", args.eval_batch_size)
            x, y = probe_features(model, fit_batches, fused)
            lin = fit_linear_probe(x, y, table.entity, seed)
            run = {"seed": seed, "model": name, **log, "em": scores["exact_match"], "f1": scores["f1"],
                   "probe_p1": probe_p1(model, facts, tokenizer, table, lin, fused)}
            if fused:
                run["probe_p1_kd_head"] = probe_p1(model, facts, tokenizer, table, model.entity_proj, fused)
            run["eval_s"] = time.perf_counter() - t
            print(f"  {run}", flush=True)
            runs.append(run)

    def col(model: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["model"] == model]

    gains = [f - q for f, q in zip(col("fused", "f1"), col("plain", "f1"))]
    std = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    metrics = {
        "f1_plain_mean": statistics.mean(col("plain", "f1")), "f1_fused_mean": statistics.mean(col("fused", "f1")),
        "f1_gain_mean": statistics.mean(gains), "f1_gain_std": std(gains), "f1_gain_min": min(gains),
        "f1_plain_std": std(col("plain", "f1")), "f1_fused_std": std(col("fused", "f1")),
        "em_plain_mean": statistics.mean(col("plain", "em")), "em_fused_mean": statistics.mean(col("fused", "em")),
        "probe_p1_plain": statistics.mean(col("plain", "probe_p1")), "probe_p1_fused": statistics.mean(col("fused", "probe_p1")),
        "probe_p1_fused_kd_head": statistics.mean(col("fused", "probe_p1_kd_head")),
        "kd_weight": kd_weight, "num_seeds": len(args.seeds), **{k: float(v) for k, v in data.items()},
        "minutes_total": (time.perf_counter() - start) / 60,
    }
    details = {"split": "SQuAD v1.1 dev split by article (seed 0, 20% of articles evaluate); "
                        f"{args.train_questions} fine-tune / {args.eval_questions} eval questions sampled (seed 0 / 1)",
               "teacher": f"TransE (configs/kge_fb15k237_transe.yaml), {args.kge_epochs} epochs",
               "kd_weight_selection": selection,
               "kd_weight_selected_in": selection[0].get("commit", "this run") if selection else "given",
               "runs": runs, "f1_gains": gains}
    print(run.write(metrics, details, out_dir=Path(args.out_dir) if args.out_dir else None))


if __name__ == "__main__":
    main()
