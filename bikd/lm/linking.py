"""Dictionary entity linking: greedy leftmost-longest match of entity names and aliases in text.

Aliases and text go through one normalisation: words are runs of letters/digits (punctuation and
whitespace separate them), each word is case-folded and stripped of accents (NFKD minus combining
marks). An alias is indexed as its word tuple in a trie; ``link`` walks the trie from every word of
the text and keeps the longest alias that starts there, then continues after it, so mentions never
overlap. Precision rules (:class:`LinkerConfig`, measured on a labelled sample by
bench/linking_quality.py) keep lowercase text to entity names and acronyms to capitals, and drop pieces
of longer names, cut initialisms and language names used as adjectives. Mentions carry character
offsets into the original text, so they map onto any fast tokenizer's ``offset_mapping``
(:func:`align_mentions`, :func:`mentions_to_tokens`).

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
from typing import Callable, Collection, Literal, Mapping, Sequence

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
    # ---- precision rules (issue 12, measured by bench/linking_quality.py; all on by default) ----
    #: all-lowercase text (a common noun) matches an entity's name (its first alias; lowercase forms holding
    #: every word of it, plurals aside: "television presenter" for "Presenter"; its head noun: "director"
    #: for "Film Director"), not its other Wikidata aliases, which for common nouns are loose synonyms and
    #: clippings: "steam" -> Water, "key" -> Black, "host" -> Presenter, "rock" -> Rock music
    lowercase_names_only: bool = True
    #: an alias written in capitals ("INC", "NIN", "MHC") is an acronym: it matches only text written in
    #: capitals, not "Inc." nor a word cut out of running text
    acronyms_match_capitals: bool = True
    #: no match inside a dotted initialism: "the U" of "the U.S.", "S.C" of "A.S.C."
    skip_cut_initialisms: bool = True
    #: a capitalised match whose neighbour word (across one space or hyphen) is capitalised too, and not a
    #: stopword, is a piece of a longer name the dictionary lacks: "Western" in "Western Union", "Super" in
    #: "Super Bowl", "Community" in "European Coal and Steel Community", "Mount Kenya" -> not Kenya
    skip_name_fragments: bool = True
    #: a language's one-word name right before a lowercase word is the adjective of nationality ("French
    #: colony", "English actress", "Greek mathematician"), not the language: not linked. Languages are the
    #: ``languages`` given to :meth:`EntityLinker.build` (``from_kg_text``: Wikidata descriptions whose
    #: head noun is "language": "Romance language", "language spoken in Greece and Cyprus")
    skip_language_adjectives: bool = True

    @classmethod
    def before_issue_12(cls, **overrides) -> "LinkerConfig":
        """The linker measured as ``precision_before`` in bench/linking_quality.py: the precision rules
        of issue 12 switched off."""
        off = dict(lowercase_names_only=False, acronyms_match_capitals=False, skip_cut_initialisms=False,
                   skip_name_fragments=False, skip_language_adjectives=False)
        return cls(**{**off, **overrides})

    def __post_init__(self):
        if not isinstance(self.min_alias_chars, int) or self.min_alias_chars < 1:
            raise ValueError(f"min_alias_chars must be an int >= 1, got {self.min_alias_chars!r}")
        if not isinstance(self.max_alias_tokens, int) or self.max_alias_tokens < 1:
            raise ValueError(f"max_alias_tokens must be an int >= 1, got {self.max_alias_tokens!r}")
        if not isinstance(self.skip_stopword_aliases, bool):
            raise ValueError(f"skip_stopword_aliases must be a bool, got {self.skip_stopword_aliases!r}")
        for key in ("respect_capitalisation", "lowercase_names_only", "acronyms_match_capitals",
                    "skip_cut_initialisms", "skip_name_fragments", "skip_language_adjectives"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be a bool, got {getattr(self, key)!r}")
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

    def __init__(self, trie: dict, cfg: LinkerConfig, stats: LinkerStats, languages: frozenset[int] = frozenset()):
        self._trie = trie
        self.cfg = cfg
        self.stats = stats
        self.languages = languages  # entities whose one-word names double as nationality adjectives

    @classmethod
    def build(
        cls,
        aliases: Mapping[int, Sequence[str]],
        cfg: LinkerConfig | None = None,
        degree: Mapping[int, float] | Sequence[float] | None = None,
        languages: Collection[int] = (),
    ) -> "EntityLinker":
        """Index every entity's aliases, its name first (``languages``: the entities that are languages,
        for ``skip_language_adjectives``). An alias shared by several entities (policy
        ``most_frequent``) goes to an entity whose name it is, then to the highest ``degree`` (by entity
        id; Wikidata aliases are noisy: Michael Jordan's include "Batman"), then to the smallest id."""
        cfg = cfg or LinkerConfig()
        # normalised alias -> {entity: 0 if it is the entity's name else 1}, for the forms that text written
        # in capitals / in mixed case / in lowercase may match
        candidates: dict[tuple[str, ...], dict[int, int]] = {}
        mixed: dict[tuple[str, ...], dict[int, int]] = {}
        lowercase: dict[tuple[str, ...], dict[int, int]] = {}
        short, long, stop = set(), set(), set()
        for entity, forms in aliases.items():
            if isinstance(forms, str):
                raise TypeError(f"aliases of entity {entity} must be a sequence of strings, got one string {forms!r}")
            name: tuple[str, ...] = ()
            for position, form in enumerate(forms):
                words = normalize(form)
                name = words if position == 0 else name
                if not words:
                    continue
                if len(words) > cfg.max_alias_tokens:
                    long.add(words)
                elif sum(map(len, words)) + len(words) - 1 < cfg.min_alias_chars:
                    short.add(words)
                elif cfg.skip_stopword_aliases and all(w in STOPWORDS or w.isdigit() for w in words):
                    stop.add(words)
                else:
                    tables = [candidates]
                    if not (cfg.acronyms_match_capitals and _is_acronym(form)):
                        tables.append(mixed)
                    if form == form.lower() and (not cfg.lowercase_names_only or _holds_name(words, name)):
                        tables.append(lowercase)
                    tier = int(position > 0)
                    for table in tables:
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
            if entity < 0:
                continue
            in_mixed = resolve(mixed.get(words, {}))
            lower = resolve(lowercase.get(words, {})) if cfg.respect_capitalisation else in_mixed
            node = trie
            for w in words:
                node = node.setdefault(w, {})
            node[_END] = (entity, in_mixed, lower)  # the entity of text in capitals, in mixed case, in lowercase
            num_indexed += 1
            linked.add(entity)
        stats = LinkerStats(len(linked), num_indexed, num_ambiguous, len(short), len(long), len(stop))
        return cls(trie, cfg, stats, frozenset(int(e) for e in languages))

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
        languages = [e for label, e in entity_to_id.items()
                     if label in text.wikidata and names_a_language(text.wikidata[label].description)]
        for label, entity in entity_to_id.items():
            forms = [f for f in text.aliases(label) if f != label]
            if forms and _STAR_SUFFIX.search(forms[0]):  # "Batman-US": text writes "Batman", the name
                forms.insert(0, _STAR_SUFFIX.sub("", forms[0]))
            if forms:
                aliases[entity] = forms
        return cls.build(aliases, cfg, degree, languages)

    def lookup(self, surface: str) -> int | None:
        """The entity an exact alias (after normalisation) maps to, or None."""
        node = self._trie
        for w in normalize(surface):
            node = node.get(w)
            if node is None:
                return None
        if node is self._trie or _END not in node:
            return None
        found = _by_case(node[_END], surface)
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
                    found = _by_case(node[_END], text[spans[i][0] : spans[j][1]])
                    if found >= 0:
                        best_end, entity = j, found
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
            if (self.cfg.skip_cut_initialisms and _cuts_initialism(text, start, end)) or (
                self.cfg.skip_name_fragments and _name_fragment(text, spans, words, i, best_end)
            ) or (self.cfg.skip_language_adjectives and entity in self.languages and best_end == i
                  and _before_lowercase_word(text, spans, words, i)):
                i += 1  # a later word may still start a whole match ("U.S" after "the U")
                continue
            out.append(Mention(start, end, entity, text[start:end]))
            i = best_end + 1
        return out


# the head of a Wikidata description: its text before the first clause, preposition or participle
_DESCRIPTION_HEAD = re.compile(r"[,;(]| (?:of|in|spoken|used|native|arising|originating|and|that|which)\b")


def names_a_language(description: str) -> bool:
    """Whether a Wikidata description's head noun is "language(s)": "Romance language", "language spoken in
    Greece and Cyprus", "family of languages"; not "functional programming language", "Hindi language film
    industry", "English-language university", "scientific study of human language"."""
    if description.startswith("family of languages"):
        return True
    head = _DESCRIPTION_HEAD.split(description, maxsplit=1)[0].rstrip()
    return re.search(r"(?<![\w-])languages?$", head) is not None and "programming" not in head


def _before_lowercase_word(text: str, spans: list[tuple[int, int]], words: list[str], i: int) -> bool:
    """Whether word ``i`` is followed, across one space, by a lowercase word that is not a stopword: the
    noun an adjective qualifies ("French colony"), not "in French and", "English while", "English."."""
    return (i + 1 < len(spans) and text[spans[i][1] : spans[i + 1][0]] == " "
            and text[spans[i + 1][0]].islower() and words[i + 1] not in STOPWORDS)


def _by_case(ends: tuple[int, int, int], surface: str) -> int:
    """The entity of a trie node for text written as ``surface``: in capitals, mixed case, lowercase."""
    upper, mixed, lower = ends
    if upper == mixed == lower:
        return upper
    return lower if surface.islower() else upper if surface.isupper() else mixed


def _is_acronym(form: str) -> bool:
    """An alias written in capitals: at least two letters, all uppercase ("NBC", "U.S.", "INC")."""
    letters = [c for c in form if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _holds_name(words: tuple[str, ...], name: tuple[str, ...]) -> bool:
    """Whether an alias holds every word of the entity's name, plurals aside ("television presenter" and
    "presenters" hold "Presenter"), or is the name's head noun, its last words ("director" of "Film
    Director"); "host", "steam" and "rock" are neither for "Presenter", "Water" and "Rock music"."""
    stems = [_stem(w) for w in words]
    name_stems = [_stem(w) for w in name]
    return bool(name) and (all(w in stems for w in name_stems) or name_stems[-len(stems):] == stems)


def _cuts_initialism(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` stops or starts inside a dotted initialism: a single letter and a dot
    follow ("the U" of "the U.S.") or precede ("S.C" of "A.S.C.") without a space."""
    after = end + 1 < len(text) and text[end] == "." and text[end + 1].isalpha() and (
        end + 2 == len(text) or not text[end + 2].isalnum())
    before = start >= 2 and text[start - 1] == "." and text[start - 2].isalpha() and (
        start == 2 or not text[start - 3].isalnum())
    return after or before


def _name_fragment(text: str, spans: list[tuple[int, int]], words: list[str], i: int, j: int) -> bool:
    """Whether the match of words ``i..j`` is a piece of a longer capitalised name: its first (last) word
    is capitalised and so is the word before (after) it, across one space or hyphen, and that word is not
    a stopword ("The", "Of"). Matches written in capitals (acronyms, shouted text) are exempt."""
    start, end = spans[i][0], spans[j][1]
    if text[start:end].isupper():
        return False
    if i > 0 and text[start].isupper() and text[spans[i - 1][1] : start] in (" ", "-"):
        if text[spans[i - 1][0]].isupper() and words[i - 1] not in STOPWORDS:
            return True
    if j + 1 < len(spans) and text[spans[j][0]].isupper() and text[end : spans[j + 1][0]] in (" ", "-"):
        if text[spans[j + 1][0]].isupper() and words[j + 1] not in STOPWORDS:
            return True
    return False


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
