"""Entity and relation text: names, descriptions and FB15k-237's Wikidata map (labels, aliases).

Entity linking (names, aliases) and triple verbalisation read these; the formats are the ones of the
public FB15k-237 text files: ``mid<TAB>Name -- description``, ``mid<TAB>Name``, ``relation<TAB>text``, and
``entity2wikidata.json`` mapping mid -> {wikidata_id, label, alternatives, description, wikipedia}. A file
whose name ends in ``.gz`` or ``.xz`` is decompressed as it is read (``bikd.kg.triples.open_data``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from bikd.kg.triples import KGDataError, decode_line, open_data, strip_bom


@dataclass(frozen=True)
class EntityText:
    name: str
    description: str = ""


@dataclass(frozen=True)
class WikidataEntry:
    wikidata_id: str
    label: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    wikipedia: str = ""


def _read_two_columns(url: str, storage_options: Mapping | None) -> dict[str, str]:
    """``key<TAB>value`` lines; the value may itself hold tabs only if escaped, so exactly 2 columns."""
    out: dict[str, str] = {}
    with open_data(url, storage_options) as f:
        for lineno, raw in enumerate(f, start=1):
            # a kept BOM would make the first id '\ufeff/m/...', which no triple names
            line, _ = strip_bom(decode_line(url, lineno, raw).rstrip("\r\n"))
            if not line.strip() or line.startswith("#"):
                continue
            key, sep, value = line.partition("\t")
            if not sep or not key.strip():
                raise KGDataError(url, lineno, "expected 'id<TAB>text'", line[:200])
            key = key.strip()
            if key in out:
                raise KGDataError(url, lineno, f"id {key!r} appears twice", line[:200])
            out[key] = value.strip()
    if not out:
        raise KGDataError(url, None, "holds no entries")
    return out


def load_entity_text(url: str, storage_options: Mapping | None = None) -> dict[str, EntityText]:
    """``mid<TAB>Name -- description`` (or just a name) -> EntityText per entity."""
    out = {}
    for key, value in _read_two_columns(url, storage_options).items():
        name, sep, description = value.partition(" -- ")
        out[key] = EntityText(name.strip(), description.strip() if sep else "")
    return out


def load_relation_text(url: str, storage_options: Mapping | None = None) -> dict[str, str]:
    return _read_two_columns(url, storage_options)


def load_wikidata(url: str, storage_options: Mapping | None = None) -> dict[str, WikidataEntry]:
    with open_data(url, storage_options) as f:
        try:
            # utf-8-sig: json.loads refuses a str that starts with a BOM ("Unexpected UTF-8 BOM")
            data = json.loads(f.read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            line = getattr(e, "lineno", None)
            raise KGDataError(url, line, f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise KGDataError(url, None, "expected a JSON object mapping entity id -> Wikidata record")
    out = {}
    for key, rec in data.items():
        if not isinstance(rec, dict) or "wikidata_id" not in rec:
            raise KGDataError(url, None, f"record of {key!r} lacks 'wikidata_id'", str(rec)[:200])
        out[key] = WikidataEntry(
            wikidata_id=rec["wikidata_id"],
            label=rec.get("label") or "",
            aliases=tuple(a for a in (rec.get("alternatives") or ()) if a),
            description=rec.get("description") or "",
            wikipedia=rec.get("wikipedia") or "",
        )
    return out


@dataclass(frozen=True)
class KGText:
    """All text known about a KG's entities and relations; any part may be empty."""

    entities: Mapping[str, EntityText]
    relations: Mapping[str, str]
    wikidata: Mapping[str, WikidataEntry]

    def name(self, entity: str) -> str:
        """Best display name: the text file's name, then the Wikidata label, then the id itself."""
        if entity in self.entities and self.entities[entity].name:
            return self.entities[entity].name
        if entity in self.wikidata and self.wikidata[entity].label:
            return self.wikidata[entity].label
        return entity

    def aliases(self, entity: str) -> tuple[str, ...]:
        """Every surface form of an entity (name, Wikidata label and aliases), deduplicated in order."""
        forms = [self.name(entity)]
        if entity in self.wikidata:
            forms += [self.wikidata[entity].label, *self.wikidata[entity].aliases]
        return tuple(dict.fromkeys(f for f in forms if f))
