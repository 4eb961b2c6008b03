"""jobs/mine.py end to end on a tiny KG with text: a tiny random extractor (saved with save_extractor), a KGE
export, descriptions and a JSONL corpus; dry run, a real round, and a snapshot that does not fit the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kg.store import KGStore
from bikd.kge.export import export_embeddings
from bikd.kge.models import ModelConfig
from bikd.lm.encoder import EncoderConfig
from bikd.lm.extractor import ExtractorConfig, build_extractor, save_extractor
from bikd.storage import Storage

REPO = Path(__file__).resolve().parents[2]
NAMES = {"/m/paris": "Paris", "/m/france": "France", "/m/berlin": "Berlin", "/m/germany": "Germany",
         "/m/rome": "Rome", "/m/italy": "Italy"}
TRAIN = [("/m/paris", "capital_of", "/m/france"), ("/m/berlin", "capital_of", "/m/germany"),
         ("/m/rome", "located_in", "/m/italy"), ("/m/paris", "located_in", "/m/france")]
VALID = [("/m/rome", "capital_of", "/m/italy")]
TEST = [("/m/berlin", "located_in", "/m/germany")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    kg_dir = root / "kg_data"
    kg_dir.mkdir()
    for split, triples in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (kg_dir / f"{split}.txt").write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples))
    (kg_dir / "entity2text.txt").write_text(
        "".join(f"{m}\t{n} -- a city or country in Europe, near {'Italy' if n != 'Italy' else 'France'}\n"
                for m, n in NAMES.items()))
    (root / "news.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(
        ["Rome is the capital of Italy.", "Berlin lies in Germany, Paris in France.", "Nothing to link here."])))
    kg = load_from_config(DataConfig(path=str(kg_dir)))
    rng = np.random.default_rng(0)
    mcfg = ModelConfig(name="distmult", dim=8)
    labels = (kg.entities.labels, kg.relations.labels)
    export_embeddings(Storage(str(root / "kge")), rng.normal(size=(6, 8)), rng.normal(size=(2, 8)), *labels, mcfg)
    export_embeddings(Storage(str(root / "kge_other")), rng.normal(size=(6, 8)), rng.normal(size=(2, 8)),
                      labels[0][::-1], labels[1], mcfg)
    model, tokenizer = build_extractor(ExtractorConfig(max_length=32), 2, encoder_cfg=EncoderConfig(name_or_path="tiny"))
    manifest = save_extractor(model, tokenizer, str(root / "extractor"))
    return root, manifest["snapshot_id"]


def run_job(script: str, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "jobs" / script), *flags]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def run_mine(root: Path, *overrides: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    return run_job("mine.py", f"data.path={root / 'kg_data'}", f"store={root / 'store'}", f"extractor={root / 'extractor'}",
                   f"corpus=[{root / 'news.jsonl'}]", "scoring.num_cpus=0.5", "num_threads=1", *overrides,
                   flags=("--dry-run",) if dry_run else ())


@pytest.mark.slow
def test_mine_job_dry_run_then_one_round(setup):
    root, lm_snapshot = setup
    common = (f"kg_export={root / 'kge'}", "mining.thresholds.mode=top_k", "mining.thresholds.top_k=2",
              "mining.candidates.top_k=1", "scoring.num_actors=1")  # tests/ray runs a pool of 2
    dry = run_mine(root, *common, "measure_bound_recall=true", dry_run=True)
    assert dry.returncode == 0, dry.stderr
    assert "passages_no_entity 1" in dry.stdout and "dry run:" in dry.stdout and "per relation:" in dry.stdout
    assert "bound: " in dry.stdout and "of the train triples the unbounded ones reach" in dry.stdout
    assert not (root / "store").exists()  # a dry run writes nothing, not even version 0

    real = run_mine(root, *common)
    assert real.returncode == 0, real.stderr
    store = KGStore(Storage(str(root / "store")))
    assert [v.kind for v in store.versions()] == ["gold", "mined"]
    mined = store.read().mined
    assert 1 <= len(mined) <= 4 and f"version 1 ({len(mined)} mined triples)" in real.stdout
    train = set(TRAIN)
    for m in mined:
        p = m.provenance
        assert m.triple not in train and p.snapshot_id == lm_snapshot and p.kg_snapshot_id and p.round == 1
        assert p.source in ("co-mention", "kg-proposal") and p.document and p.span is not None


@pytest.mark.slow
def test_bad_input_fails_before_any_work(setup):
    root, _ = setup
    bad = run_mine(root, f"kg_export={root / 'kge_other'}", f"store={root / 'store_bad'}", dry_run=True)
    assert bad.returncode == 1
    assert "does not match KG store version 0" in bad.stderr and "KG snapshot" in bad.stderr
    missing = run_mine(root, f"extractor={root / 'nowhere'}", dry_run=True)
    assert missing.returncode == 1 and "manifest.json: not found" in missing.stderr
    empty = run_mine(root, "descriptions=false", "corpus=[]", dry_run=True)
    assert empty.returncode == 1 and "the corpus is empty" in empty.stderr
    (root / "broken.jsonl").write_text('{"text": "Rome is in Italy."}\n{"text": oops}\n')
    broken = run_mine(root, f"corpus=[{root / 'broken.jsonl'}]", dry_run=True)
    assert broken.returncode == 1 and "broken.jsonl:2" in broken.stderr
    assert not (root / "store_bad").exists()



@pytest.mark.slow
def test_train_extractor_job_then_mine_with_it(setup):
    """The user's path: train an extractor on the KG's text (jobs/train_extractor.py), then mine with it."""
    root, _ = setup
    out = root / "trained_extractor"
    common = (f"data.path={root / 'kg_data'}", f"corpus=[{root / 'news.jsonl'}]", "encoder.name_or_path=tiny",
              "extractor.max_length=32", "extractor.epochs=2", "num_threads=1")
    trained = run_job("train_extractor.py", *common, f"out={out}", "num_calib_pairs=2")
    assert trained.returncode == 0, trained.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["relation_labels"] == ["capital_of", "located_in"]  # the loader's id order
    counts = manifest["extra"]["counts"]
    assert counts["passages_descriptions"] == 6 and counts["passages_corpus_files"] == 3
    assert counts["calib_pairs"] >= 1 and counts["train_related"] >= 3  # rome-italy, berlin-germany, paris-france
    assert f"extractor {manifest['snapshot_id']} exported to" in trained.stdout

    again = run_job("train_extractor.py", *common, f"out={out}")
    assert again.returncode == 1 and "already exported there" in again.stderr  # never overwritten
    no_kg = run_job("train_extractor.py", *common, f"out={root / 'x'}", "extractor.fusion=true")
    assert no_kg.returncode == 2 and "kg_export" in no_kg.stderr and not (root / "x").exists()

    mined = run_mine(root, f"extractor={out}", f"store={root / 'store_trained'}", "mining.thresholds.mode=top_k",
                     "mining.thresholds.top_k=2", "scoring.num_actors=1", dry_run=True)
    assert mined.returncode == 0, mined.stderr
    assert "dry run:" in mined.stdout

    # an extractor whose columns are other relations (same count) is refused before any work
    manifest["relation_labels"] = manifest["relation_labels"][::-1]
    wrong = root / "wrong_labels"
    shutil.copytree(out, wrong)
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    refused = run_mine(root, f"extractor={wrong}", dry_run=True)
    assert refused.returncode == 1 and "trained on other relations" in refused.stderr
