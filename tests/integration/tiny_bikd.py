"""A tiny KG with text and the overrides that shrink jobs/bikd_full.py to it (tiny encoder, 2 sync rounds of a
few steps): shared by the tests that run the bidirectional job."""

from __future__ import annotations

from pathlib import Path

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Poland", "Austria", "Belgium", "Portugal"]
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Warsaw", "Vienna", "Brussels", "Lisbon"]


def write_kg(root: Path) -> Path:
    """16 entities, 3 relations, descriptions that mention each other (the text the miner reads)."""
    kg = root / "tiny_kg"
    kg.mkdir()
    mid = {n: f"/m/{n.lower()}" for n in COUNTRIES + CITIES}
    triples = []
    for i, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
        triples.append((mid[city], "capital_of", mid[country]))
        triples.append((mid[city], "located_in", mid[country]))
        triples.append((mid[country], "borders", mid[COUNTRIES[(i + 1) % len(COUNTRIES)]]))
    valid, test = [triples[4], triples[11]], [triples[7], triples[16]]
    train = [t for t in triples if t not in valid + test]
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        (kg / f"{split}.txt").write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in rows))
    lines = []
    for i, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
        nxt = COUNTRIES[(i + 1) % len(COUNTRIES)]
        lines.append(f"{mid[city]}\t{city} -- {city} is the capital of {country} and lies in {country}, far from {CITIES[i - 1]}.")
        lines.append(f"{mid[country]}\t{country} -- {country} borders {nxt}; its capital is {city}.")
    (kg / "entity2text.txt").write_text("\n".join(lines) + "\n")
    return kg


TINY = [
    "kge.model.dim=8", "kge.batch_size=16", "kge.sampler.num_negatives=4",
    "kge.sampler.chunk_size=4", "kge_dist.cpus_per_trainer=0.5", "valid_limit=null",
    "lm.encoder.name_or_path=tiny", "lm.encoder.attn_implementation=eager", "lm.fusion.layers=[0]",
    "lm.kd.num_sampled_candidates=4", "lm.task.max_train=8", "lm.task.max_eval=4", "lm.task.link=true",
    "lm.task.triple_cls.max_length=32", "lm.train.batch_size=2", "lm.train.lr=0.001", "lm.train.log_every=2",
    "lm.num_workers=1", "lm.cpus_per_worker=1.0",
    "loop.mode=sync", "loop.rounds=2", "loop.kge_epochs_per_round=1", "loop.lm_steps_per_round=3",
    "mine.extractor.max_length=32", "mine.extractor.batch_size=8", "mine.num_calib_pairs=2",
    "mine.scoring.num_actors=1", "mine.scoring.num_cpus=0.5", "mine.mining.thresholds.mode=top_k",
    "mine.mining.thresholds.top_k=2", "mine.mining.candidates.max_candidates=60", "num_threads=1",
]
