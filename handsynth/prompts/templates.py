"""Prompt templates: parsing, weighted slot sampling and light grammar, with hand words tracked.

Syntax (the same in templates, slot values and value variables):

- ``{name}`` is a placeholder for a slot (or a variable that a slot value sets, e.g. ``{their}``);
  placeholders appear in templates only.
- ``[words]`` marks hand words: the words inside the brackets are hand-related, the brackets
  themselves are removed. In a slot with ``hand: true`` a value without brackets is entirely hand
  words; a value with brackets marks exactly the bracketed words.

Sampling is a pure function of (recipe seed, sample index, hand configuration): the random stream is
``numpy.random.Generator(PCG64(SeedSequence(entropy=seed, spawn_key=(index,))))``, never global state.
A prompt's hand words are known by construction as character spans of its final text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

HAND_CONFIGS = ("right", "left", "both")
"""Hand configurations a recipe writes templates for: one right hand, one left hand, two hands."""

_TOKEN = re.compile(r"\{([^{}]*)\}|[\[\]{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
# A word for span purposes: letters/digits with internal hyphens ("thumbs-up"); "'s" is not part of it.
WORD = re.compile(r"\w+(?:-\w+)*")

Fragment = tuple[str, bool]  # (text, is hand text)


def parse_marked(text: str, *, placeholders: bool = False, hand: bool = False) -> list:
    """Split marked text into pieces: ``(text, is_hand)`` fragments and, if allowed, ``{name}`` slots.

    A slot piece is ``(name, is_hand, None)`` - the third element tells it apart from a fragment.
    ``hand=True`` makes bracket-free text entirely hand text (``hand: true`` slots).
    Raises ValueError with a user-facing message on unbalanced brackets or braces.
    """
    has_brackets = "[" in text or "]" in text
    pieces: list = []
    in_hand, pos = False, 0
    for m in _TOKEN.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos : m.start()], in_hand or (hand and not has_brackets)))
        token, pos = m.group(0), m.end()
        if token == "[":
            if in_hand:
                raise ValueError("nested '[' (hand-word brackets cannot nest)")
            in_hand = True
        elif token == "]":
            if not in_hand:
                raise ValueError("']' without a matching '['")
            in_hand = False
        elif m.group(1) is not None:
            name = m.group(1).strip()
            if not placeholders:
                raise ValueError(f"'{{{m.group(1)}}}': placeholders belong in templates, not in slot values")
            if not _NAME.match(name):
                raise ValueError(f"'{{{m.group(1)}}}' is not a valid slot name (letters, digits, '_')")
            pieces.append((name, in_hand, None))
        else:
            raise ValueError(f"unmatched '{token}' (placeholders are written {{slot_name}})")
    if in_hand:
        raise ValueError("'[' without a matching ']'")
    if pos < len(text):
        pieces.append((text[pos:], in_hand or (hand and not has_brackets)))
    return pieces


def placeholder_names(template: str) -> list[str]:
    """Names of the ``{placeholders}`` of a template, in order of appearance (repeats kept)."""
    return [p[0] for p in parse_marked(template, placeholders=True) if len(p) == 3]


# --- grammar on (text, per-character hand mask) --------------------------------------------

_A_EXCEPTIONS = ("unic", "unif", "unio", "uniq", "unis", "unit", "univ", "use", "usu", "uten", "uti",
                 "ukul", "uran", "eu", "one", "once", "ewe")
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")


def needs_an(word: str) -> bool:
    """Whether the indefinite article before ``word`` is "an" (by sound, with common exceptions)."""
    w = word.lower()
    if w[:1].isdigit():
        return w.startswith("8") or re.match(r"1[18](?!\d)", w) is not None
    if w.startswith(_A_EXCEPTIONS):
        return False
    if w.startswith(_AN_EXCEPTIONS):
        return True
    return w[:1] in ("a", "e", "i", "o", "u")


def _sub(pattern: re.Pattern, repl, text: str, mask: str) -> tuple[str, str]:
    """``re.sub`` that keeps the hand mask (one "1"/"0" per character) aligned with the text.

    Replaced text keeps its mask only if its length is unchanged, otherwise it is not hand text.
    """
    out: list[str] = []
    out_mask: list[str] = []
    last = 0
    for m in pattern.finditer(text):
        new = repl(m) if callable(repl) else repl
        out += (text[last : m.start()], new)
        out_mask += (mask[last : m.start()],
                     mask[m.start() : m.end()] if len(new) == m.end() - m.start() else "0" * len(new))
        last = m.end()
    if not out:
        return text, mask
    out.append(text[last:])
    out_mask.append(mask[last:])
    return "".join(out), "".join(out_mask)


_SPACES = re.compile(r"\s{2,}|[^\S ]")  # runs to collapse (a single space stays)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,.;:!?])")
_REPEATED_COMMA = re.compile(r",(?:\s*,)+")
_COMMA_BEFORE_STOP = re.compile(r",+(?=[.;:!?])")
_COMMA_WITHOUT_SPACE = re.compile(r",(?=[^\s\d])")
_ARTICLE = re.compile(r"(?<![\w'-])(a|an|A|An|AN)(?=\s+(\w+))")
_EDGES = re.compile(r"^[\s,;:]+|[\s,;:]+$")
_HAND_RUN = re.compile("1+")


def _article(m: re.Match) -> str:
    article = "an" if needs_an(m.group(2)) else "a"
    return article.capitalize() if m.group(1)[0] == "A" else article


def tidy(fragments: Iterable[Fragment]) -> tuple[str, list[tuple[int, int]]]:
    """Join fragments into natural text and return it with the character spans of its hand words.

    Collapses whitespace, removes spaces before punctuation, repeated commas and commas before a
    full stop (left by empty slot values), puts a space after every comma, makes "a"/"an" agree
    with the next word, strips stray separators at the ends and capitalises the first letter. Hand
    spans are whole words (``WORD``) inside hand text, so punctuation and "'s" never count as hand words.
    """
    fragments = list(fragments)
    text = "".join(piece for piece, _ in fragments)
    mask = "".join(("1" if is_hand else "0") * len(piece) for piece, is_hand in fragments)
    passes = ((_SPACES, " "), (_SPACE_BEFORE_PUNCT, ""), (_REPEATED_COMMA, ","), (_COMMA_BEFORE_STOP, ""),
              (_COMMA_WITHOUT_SPACE, ", "), (_EDGES, ""), (_ARTICLE, _article))
    for pattern, repl in passes:
        text, mask = _sub(pattern, repl, text, mask)
    first = next((i for i, c in enumerate(text) if c.isalpha()), None)
    if first is not None:
        text = text[:first] + text[first].upper() + text[first + 1 :]
    return text, [w.span() for run in _HAND_RUN.finditer(mask) for w in WORD.finditer(text, *run.span())]


# --- prompts and sampling -------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt and its hand words.

    ``hand_spans`` are ``(start, end)`` character offsets into ``text`` (end exclusive), one per hand
    word. ``hands`` is the hand configuration it was written for, ``template`` the template's index
    in that configuration's list and ``choices`` the ``(slot, value index)`` pairs drawn (all None /
    empty for free text).
    """

    text: str
    hand_spans: tuple[tuple[int, int], ...]
    hands: str | None = None
    template: int | None = None
    choices: tuple[tuple[str, int], ...] = field(default=())

    @property
    def hand_words(self) -> list[str]:
        return [self.text[a:b] for a, b in self.hand_spans]


@dataclass
class _Value:
    fragments: list[Fragment]
    variables: dict[str, list[Fragment]]


@dataclass
class _Table:
    """Weighted choices: ``items[k]`` is drawn with probability weight_k / total."""

    items: list
    cumulative: np.ndarray

    @classmethod
    def build(cls, items: list, weights: list[float]) -> "_Table":
        return cls(items, np.cumsum(np.asarray(weights, dtype=np.float64)))

    def draw(self, rng: np.random.Generator) -> int:
        return min(int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right")),
                   len(self.items) - 1)


class PromptSampler:
    """Draws prompts from a recipe's ``prompts`` section; ``sampler(index, hands)`` is deterministic.

    ``config`` is a validated ``prompts`` section (:class:`handsynth.prompts.recipe.PromptsConfig`: this
    module sits below the recipe schema and does not import it), ``seed`` the recipe seed. The same
    (seed, index, hands) always gives the same Prompt, on any machine and in any order of calls.
    """

    def __init__(self, config: Any, seed: int):
        self.seed = int(seed)
        self.slots: dict[str, _Table] = {}
        self.hand_slots = {name for name, slot in config.slots.items() if slot.hand}
        for name, slot in config.slots.items():
            values = [
                _Value(parse_marked(v.text, hand=slot.hand),
                       {k: parse_marked(t) for k, t in v.vars.items()})
                for v in slot.values
            ]
            self.slots[name] = _Table.build(values, [v.weight for v in slot.values])
        self.templates: dict[str, _Table] = {}
        for hands in HAND_CONFIGS:
            entries = getattr(config.templates, hands)
            parsed = [parse_marked(t.text, placeholders=True) for t in entries]
            self.templates[hands] = _Table.build(parsed, [t.weight for t in entries])

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of sample ``index`` (independent of every other index)."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=self.seed, spawn_key=(index,))))

    def __call__(self, index: int, hands: str) -> Prompt:
        if hands not in self.templates:
            raise ValueError(f"hands must be one of {HAND_CONFIGS}, not {hands!r}")
        if index < 0:
            raise ValueError("sample index must be >= 0")
        rng = self.rng(index)
        table = self.templates[hands]
        t = table.draw(rng)
        pieces = table.items[t]
        chosen: dict[str, int] = {}
        variables: dict[str, list[Fragment]] = {}
        for piece in pieces:  # draw each slot once, in order of first appearance
            if len(piece) == 3 and piece[0] in self.slots and piece[0] not in chosen:
                k = self.slots[piece[0]].draw(rng)
                chosen[piece[0]] = k
                variables.update(self.slots[piece[0]].items[k].variables)
        fragments: list[Fragment] = []
        for piece in pieces:
            if len(piece) == 2:
                fragments.append(piece)
                continue
            name, outer_hand, _ = piece
            inner = (self.slots[name].items[chosen[name]].fragments if name in chosen else variables[name])
            fragments.extend((text, is_hand or outer_hand) for text, is_hand in inner)
        text, spans = tidy(fragments)
        return Prompt(text, tuple(spans), hands, t, tuple(chosen.items()))
