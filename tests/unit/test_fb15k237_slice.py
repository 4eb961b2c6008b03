"""The embedded fb15k237_slice: a dense slice of FB15k-237 with entity text, shipped xz-compressed in the bikd
package (bikd/kg/data/fb15k237_slice/), loaded with no external data; and the script that builds it."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bikd
from bikd.kg.datasets import DataConfig, dataset_dir, load_dataset, load_from_config, load_text, text_from_config
from bikd.kg.text import load_entity_text, load_wikidata
from bikd.kg.triples import KGDataError, read_triples

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE_DIR = Path(bikd.__file__).resolve().parent / "kg" / "data" / "fb15k237_slice"
SCRIPT = REPO_ROOT / "bench" / "data" / "make_fb15k237_slice.py"
DATA_FILES = ("train.txt.xz", "valid.txt.xz", "test.txt.xz", "entity2text.txt.xz", "relation2text.txt.xz",
              "entity2wikidata.json.xz")


def readme_counts() -> dict[str, int]:
    """The counts table of the slice's README.md (``| train triples | 62,672 |``)."""
    text = (SLICE_DIR / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| ([A-Za-z][A-Za-z ]+?) \| ([\d,]+) \|$", text, flags=re.M))
    return {k: int(v.replace(",", "")) for k, v in rows.items()}


@pytest.fixture(scope="module")
def kg():
    return load_from_config(DataConfig(dataset="fb15k237_slice"))


@pytest.fixture(scope="module")
def text():
    return text_from_config(DataConfig(dataset="fb15k237_slice"))


def test_the_package_folder_holds_the_compressed_files_under_1_mb():
    assert dataset_dir("fb15k237_slice") == str(SLICE_DIR)
    assert sorted(p.name for p in SLICE_DIR.iterdir()) == sorted([*DATA_FILES, "README.md"])
    assert sum(p.stat().st_size for p in SLICE_DIR.iterdir()) < 1_000_000
    for name in DATA_FILES:
        assert (SLICE_DIR / name).read_bytes().startswith(b"\xfd7zXZ\x00")  # xz magic: stored compressed


def test_counts_match_the_readme(kg):
    counts = readme_counts()
    assert kg.name == "fb15k237_slice"
    assert (kg.num_entities, kg.num_relations) == (counts["entities"], counts["relations"])
    assert (len(kg.train), len(kg.valid), len(kg.test)) == (counts["train triples"], counts["valid triples"],
                                                           counts["test triples"])
    # about 2,000 entities, dense: some 30 train triples per entity
    assert 1900 <= kg.num_entities <= 2000 and len(kg.train) > 25 * kg.num_entities
    # the script already dropped what the loader would: nothing dropped, stripped or merged here
    assert all(v == 0 for k, v in kg.load_counts().items() if not k.endswith(("num_triples", "entities", "relations")))
    assert all(kg.reports[s].url.endswith(f"/fb15k237_slice/{s}.txt.xz") for s in ("train", "valid", "test"))


def test_every_entity_and_relation_has_text(kg, text):
    counts = readme_counts()
    assert set(text.entities) == set(kg.entities.labels)
    assert all(t.name for t in text.entities.values())
    # a few entities of the source have a name only (Edie Falco, ...)
    described = sum(bool(t.description) for t in text.entities.values())
    assert described == counts["entities with a description"] >= 0.99 * kg.num_entities
    assert set(text.relations) == set(kg.relations.labels) and all(text.relations.values())
    assert set(text.wikidata) <= set(kg.entities.labels)
    assert len(text.wikidata) == counts["entities with a Wikidata record"] >= 0.99 * kg.num_entities
    usa = "/m/09c7w0"
    assert text.name(usa) == "United States of America"
    assert text.wikidata[usa].wikidata_id == "Q30"
    assert {"USA", "America", "United States"} <= set(text.aliases(usa))  # aliases ship: entity linking needs them
    assert text.entities["/m/016ywr"].description == "Jeremy John Irons is an English actor."


def test_descriptions_mention_other_slice_entities(text):
    """The descriptions are the corpus mining reads: they must name other entities of the slice often."""
    by_name: dict[str, set[str]] = {}
    for mid, t in text.entities.items():
        if len(t.name) >= 3:
            by_name.setdefault(t.name, set()).add(mid)
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(by_name, key=len, reverse=True))) + r")\b")
    mentioning = sum(
        any(by_name[m.group(0)] - {mid} for m in pattern.finditer(t.description)) for mid, t in text.entities.items()
    )
    assert mentioning >= 500, mentioning  # 796 when built


def test_loads_without_the_benchmark_data(monkeypatch, tmp_path):
    monkeypatch.setenv("BIKD_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("BIKD_FB15K237_DIR", raising=False)
    kg = load_dataset("fb15k237_slice")
    assert kg.name == "fb15k237_slice" and kg.num_relations == readme_counts()["relations"]
    assert len(load_text("fb15k237-slice").entities) == kg.num_entities  # spelled like the other names


def test_config_names_it_and_rejects_a_path(tmp_path):
    assert DataConfig(dataset="fb15k237_slice").name == "fb15k237_slice"
    assert DataConfig(dataset="FB15k-237-slice").name == "fb15k237_slice"
    with pytest.raises(ValueError, match=r"data.path .* would be ignored: data.dataset 'fb15k237_slice' is embedded"):
        DataConfig(dataset="fb15k237_slice", path=str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'fb15k237_slice'"):
        DataConfig(dataset="fb15k237_slise")


# ---- compressed files: read by extension, CRLF and BOM handling kept ------------------------------------

@pytest.mark.parametrize("suffix, compress", [(".gz", lambda b: gzip.compress(b, mtime=0)), (".xz", lzma.compress)])
def test_compressed_files_decompress_by_extension(tmp_path, suffix, compress):
    triples = tmp_path / f"train.txt{suffix}"
    triples.write_bytes(compress("\ufeffa\tr\tb\r\n\r\n# note\r\nb\tr\tc\r\n".encode()))
    raw = read_triples(str(triples))
    assert raw.triples == (("a", "r", "b"), ("b", "r", "c")) and raw.lines == (1, 4) and raw.bom_stripped == 1
    names = tmp_path / f"entity2text.txt{suffix}"
    names.write_bytes(compress("\ufeffa\tAlpha -- the first\r\nb\tBeta\r\n".encode()))
    assert {k: (v.name, v.description) for k, v in load_entity_text(str(names)).items()} == {
        "a": ("Alpha", "the first"), "b": ("Beta", "")}
    wikidata = tmp_path / f"entity2wikidata.json{suffix}"
    wikidata.write_bytes(compress('\ufeff{"a": {"wikidata_id": "Q1", "label": "A", "alternatives": ["Aa"]}}'.encode()))
    assert load_wikidata(str(wikidata))["a"].aliases == ("Aa",)


@pytest.mark.parametrize("suffix, fmt", [(".gz", "gzip"), (".xz", "xz")])
def test_a_corrupt_compressed_file_is_named(tmp_path, suffix, fmt):
    bad = tmp_path / f"train.txt{suffix}"
    bad.write_bytes(b"a\tr\tb\n")  # plain text under a compressed name
    with pytest.raises(KGDataError, match=rf"train.txt{re.escape(suffix)}: not a readable {fmt} file"):
        read_triples(str(bad))
    truncated = tmp_path / f"cut.txt{suffix}"
    packed = gzip.compress(b"a\tr\tb\n" * 100, mtime=0) if fmt == "gzip" else lzma.compress(b"a\tr\tb\n" * 100)
    truncated.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(KGDataError, match=rf"cut.txt{re.escape(suffix)}: not a readable {fmt} file"):
        read_triples(str(truncated))


# ---- the script that builds it -------------------------------------------------------------------------

@pytest.mark.data
def test_the_script_rebuilds_the_package_files_byte_for_byte(fb15k237_dir, tmp_path):
    out = tmp_path / "slice"
    run = subprocess.run([sys.executable, str(SCRIPT), "--src", str(fb15k237_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "total" in run.stdout
    built = sorted(p.name for p in out.iterdir())
    assert built == sorted(p.name for p in SLICE_DIR.iterdir())
    for name in built:
        assert (out / name).read_bytes() == (SLICE_DIR / name).read_bytes(), f"{name} differs from the committed file"


@pytest.mark.data
def test_the_script_fails_rather_than_truncate_over_the_limit(fb15k237_dir, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("make_fb15k237_slice", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "MAX_BYTES", 100_000)  # the real slice is ~440 kB; cheaper than building 6,000
    out = tmp_path / "big"
    assert script.main(["--src", str(fb15k237_dir), "--out", str(out)]) == 1
    assert "over the 100,000 limit: lower --num-entities (now 2000)" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing truncated
