"""Hand words in text and their CLIP token positions.

TAS attends to the CLIP BPE tokens of the hand-related words of a prompt. Two steps:

1. Hand words as character spans: known by construction for recipe prompts (``templates``), found
   with :func:`lexicon_spans` for free text (captions, AttentionHand ``text/*.txt`` files).
2. :func:`hand_token_indices` maps character spans to token positions exactly as the text encoder
   sees them: position 0 is the start token, words from 1, and only positions 1..75 survive
   truncation to 77 tokens (76 is then the end token). A word split into several BPE tokens gives
   all of them. It uses the tokenizer's own offset mapping, so CLIP's lowercasing, whitespace
   cleaning and pre-tokenising regex are applied by the tokenizer itself, never re-implemented.

The lexicon (documented in the README) holds hand nouns and verbs whose every sense in a photo caption
is an action done with the hands, each in all its written forms. Left out on purpose: posture and
clothing verbs ("standing", "sitting", "wearing", "smiling", "looking"), activity verbs whose object
decides whether hands are involved ("playing", "riding", "eating"), and forms that are mostly nouns
in captions ("wave"/"waves" of the sea, "touch" as in "a touch of colour", "type", "point", "cut").
Matching is case-insensitive on whole words, where a word is letters/digits with internal hyphens:
"thumbs-up" and "high-five" match as compounds, "hand-painted" does not match "hand", and "palm" /
"cutting" are skipped in "palm tree", "cutting board" and the like.
"""

from __future__ import annotations

import re

from handsynth.prompts.templates import Prompt
from handsynth.tokenizer import CLIP_MAX_LENGTH

HAND_NOUNS = frozenset("""
hand hands finger fingers fingertip fingertips thumb thumbs palm palms fist fists knuckle knuckles
wrist wrists fingernail fingernails forefinger forefingers handful handshake handshakes handprint handprints
gesture gestures gesturing gestured grip grips grasp grasps
thumbs-up thumb-up high-five high-fives fist-bump fist-bumps
""".split())

# One line per verb: its forms (base, third person, -ing, past, participle) except those that are
# mostly nouns or adjectives in captions ("a water tap", "a pinch of salt", "sliced bread").
_VERB_FORMS = """
hold holds holding held
grab grabs grabbing grabbed
grip grips gripping gripped
grasp grasps grasping grasped
clutching clutched
clasping clasped
clench clenches clenching clenched
squeeze squeezes squeezing squeezed
pinching pinched
take takes taking took taken
carry carries carrying carried
lifting lifted
raise raises raising raised
waving waved
pointing pointed
clap claps clapping clapped
typing typed
texting texted
write writes writing wrote written
catch catches catching caught
throw throws throwing threw thrown
toss tosses tossing tossed
touching touched
tapping tapped
pressing pressed
push pushes pushing pushed
pull pulls pulling pulled
picking picked
handing handed
reach reaches reaching reached
shaking shook
snapping snapped
stroking stroked
petting petted
patting patted
poking poked
rub rubs rubbing rubbed
scratching scratched
wiping wiped
folding
stacking
kneading kneaded
stir stirs stirring stirred
whisking whisked
chopping
slicing
peeling
pour pours pouring poured
sew sews sewing sewed sewn
knitting
sketching
brushing brushed
combing combed
tying
wrapping
unwrapping unwrapped
twisting
cupping cupped
flipping flipped
juggle juggles juggling juggled
dribble dribbles dribbling dribbled
strum strums strumming strummed
pluck plucks plucking plucked
swiping swiped
scrolling
signing
hammering
sawing
soldering
gluing
whittling
sculpting
grating
dicing
sprinkling
scooping
braiding
threading
polishing
mashing
dipping
cutting
screwing
sanding
"""

HAND_VERBS = frozenset(w for line in _VERB_FORMS.split("\n") for w in line.split())
HAND_LEXICON = HAND_NOUNS | HAND_VERBS

# Words after which a lexicon word is part of a noun that is not a hand or hand action.
_NOT_HAND_BEFORE = {
    "palm": frozenset("tree trees leaf leaves frond fronds oil grove groves beach beaches springs".split()),
    "cutting": frozenset("board boards edge".split()),
    "soldering": frozenset("iron irons station".split()),
}
_NOT_HAND_BEFORE["palms"] = _NOT_HAND_BEFORE["palm"]

_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")


def lexicon_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the hand words of free text, by the lexicon above."""
    words = list(_WORD.finditer(text))
    spans = []
    for i, m in enumerate(words):
        word = m.group(0).lower()
        if word not in HAND_LEXICON:
            continue
        following = words[i + 1].group(0).lower() if i + 1 < len(words) else ""
        if following in _NOT_HAND_BEFORE.get(word, ()):
            continue
        spans.append(m.span())
    return spans


def hand_token_indices(tokenizer, text: str, hand_spans, max_length: int = CLIP_MAX_LENGTH) -> list[int]:
    """CLIP token positions (0 = start token) of every token overlapping a hand character span.

    ``tokenizer`` is the pipeline's fast CLIP tokenizer (``handsynth.tokenizer.load_clip_tokenizer``);
    tokens cut off by truncation to ``max_length`` are dropped, so every index is < max_length - 1.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("hand_token_indices needs a fast (tokenizers-backed) CLIP tokenizer for offset mapping")
    spans = [(int(a), int(b)) for a, b in hand_spans if b > a]
    if not spans:
        return []
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    return [
        pos
        for pos, (token_id, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))
        if token_id not in special and b > a and any(a < end and start < b for start, end in spans)
    ]


def free_text_prompt(text: str) -> Prompt:
    """A Prompt for free text (a caption, an AttentionHand text file) with lexicon hand words."""
    return Prompt(text, tuple(lexicon_spans(text)))
