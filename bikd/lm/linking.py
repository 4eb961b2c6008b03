"""Dictionary entity linking: greedy leftmost-longest match of entity names and aliases in text.

Aliases and text go through one normalisation: words are runs of letters/digits (punctuation and
whitespace separate them), each word is case-folded and stripped of accents (NFKD minus combining
marks). An alias is indexed as its word tuple in a trie; ``link`` walks the trie from every word of
the text and keeps the longest alias that starts there, then continues after it, so mentions never
overlap. Mentions carry character offsets into the original text, so they map onto any fast
tokenizer's ``offset_mapping`` (:func:`align_mentions`, :func:`mentions_to_tokens`).

Contract with the fusion module: a batch carries ``token_entity`` LongTensor [B, S] (entity id of each
token, -1 where unlinked) and ``mention_spans`` LongTensor [M, 4] with rows (batch_index, token_start,
token_end_exclusive, entity_id) (:func:`fill_mentions` per row and :func:`spans_tensor`, or
:func:`collate_mentions` for a batch of spans). Entity ids are the KG id map's integer ids,
the rows of the KG embedding table.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch

from bikd.kg.text import KGText

AmbiguousPolicy = Literal["most_frequent", "skip"]
#: ``link(text) -> [(start_char, end_char_exclusive, entity_id), ...]``; objects with ``start_char``,
#: ``end_char`` and ``entity`` (:class:`Mention`, so ``EntityLinker.link`` plugs in) work too
LinkFn = Callable[[str], Sequence]

# A word starts with a letter or digit and may carry combining marks (decomposed accents), so that
# "é" written as "e" + U+0301 stays one word; "_" is punctuation, as for BERT's basic tokenizer.
_WORD = re.compile(r"[^\W_](?:[^\W_]|[\u0300-\u036f])*")
# StAR's entity2text names carry a disambiguation suffix on a few entities ("Actor-GB", "Batman-US").
_STAR_SUFFIX = re.compile(r"-(?:GB|US)$")
_END = None  # trie key of the entity ids at a node (words are strings, so it never clashes)

# English function words (NLTK's list plus a few contractions' halves): an alias made only of these
# (or of numbers) names films and bands such as "It", "Her", "The Who", "Yes" or "1984", and
# would otherwise link half of every text.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren as at be because been before being
    below between both but by can cannot could couldn d did didn do does doesn doing don down during each
    few for from further had hadn has hasn have haven having he her here hers herself him himself his how
    i if in into is isn it its itself just ll m ma me mightn more most mustn my myself needn no nor not
    now o of off on once only or other our ours ourselves out over own re s same shan she should
    shouldn so some such t than that the their theirs them themselves then there these they this those
    through to too under until up us ve very was wasn we were weren what when where which while who
    whom why will with won would wouldn y yes you your yours yourself yourselves""".split()
)


@functools.lru_cache(maxsize=1 << 16)
def _fold_word(word: str) -> str:
    """Case-fold and strip accents of one non-ASCII word (cached: text repeats its words)."""
    decomposed = unicodedata.normalize("NFKD", word.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_word(word: str) -> str:
    """One word of text (a run of letters/digits) in its normalised form."""
    return word.lower() if word.isascii() else _fold_word(word)


def normalize(text: str) -> tuple[str, ...]:
    """The normalised word tuple of a text: ``"São-Paulo F.C."`` -> ``("sao", "paulo", "f", "c")``."""
    return tuple(w for w in (normalize_word(m.group()) for m in _WORD.finditer(text)) if w)


@dataclass(kw_only=True, frozen=True)
class LinkerConfig:
    #: shortest alias indexed, in characters of its normalised form with single spaces between words:
    #: "US" ("us", 2) is dropped as the pronoun, "U.S." ("u s", 3) is kept
    min_alias_chars: int = 3
    #: longest alias indexed, in words
    max_alias_tokens: int = 8
    #: drop aliases made only of English stopwords and numbers ("It", "The Who", "1984")
    skip_stopword_aliases: bool = True
    #: an alias naming several entities goes to one whose name it is, then to the highest KG degree, then
    #: to the smallest id ("most_frequent"); or it is not indexed ("skip")
    ambiguous: AmbiguousPolicy = "most_frequent"
    #: an all-lowercase span of text only matches an alias that the KG also writes in lowercase (the
    #: Wikidata labels of common nouns: "actor", "water"), so "may" is not the month "May", "air" not
    #: Michael Jordan (alias "Air"), "the city" not the City of London; capitalised or uppercase text matches any case
    respect_capitalisation: bool = True

    def __post_init__(self):
        if not isinstance(self.min_alias_chars, int) or self.min_alias_chars < 1:
            raise ValueError(f"min_alias_chars must be an int >= 1, got {self.min_alias_chars!r}")
        if not isinstance(self.max_alias_tokens, int) or self.max_alias_tokens < 1:
            raise ValueError(f"max_alias_tokens must be an int >= 1, got {self.max_alias_tokens!r}")
        if not isinstance(self.skip_stopword_aliases, bool):
            raise ValueError(f"skip_stopword_aliases must be a bool, got {self.skip_stopword_aliases!r}")
        if not isinstance(self.respect_capitalisation, bool):
            raise ValueError(f"respect_capitalisation must be a bool, got {self.respect_capitalisation!r}")
        if self.ambiguous not in ("most_frequent", "skip"):
            raise ValueError(f"ambiguous must be 'most_frequent' or 'skip', got {self.ambiguous!r}")


@dataclass(frozen=True)
class Mention:
    """A linked span ``text[start_char:end_char] == surface`` of the original text."""

    start_char: int
    end_char: int
    entity: int
    surface: str


@dataclass(frozen=True)
class LinkerStats:
    """What building the index kept and dropped (counts of distinct normalised aliases)."""

    num_entities: int  # entities with at least one indexed alias
    num_aliases: int  # indexed aliases
    num_ambiguous: int  # aliases naming several entities (resolved or dropped per policy)
    num_dropped_short: int
    num_dropped_long: int
    num_dropped_stopword: int


class EntityLinker:
    """A trie of normalised aliases -> entity id; build with :meth:`build` or :meth:`from_kg_text`."""

    def __init__(self, trie: dict, cfg: LinkerConfig, stats: LinkerStats):
        self._trie = trie
        self.cfg = cfg
        self.stats = stats

    @classmethod
    def build(
        cls,
        aliases: Mapping[int, Sequence[str]],
        cfg: LinkerConfig | None = None,
        degree: Mapping[int, float] | Sequence[float] | None = None,
    ) -> "EntityLinker":
        """Index every entity's aliases, its name first. An alias shared by several entities (policy
        ``most_frequent``) goes to an entity whose name it is, then to the highest ``degree`` (by entity
        id; Wikidata aliases are noisy: Michael Jordan's include "Batman"), then to the smallest id."""
        cfg = cfg or LinkerConfig()
        # normalised alias -> {entity: 0 if it is the entity's name else 1}, for any form of the alias
        # and for the forms written in lowercase
        candidates: dict[tuple[str, ...], dict[int, int]] = {}
        lowercase: dict[tuple[str, ...], dict[int, int]] = {}
        short, long, stop = set(), set(), set()
        for entity, forms in aliases.items():
            if isinstance(forms, str):
                raise TypeError(f"aliases of entity {entity} must be a sequence of strings, got one string {forms!r}")
            for position, form in enumerate(forms):
                words = normalize(form)
                if not words:
                    continue
                if len(words) > cfg.max_alias_tokens:
                    long.add(words)
                elif sum(map(len, words)) + len(words) - 1 < cfg.min_alias_chars:
                    short.add(words)
                elif cfg.skip_stopword_aliases and all(w in STOPWORDS or w.isdigit() for w in words):
                    stop.add(words)
                else:
                    tier = int(position > 0)
                    for table in (candidates, lowercase) if form == form.lower() else (candidates,):
                        ents = table.setdefault(words, {})
                        ents[int(entity)] = min(ents.get(int(entity), tier), tier)

        def rank(item: tuple[int, int]) -> tuple[int, float, int]:
            entity, tier = item
            if degree is None:
                d = 0.0
            elif isinstance(degree, Mapping):
                d = degree.get(entity, 0.0)
            else:
                d = degree[entity] if 0 <= entity < len(degree) else 0.0
            return tier, -float(d), entity

        def resolve(ents: dict[int, int]) -> int:
            if not ents or (len(ents) > 1 and cfg.ambiguous == "skip"):
                return -1
            return min(ents.items(), key=rank)[0]

        trie: dict = {}
        num_ambiguous, num_indexed, linked = 0, 0, set()
        for words in sorted(candidates):  # sorted: the trie does not depend on the input's order
            ents = candidates[words]
            num_ambiguous += len(ents) > 1
            entity = resolve(ents)
            lower = resolve(lowercase.get(words, {})) if cfg.respect_capitalisation else entity
            if entity < 0:
                continue
            node = trie
            for w in words:
                node = node.setdefault(w, {})
            node[_END] = (entity, lower)  # the entity of capitalised and of all-lowercase text
            num_indexed += 1
            linked.add(entity)
        stats = LinkerStats(len(linked), num_indexed, num_ambiguous, len(short), len(long), len(stop))
        return cls(trie, cfg, stats)

    @classmethod
    def from_kg_text(
        cls,
        text: KGText,
        entity_to_id: Mapping[str, int],
        cfg: LinkerConfig | None = None,
        degree: Mapping[int, float] | Sequence[float] | None = None,
    ) -> "EntityLinker":
        """Aliases of every entity of the id map (name, Wikidata label and aliases); entities without
        text are not linkable (their name would be the MID itself)."""
        aliases: dict[int, list[str]] = {}
        for label, entity in entity_to_id.items():
            forms = [f for f in text.aliases(label) if f != label]
            if forms and _STAR_SUFFIX.search(forms[0]):  # "Batman-US": text writes "Batman", the name
                forms.insert(0, _STAR_SUFFIX.sub("", forms[0]))
            if forms:
                aliases[entity] = forms
        return cls.build(aliases, cfg, degree)

    def lookup(self, surface: str) -> int | None:
        """The entity an exact alias (after normalisation) maps to, or None."""
        node = self._trie
        for w in normalize(surface):
            node = node.get(w)
            if node is None:
                return None
        if node is self._trie or _END not in node:
            return None
        entity, lower = node[_END]
        lowercase_text = self.cfg.respect_capitalisation and surface.islower()
        found = lower if lowercase_text else entity
        return found if found >= 0 else None

    def link(self, text: str) -> list[Mention]:
        """Greedy leftmost-longest, non-overlapping mentions of indexed aliases, in text order."""
        spans = [m.span() for m in _WORD.finditer(text)]
        words = [normalize_word(text[s:e]) for s, e in spans]
        root, num_words = self._trie, len(words)
        out: list[Mention] = []
        i = 0
        while i < num_words:
            node = root.get(words[i])
            if node is None:  # the common case: no alias starts with this word
                i += 1
                continue
            best_end, entity = -1, -1
            j = i
            while True:
                if _END in node:
                    any_case, lower = node[_END]
                    if lower != any_case and text[spans[i][0] : spans[j][1]].islower():
                        any_case = lower
                    if any_case >= 0:
                        best_end, entity = j, any_case
                j += 1
                if j >= num_words:
                    break
                node = node.get(words[j])
                if node is None:
                    break
            if best_end < 0:
                i += 1
                continue
            start, end = spans[i][0], spans[best_end][1]
            out.append(Mention(start, end, entity, text[start:end]))
            i = best_end + 1
        return out


def _align(mentions: Sequence, tokens: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """:func:`align_mentions` over ``tokens``: ``(index, start_char, end_char)`` of the real tokens."""
    chars = [(m.start_char, m.end_char, m.entity) if hasattr(m, "start_char") else tuple(m) for m in mentions]
    found: list[tuple[int, int, int] | None] = [None] * len(chars)
    starts, ends = [t[1] for t in tokens], [t[2] for t in tokens]
    if starts == sorted(starts) and ends == sorted(ends):
        # tokens in char order (one text of a fast tokenizer): one pass, mentions by start
        t, n = 0, len(tokens)
        for i in sorted(range(len(chars)), key=lambda i: (chars[i][0], chars[i][1])):
            start, end, entity = chars[i]
            while t < n and tokens[t][2] <= start:  # tokens wholly before the mention
                t += 1
            u = t
            while u < n and tokens[u][1] < end:
                u += 1
            if u > t:
                found[i] = (tokens[t][0], tokens[u - 1][0] + 1, int(entity))
    else:  # any other order: test every token
        for i, (start, end, entity) in enumerate(chars):
            hit = [k for k, s, e in tokens if s < end and e > start]
            if hit:
                found[i] = (hit[0], hit[-1] + 1, int(entity))
    return [f for f in found if f is not None]


def align_mentions(
    mentions: Sequence, offset_mapping: Sequence[Sequence[int]], positions: Sequence[int] | None = None
) -> list[tuple[int, int, int]]:
    """Char-span mentions of one text -> ``(token_start, token_end_exclusive, entity)``, in the order of
    ``mentions``. A mention is a :class:`Mention` (any object with ``start_char``, ``end_char`` and
    ``entity``) or a ``(start_char, end_char_exclusive, entity)`` tuple, as a :data:`LinkFn` returns.
    ``offset_mapping[i]`` is token i's char span in that text (a fast tokenizer's offsets, a list or a
    tensor) and ``positions`` the token indices that belong to the text (None: all). A mention covers every
    such token it overlaps (special and padding tokens, with empty offsets, never); one cut by truncation or
    a window keeps its part inside, one with no token inside is dropped."""
    offsets = offset_mapping.tolist() if hasattr(offset_mapping, "tolist") else offset_mapping
    if positions is None:
        tokens = [(k, s, e) for k, (s, e) in enumerate(offsets) if e > s]
    else:
        tokens = [(k, offsets[k][0], offsets[k][1]) for k in positions if offsets[k][1] > offsets[k][0]]
    return _align(mentions, tokens)


def mentions_to_tokens(
    mentions: Sequence,
    offset_mapping: Sequence[Sequence[int]],
    sequence_ids: Sequence[int | None] | None = None,
    sequence: int = 0,
) -> list[tuple[int, int, int]]:
    """:func:`align_mentions` over the tokens of one sequence of an encoding: with ``sequence_ids`` (from
    ``encoding.sequence_ids(i)``) the tokens of ``sequence`` (e.g. 1: the context of a question/context
    pair), else all. ValueError when the offsets of those tokens go backwards (a text pair without
    ``sequence_ids``: the second sequence restarts its offsets at 0)."""
    offsets = offset_mapping.tolist() if hasattr(offset_mapping, "tolist") else offset_mapping
    if sequence_ids is not None and len(sequence_ids) != len(offsets):
        raise ValueError(f"sequence_ids has {len(sequence_ids)} entries for {len(offsets)} tokens")
    tokens = [(k, s, e) for k, (s, e) in enumerate(offsets)
              if e > s and (sequence_ids is None or sequence_ids[k] == sequence)]
    starts = [t[1] for t in tokens]
    if starts != sorted(starts):
        back = next(b for a, b in zip(tokens, tokens[1:]) if b[1] < a[1])
        raise ValueError(f"offsets go backwards at token {back[0]}: a text pair? pass sequence_ids")
    return _align(mentions, tokens)


def fill_mentions(token_entity: list[int], spans: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Write token spans ``(token_start, token_end_exclusive, entity)`` into one row's ``token_entity`` (in
    place; -1 = unlinked). A span overlapping an earlier one (or a token already linked) is dropped whole,
    so that ``token_entity`` and ``mention_spans`` always agree. Returns the spans kept."""
    kept = []
    for s, e, ent in spans:
        if not 0 <= s < e <= len(token_entity):
            raise ValueError(f"span ({s}, {e}) outside a sequence of {len(token_entity)} tokens")
        if all(token_entity[i] < 0 for i in range(s, e)):
            token_entity[s:e] = [ent] * (e - s)
            kept.append((s, e, ent))
    return kept


def spans_tensor(span_lists: Sequence[Sequence[tuple[int, int, int]]]) -> torch.Tensor:
    """Per-row token spans -> ``mention_spans`` LongTensor [M, 4] of rows (batch_index, token_start,
    token_end_exclusive, entity_id), in row order."""
    rows = [(b, s, e, ent) for b, spans in enumerate(span_lists) for s, e, ent in spans]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def collate_mentions(
    span_lists: Sequence[Sequence[tuple[int, int, int]]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's spans -> ``token_entity`` LongTensor [B, seq_len] (-1 = not linked) and ``mention_spans``
    LongTensor [M, 4] (:func:`spans_tensor`) of the spans :func:`fill_mentions` keeps, in batch order."""
    rows = [[-1] * seq_len for _ in span_lists]
    kept = [fill_mentions(row, spans) for row, spans in zip(rows, span_lists)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(span_lists), seq_len), spans_tensor(kept)
