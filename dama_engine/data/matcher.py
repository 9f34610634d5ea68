"""Object hallucination (CHAIR) against a user-supplied vocabulary: the vocabulary, the matcher (text against a
vocabulary) and the CHAIR counts. shared/DAMA.md section 7 reports Object HalBench's CHAIRs / CHAIRi and AMBER's
CHAIR, Cover and Hal; this module computes them. It imports no torch (nor transformers, peft): pair generation,
evaluation and the console's playground all use it.

**Vocabulary** (JSON), one of two forms:

* flat: ``{"traffic light": ["traffic light", "stoplight"], "dog": ["dog", "puppy"]}``: every object name and its
  synonyms (the name always counts as a synonym of itself). Names are independent objects: ``"light"`` is not part
  of ``"traffic light"``.
* with attributes (what ``dama_engine.proving.shapes`` writes): ``{"objects": {"circle": ["circle", "disc"]},
  "colours": {"red": ["red", "crimson"]}}``. Every other key than ``objects`` is a group of attributes. The names are
  the bare objects (``circle``) and every attribute + object pair (``red circle``, written ``crimson disc`` too);
  ``circle`` is the *generic* name of ``red circle``. An attribute counts only right before its object
  ("a red circle", not "the circle is red").

**Matching rules** (:meth:`Vocabulary.mentions`): case-insensitive, on whole words (``cat`` does not match in
``concatenate``; ``cat's`` is a mention of ``cat``); words of a multi-word name may be separated by any whitespace or
hyphens. Each synonym also matches in the plural of its last word: ``-s``; ``-es`` after s, x, z, ch, sh
(``glass/glasses``, ``box/boxes``); ``-ies`` after consonant + y; both ``-s`` and ``-es`` after consonant + o;
``-man/-men``; and a small table of irregular nouns (``person/people``, ``mouse/mice``, ``knife/knives``...). A
synonym the vocabulary lists itself wins over a generated plural (``glasses`` listed under its own name is not the
plural of ``glass``); a synonym listed under two names is refused. The text is scanned left to right and the longest
name starting at each position is taken, so ``traffic light`` is one mention and its ``light`` is not counted again.

**CHAIR** (:func:`chair`; Rohrbach et al. 2018, as Object HalBench and AMBER use it):

* A response's *mentions* are the distinct objects it names: repeated mentions of one object count once per
  response (as CHAIR counts objects, not words). A bare name that repeats an attribute mention in the same response
  ("a red circle ... the circle") is the same object and is not counted again.
* A mention is *grounded* when it is a true object of the image, when it is ``<attribute> <object>`` and the truth
  has the bare ``<object>`` (the annotation does not say the attribute), or when it is a bare object and the truth
  has it with some attribute. Otherwise it is *hallucinated*.
* A true object is *covered* when the response mentions it; a bare true object is also covered by a mention of it
  with an attribute. The true objects are a set (listing one twice counts once).
* ``chair_s``: share of responses with at least one hallucinated mention. ``chair_i``: hallucinated mentions over all
  mentions, pooled over responses (0.0 when nothing is mentioned). ``coverage``: covered true objects over all true
  objects, pooled (0.0 when there are none; AMBER's ``Cover`` averages per response instead).
  ``hallucination_rate``: AMBER's ``Hal``, the share of responses with a hallucination, which under these rules
  equals ``chair_s``. ``mean_length``: mean number of whitespace-separated words per response. An empty list of
  responses gives 0.0 everywhere.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama_engine.errors import UserError


class VocabularyError(UserError):
    """The vocabulary is malformed or ambiguous, or an object name is not in it; the message says which."""


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and mention matching

_IRREGULAR_PLURALS: Mapping[str, tuple[str, ...]] = {
    "person": ("people", "persons"),
    "child": ("children",),
    "mouse": ("mice",),
    "goose": ("geese",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "ox": ("oxen",),
    "die": ("dice",),
    "cactus": ("cacti", "cactuses"),
    "knife": ("knives",),
    "wife": ("wives",),
    "life": ("lives",),
    "leaf": ("leaves",),
    "loaf": ("loaves",),
    "wolf": ("wolves",),
    "shelf": ("shelves",),
    "half": ("halves",),
    "calf": ("calves",),
    "scarf": ("scarves", "scarfs"),
    "thief": ("thieves",),
    "elf": ("elves",),
}
_SAME_PLURAL = frozenset({"sheep", "deer", "fish", "moose", "bison", "aircraft", "salmon", "species", "series"})
_WORD_SEPARATOR = re.compile(r"[\s\-]+")


def normalize_name(text: str) -> str:
    """Lower case, words separated by one space (hyphens count as spaces): the form names are compared in."""
    return " ".join(word for word in _WORD_SEPARATOR.split(text.strip().lower()) if word)


def plural_forms(word: str) -> tuple[str, ...]:
    """English plurals of one lower-case noun, by the rules of the module docstring (may include unused forms)."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _SAME_PLURAL or not word:
        return ()
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return (word + "es",)
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return (word[:-1] + "ies",)
    if len(word) > 1 and word.endswith("o") and word[-2] not in "aeiou":
        return (word + "s", word + "es")
    if len(word) > 3 and word.endswith("man"):
        return (word[:-3] + "men", word + "s")  # fireman/firemen; human/humans
    return (word + "s",)


def _plural_phrases(phrase: str) -> tuple[str, ...]:
    *head, last = phrase.split(" ")
    return tuple(" ".join([*head, plural]) for plural in plural_forms(last))


class Vocabulary:
    """Object names, their synonyms and (with attributes) their generic names; finds mentions in text.

    Build with :meth:`from_mapping` (either JSON form of the module docstring) or :meth:`load` (a JSON file).
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]], generic: Mapping[str, str] | None = None) -> None:
        self.synonyms: dict[str, tuple[str, ...]] = {}
        explicit: dict[str, str] = {}
        for raw_name, raw_forms in synonyms.items():
            name = normalize_name(raw_name)
            if not name:
                raise VocabularyError(f"vocabulary: object name {raw_name!r} is empty")
            if name in self.synonyms:
                raise VocabularyError(f"vocabulary: object name {name!r} appears twice")
            forms = tuple(dict.fromkeys([name, *(normalize_name(form) for form in raw_forms)]))
            for form in forms:
                if not form:
                    raise VocabularyError(f"vocabulary: {raw_name!r} has an empty synonym")
                owner = explicit.setdefault(form, name)
                if owner != name:
                    raise VocabularyError(
                        f"vocabulary: {form!r} is a synonym of both {owner!r} and {name!r}; keep it under one name"
                    )
            self.synonyms[name] = forms
        self.generic: dict[str, str] = {normalize_name(k): normalize_name(v) for k, v in (generic or {}).items()}
        for name, bare in self.generic.items():
            if name not in self.synonyms or bare not in self.synonyms:
                raise VocabularyError(f"vocabulary: generic name of {name!r} must be a name too, got {bare!r}")
        # Surface form -> name. Listed synonyms first, so they win over generated plurals.
        self._forms = dict(explicit)
        for name, forms in self.synonyms.items():
            for form in forms:
                for plural in _plural_phrases(form):
                    self._forms.setdefault(plural, name)
        # Longest first: at each position the regex takes the first alternative that matches.
        ordered = sorted(self._forms, key=lambda form: (-form.count(" "), -len(form), form))
        alternatives = "|".join(r"[\s\-]+".join(re.escape(word) for word in form.split(" ")) for form in ordered)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Vocabulary:
        """From the flat form ``{name: [synonyms]}`` or the attribute form ``{"objects": {...}, "<group>": {...}}``."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise VocabularyError("vocabulary: expected a non-empty JSON object")
        if isinstance(mapping.get("objects"), Mapping):
            return cls._with_attributes(mapping)
        for name, forms in mapping.items():
            _check_synonym_list(name, forms)
        return cls(mapping)

    @classmethod
    def _with_attributes(cls, mapping: Mapping[str, Any]) -> Vocabulary:
        objects = mapping["objects"]
        for name, forms in objects.items():
            _check_synonym_list(f"objects.{name}", forms)
        synonyms: dict[str, list[str]] = {name: [name, *forms] for name, forms in objects.items()}
        bare_objects = list(synonyms.items())
        generic: dict[str, str] = {}
        for group, attributes in mapping.items():
            if group == "objects":
                continue
            if not isinstance(attributes, Mapping):
                raise VocabularyError(
                    f"vocabulary: {group!r} must map each attribute to its synonyms, like "
                    '"colours": {"red": ["red", "crimson"]}'
                )
            for attribute, attribute_forms in attributes.items():
                _check_synonym_list(f"{group}.{attribute}", attribute_forms)
                for name, forms in bare_objects:
                    compound = f"{attribute} {name}"
                    synonyms[compound] = [f"{a} {o}" for a in [attribute, *attribute_forms] for o in forms]
                    generic[compound] = name
        return cls(synonyms, generic)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise VocabularyError(f"{path}: not valid JSON: {error}") from None
        try:
            return cls.from_mapping(mapping)
        except VocabularyError as error:
            raise VocabularyError(f"{path}: {error}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.synonyms)

    def canonical(self, name: str) -> str:
        """The vocabulary name of ``name`` (a name, synonym or plural), or :class:`VocabularyError`."""
        normalized = normalize_name(name)
        if normalized in self.synonyms:
            return normalized
        if normalized in self._forms:
            return self._forms[normalized]
        raise VocabularyError(f"object {name!r} is not in the vocabulary; add it (with its synonyms)")

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """Every mention in ``text``, left to right: ``(name, the words as written)``, repeats included."""
        return [(self._forms[normalize_name(match.group())], match.group()) for match in self._pattern.finditer(text)]

    def mention_spans(self, text: str) -> list[tuple[int, int, str]]:
        """Every mention in ``text`` as ``(start, end, name)`` character offsets, left to right."""
        return [
            (match.start(), match.end(), self._forms[normalize_name(match.group())])
            for match in self._pattern.finditer(text)
        ]

    def mentioned(self, text: str) -> list[str]:
        """The distinct objects ``text`` mentions, in order of first mention (repeats and bare repeats dropped)."""
        names = list(dict.fromkeys(name for name, _ in self.mentions(text)))
        with_attribute = {self.generic[name] for name in names if name in self.generic}
        return [name for name in names if name not in with_attribute]


def _check_synonym_list(name: Any, forms: Any) -> None:
    if not isinstance(forms, list) or not all(isinstance(form, str) for form in forms):
        raise VocabularyError(f"vocabulary: {name!r} must map to a list of synonyms (strings)")


VocabularyLike = Vocabulary | Mapping[str, Any]


def as_vocabulary(vocabulary: VocabularyLike) -> Vocabulary:
    """``vocabulary`` as a :class:`Vocabulary`. A mapping is built once per content (building one compiles a regex
    of every form: about 25 ms for the shapes world's, which callers judging thousands of answers with the same
    mapping would otherwise pay per answer)."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    try:
        key = json.dumps(vocabulary, sort_keys=True)
    except (TypeError, ValueError):  # not JSON-like: built as it is, uncached
        return Vocabulary.from_mapping(vocabulary)
    return _vocabulary_of_json(key)


@functools.lru_cache(maxsize=16)
def _vocabulary_of_json(key: str) -> Vocabulary:
    return Vocabulary.from_mapping(json.loads(key))


# ---------------------------------------------------------------------------------------------------------------
# CHAIR, coverage and hallucination rate


@dataclass(frozen=True)
class ChairSample:
    """One response judged against its image's true objects (names in vocabulary form)."""

    response: str
    objects: tuple[str, ...]
    mentioned: tuple[str, ...]
    hallucinated: tuple[str, ...]
    covered: tuple[str, ...]
    words: int

    @property
    def missed(self) -> tuple[str, ...]:
        return tuple(name for name in self.objects if name not in self.covered)

    def to_dict(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "mentioned": list(self.mentioned),
            "hallucinated": list(self.hallucinated),
            "covered": list(self.covered),
            "missed": list(self.missed),
            "words": self.words,
        }


def grounded(name: str, truth: Sequence[str], vocabulary: VocabularyLike) -> bool:
    """Whether a mention of ``name`` (a vocabulary name) is grounded in an image whose true objects are ``truth``
    (vocabulary names): a true object itself, ``<attribute> <object>`` when the truth has the bare ``<object>``, or
    a bare object the truth has with some attribute (module docstring). Otherwise a mention of it hallucinates."""
    vocab = as_vocabulary(vocabulary)
    bare = vocab.generic.get(name)
    if bare is not None:
        return name in truth or bare in truth
    return name in {vocab.generic.get(true_name, true_name) for true_name in truth}


def judge_response(response: str, objects: Sequence[str], vocabulary: VocabularyLike) -> ChairSample:
    """Mentioned, hallucinated and covered objects of one response (rules in the module docstring)."""
    vocab = as_vocabulary(vocabulary)
    truth = tuple(dict.fromkeys(vocab.canonical(name) for name in objects))
    mentioned = vocab.mentioned(response)
    mentioned_generic = {vocab.generic.get(name, name) for name in mentioned}
    covered = tuple(
        name for name in truth if name in mentioned or (name not in vocab.generic and name in mentioned_generic)
    )
    return ChairSample(
        response=response,
        objects=truth,
        mentioned=tuple(mentioned),
        hallucinated=tuple(name for name in mentioned if not grounded(name, truth, vocab)),
        covered=covered,
        words=len(response.split()),
    )


def mark_response(response: str, objects: Sequence[str], vocabulary: VocabularyLike) -> dict[str, Any]:
    """One response judged for display: every mention with its character span and whether it hallucinates
    (:func:`grounded`), and the response's hallucinated, covered and missed objects (:func:`judge_response`)."""
    vocab = as_vocabulary(vocabulary)
    sample = judge_response(response, objects, vocab)
    return {
        "mentions": [
            {
                "start": start,
                "end": end,
                "text": response[start:end],
                "object": name,
                "hallucinated": not grounded(name, sample.objects, vocab),
            }
            for start, end, name in vocab.mention_spans(response)
        ],
        "hallucinated": list(sample.hallucinated),
        "covered": list(sample.covered),
        "missed": list(sample.missed),
    }


def chair_samples(
    responses: Sequence[str], objects: Sequence[Sequence[str]], vocabulary: VocabularyLike
) -> list[ChairSample]:
    """Per-response details for :func:`chair`: mentioned, hallucinated, covered and missed objects."""
    if len(responses) != len(objects):
        raise ValueError(f"chair: {len(responses)} responses but {len(objects)} lists of true objects")
    vocab = as_vocabulary(vocabulary)
    return [judge_response(response, truth, vocab) for response, truth in zip(responses, objects, strict=True)]


def summarize_chair(samples: Sequence[ChairSample]) -> dict[str, float]:
    """The metrics of :func:`chair` from per-response details (pooled as the module docstring says)."""
    n = len(samples)
    mentions = sum(len(sample.mentioned) for sample in samples)
    hallucinated = sum(len(sample.hallucinated) for sample in samples)
    true_objects = sum(len(sample.objects) for sample in samples)
    covered = sum(len(sample.covered) for sample in samples)
    with_hallucination = sum(1 for sample in samples if sample.hallucinated)
    chair_s = with_hallucination / n if n else 0.0
    return {
        "chair_s": chair_s,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "coverage": covered / true_objects if true_objects else 0.0,
        "hallucination_rate": chair_s,
        "mean_length": sum(sample.words for sample in samples) / n if n else 0.0,
        "responses": n,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "true_objects": true_objects,
        "covered_objects": covered,
    }


def chair(responses: Sequence[str], objects: Sequence[Sequence[str]], vocabulary: VocabularyLike) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, coverage, hallucination rate and mean length of ``responses`` (shared/DAMA.md section 7).

    Args:
        responses: the model's answers.
        objects: for each response, the names of the objects truly in its image.
        vocabulary: every object name and its synonyms: a :class:`Vocabulary` or either JSON form (module docstring).

    Returns:
        ``chair_s``, ``chair_i``, ``coverage``, ``hallucination_rate``, ``mean_length`` and the counts behind them
        (``responses``, ``mentions``, ``hallucinated_mentions``, ``true_objects``, ``covered_objects``). Per-response
        details: :func:`chair_samples`.
    """
    return summarize_chair(chair_samples(responses, objects, vocabulary))
