"""Hand-token spans on the real CLIP tokenizer, and the free-text lexicon."""

from __future__ import annotations

import re

import pytest

from handsynth.prompts import hand_token_indices, lexicon_spans, read_modalities
from handsynth.prompts.spans import free_text_prompt
from tests.conftest import SHARED


def spans_of(text: str, *words: str) -> list[tuple[int, int]]:
    """Character spans of the given occurrences, e.g. "holding#2" for the second one."""
    out = []
    for word in words:
        name, _, nth = word.partition("#")
        starts = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
        start = starts[int(nth or 1) - 1]
        out.append((start, start + len(name)))
    return out


def tokens_at(tok, text, positions):
    pieces = tok.convert_ids_to_tokens(tok(text, truncation=True, max_length=77).input_ids)
    return [pieces[p] for p in positions]


def test_contract_example(clip_tokenizer):
    text = "The woman is holding a pink umbrella with her hand."
    idx = hand_token_indices(clip_tokenizer, text, spans_of(text, "holding", "hand"))
    assert idx == [4, 10]
    assert tokens_at(clip_tokenizer, text, idx) == ["holding</w>", "hand</w>"]


CASES = [
    # (text, hand words, expected decoded tokens at the returned positions)
    ("A woman is holding up her hand with fingers spread out while holding a pair of scissors.",
     ["holding", "hand", "fingers", "holding#2"], ["holding</w>", "hand</w>", "fingers</w>", "holding</w>"]),
    ("The hand's THUMBS-up, please!", ["hand", "THUMBS-up"], ["hand</w>", "thumbs</w>", "-</w>", "up</w>"]),
    ("He is  gripping\tthe  rail", ["gripping"], ["gripping</w>"]),
    ("hand hand hand", ["hand#2"], ["hand</w>"]),
    ("A naïve café owner is kneading dough with her palms", ["kneading", "palms"], ["kneading</w>", "palms</w>"]),
    ("Two hands’ knuckles", ["hands", "knuckles"], ["hands</w>", "knuckles</w>"]),
]


@pytest.mark.parametrize("text,words,expected", CASES)
def test_hand_tokens_decode_to_hand_words(clip_tokenizer, text, words, expected):
    idx = hand_token_indices(clip_tokenizer, text, spans_of(text, *words))
    # BPE pieces of one word join back to it ("kneading" is two tokens)
    assert idx == sorted(idx) and "".join(tokens_at(clip_tokenizer, text, idx)) == "".join(expected)
    # the same positions by counting the tokens of each word's prefix (an independent computation,
    # valid because hand words start and end on CLIP pre-token boundaries)
    n = lambda s: len(clip_tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    expect = [p for a, b in spans_of(text, *words) for p in range(1 + n(text[:a]), 1 + n(text[:b]))]
    assert idx == expect


def test_multi_token_word_gives_all_tokens(clip_tokenizer):
    text = "A pianist is glissandoing across the keys with his fingertips"
    idx = hand_token_indices(clip_tokenizer, text, spans_of(text, "glissandoing", "fingertips"))
    pieces = tokens_at(clip_tokenizer, text, idx)
    assert len(pieces) >= 4  # both words split into several BPE tokens
    assert "".join(pieces).replace("</w>", "") == "glissandoingfingertips"
    first = [p for p in idx if p < 8]
    assert first == list(range(first[0], first[-1] + 1))  # contiguous positions for one word


def test_truncation_drops_tokens_past_75(clip_tokenizer):
    filler = " ".join(["red"] * 72)
    text = f"a {filler} waving hand holding hands"
    # positions: 1 "a", 2..73 "red", 74 "waving", 75 "hand", 76 would be "holding" but is the end token
    idx = hand_token_indices(clip_tokenizer, text, lexicon_spans(text))
    assert idx == [74, 75]
    assert tokens_at(clip_tokenizer, text, idx) == ["waving</w>", "hand</w>"]
    assert hand_token_indices(clip_tokenizer, text, []) == []


def test_modalities_sample_spans(clip_tokenizer):
    entries = read_modalities(SHARED / "samples" / "attentionhand-official" / "modalities.json")
    assert [e.key for e in entries] == ["000000000036", "000000000113", "000000000165"]
    assert all(e.mesh.exists() and e.mesh.parent.name == "mesh" for e in entries)
    words = [free_text_prompt(e.text).hand_words for e in entries]
    assert words == [["holding", "hand"], ["holding"], ["holding", "hand", "fingers", "holding"]]
    p = free_text_prompt(entries[2].text)
    idx = hand_token_indices(clip_tokenizer, p.text, p.hand_spans)
    assert idx == [4, 7, 9, 13]


def test_modalities_root_and_errors(tmp_path):
    from handsynth.errors import InputError

    (tmp_path / "data" / "m").mkdir(parents=True)
    (tmp_path / "data" / "m" / "a.png").write_bytes(b"x")
    (tmp_path / "data" / "t.txt").write_text("a hand waving\nsecond line\n")
    listing = tmp_path / "lists" / "mod.json"
    listing.parent.mkdir()
    listing.write_text('{"mesh": "repo/m/a.png", "text": "repo/t.txt"}\n')
    (entry,) = read_modalities(listing, root=tmp_path / "data")
    assert entry.mesh == tmp_path / "data" / "m" / "a.png" and entry.text == "a hand waving"
    with pytest.raises(InputError, match="inputs.root"):
        read_modalities(listing)  # default root is the file's folder, where nothing matches
    listing.write_text('{"mesh": "m/a.png"}\n')
    with pytest.raises(InputError, match="line 1"):
        read_modalities(listing, root=tmp_path / "data")


@pytest.mark.parametrize("text,expected", [
    ("A man is standing and smiling, wearing a hat while sitting", []),
    ("Waving HANDS and Pointing", ["Waving", "HANDS", "Pointing"]),
    ("palm trees sway; she shows her palm", ["palm"]),
    ("a hand-painted sign, a thumbs-up and a high-five", ["thumbs-up", "high-five"]),
    ("waves crash while a surfer is waving", ["waving"]),
    ("a cutting board and a man cutting bread", ["cutting"]),
    ("she grabbed the handle", ["grabbed"]),
])
def test_lexicon(text, expected):
    assert [text[a:b] for a, b in lexicon_spans(text)] == expected
