"""Template sampling: determinism, weighted frequencies, grammar, hand words by construction, the CLI."""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from handsynth.cli import main
from handsynth.prompts import HAND_CONFIGS, PromptSampler, hand_token_indices, lexicon_spans, load_recipe
from handsynth.prompts.templates import needs_an, tidy
from tests.conftest import SHARED, SHIPPED_RECIPES

WEIGHTED = """\
seed: 11
prompts:
  templates:
    right:
      - {text: "{who} is [holding] {thing} in {their} right [hand], {light}", weight: 3}
      - "{who} [waves] {thing} with {their} right [hand]"
    left: ["{who} [holding] {thing} in {their} left [hand]"]
    both: ["{who} is {both_action} {light}"]
  slots:
    who:
      - {text: "a woman", vars: {their: her}, weight: 1}
      - {text: "a man", vars: {their: his}, weight: 2}
      - {text: "a child", vars: {their: their}, weight: 5}
    thing: [a umbrella, a apple, an cup, a hourglass, a unicycle, a 8-ball]
    light: ["", at dusk, "  in   soft light "]
    both_action:
      hand: true
      values: ["clapping", "[typing] on a laptop with both [hands]"]
"""


@pytest.fixture
def weighted(tmp_path) -> Path:
    path = tmp_path / "weighted.yaml"
    path.write_text(WEIGHTED)
    return path


def test_same_index_same_prompt_across_fresh_loads(weighted):
    a = PromptSampler(load_recipe(weighted).prompts, 11)
    b = PromptSampler(load_recipe(weighted).prompts, 11)
    order = list(range(200))
    first = [a(i, HAND_CONFIGS[i % 3]) for i in order]
    second = {i: b(i, HAND_CONFIGS[i % 3]) for i in reversed(order)}  # any call order
    assert all(first[i] == second[i] for i in order)
    assert len({p.text for p in first}) > 20
    other_seed = PromptSampler(load_recipe(weighted).prompts, 12)
    assert sum(other_seed(i, "right") != a(i, "right") for i in order) > 100


def test_weighted_frequencies(weighted):
    """Each value/template is drawn with probability weight/total: counts over 10,000 samples lie within
    4 binomial standard deviations of n * p (a false alarm rate below 1e-4 per check)."""
    recipe = load_recipe(weighted)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    n = 10_000
    prompts = [sampler(i, "right") for i in range(n)]
    checks = [(Counter(p.template for p in prompts), [0.75, 0.25])]
    for slot, weights in (("who", [1, 2, 5]), ("thing", [1] * 6), ("light", [1, 1, 1])):
        counts = Counter(k for p in prompts for s, k in p.choices if s == slot)
        drawn = sum(counts.values())
        assert drawn == (n if slot != "light" else checks[0][0][0])
        checks.append((Counter({k: c * n / drawn for k, c in counts.items()}) if slot != "light" else counts,
                       [w / sum(weights) for w in weights]))
    for counts, probs in checks:
        total = sum(counts.values())
        for k, p in enumerate(probs):
            sigma = math.sqrt(total * p * (1 - p))
            assert abs(counts[k] - total * p) <= 4 * sigma, (counts, probs)


def test_grammar_and_spans_by_construction(weighted):
    recipe = load_recipe(weighted)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    seen = set()
    for i in range(400):
        for hands in HAND_CONFIGS:
            p = sampler(i, hands)
            seen.add(p.text)
            assert p.text[0].isupper() and "  " not in p.text and not p.text.endswith((",", " "))
            assert " ," not in p.text and ",," not in p.text
            # hand words are exactly the bracketed words; the brackets are gone
            assert "[" not in p.text and "]" not in p.text
            expected = {"right": [["holding", "hand"], ["waves", "hand"]], "left": [["holding", "hand"]],
                        "both": [["clapping"], ["typing", "hands"]]}[hands]
            assert p.hand_words in expected
            assert all(p.text[a:b] == w for (a, b), w in zip(p.hand_spans, p.hand_words))
            # pronoun agrees with the person
            who = dict(p.choices)["who"]
            assert f" {['her', 'his', 'their'][who]} " in p.text or hands == "both"
    text = " ".join(seen)
    for phrase in ("an umbrella", "an apple", "a cup", "an hourglass", "a unicycle", "an 8-ball"):
        assert phrase in text
    for wrong in ("a umbrella", "a apple", "an cup", "a hourglass", "an unicycle", "a 8-ball"):
        assert wrong not in text
    assert "in soft light" in text and "at dusk" in text


def test_tidy_keeps_spans_aligned():
    text, spans = tidy([("  a ", False), ("apple", False), (" [x] ", False), ("holding", True), (" , ,", False),
                        ("thumbs-up", True), (", .", False)])
    assert text == "An apple [x] holding, thumbs-up."
    assert [text[a:b] for a, b in spans] == ["holding", "thumbs-up"]
    assert needs_an("hour") and needs_an("11-year-old") and not needs_an("European") and not needs_an("one-armed")


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_give_hand_tokens_for_every_configuration(path, clip_tokenizer):
    recipe = load_recipe(path)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    for hands in HAND_CONFIGS:
        prompts = [sampler(i, hands) for i in range(300)]
        assert len({p.text for p in prompts}) >= 295
        for p in prompts:
            tokens = hand_token_indices(clip_tokenizer, p.text, p.hand_spans)
            assert p.hand_spans and tokens and max(tokens) <= 75
            words = [w.lower() for w in p.hand_words]
            decoded = clip_tokenizer.convert_ids_to_tokens(clip_tokenizer(p.text).input_ids)
            assert "".join(decoded[t] for t in tokens).replace("</w>", "") == "".join(words)
            # every lexicon hand word in a shipped prompt is marked by the recipe too
            assert set(lexicon_spans(p.text)) <= set(p.hand_spans), p.text


def test_cli_json_output(weighted, capsys, monkeypatch, tmp_path, clip_tokenizer_dir, clip_tokenizer):
    monkeypatch.chdir(tmp_path)        # no render run here: right/left/both cycle by index
    tokenizer = clip_tokenizer
    code = main(["prompts", "--recipe", str(weighted), "--count", "5", "--start", "7", "--json",
                 "--tokenizer", str(clip_tokenizer_dir)])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    recipe = load_recipe(weighted)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    assert [r["index"] for r in records] == [7, 8, 9, 10, 11]
    for r in records:
        p = sampler(r["index"], HAND_CONFIGS[r["index"] % 3])
        assert r["text"] == p.text and r["hands"] == p.hands and r["hand_words"] == p.hand_words
        assert r["token_indices"] == hand_token_indices(tokenizer, p.text, p.hand_spans)


def test_cli_stats(weighted, capsys):
    assert main(["prompts", "--recipe", str(weighted), "--count", "3000", "--hands", "right", "--stats",
                 "--no-tokens"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3000 prompts" in out and "slot 'who': drawn 3000 times, 3/3 values seen" in out
    assert "62.500%" in out  # expected share of "a child" (5 of 8)


def test_cli_highlights_hand_words(weighted, capsys, monkeypatch, tmp_path, clip_tokenizer_dir):
    monkeypatch.chdir(tmp_path)        # no render run here: right/left/both cycle by index
    assert main(["prompts", "--recipe", str(weighted), "--count", "3", "--tokenizer", str(clip_tokenizer_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("0  right") and lines[2].lstrip().startswith("2  both")


def test_cli_modalities_recipe_uses_its_prompts(tmp_path, capsys, clip_tokenizer_dir):
    sample = SHARED / "samples" / "attentionhand-official" / "modalities.json"
    recipe = tmp_path / "ah.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        inputs:
          modalities: {sample}
    """))
    assert main(["prompts", "--recipe", str(recipe), "--count", "4", "--json",
                 "--tokenizer", str(clip_tokenizer_dir)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[3]["text"] == records[0]["text"]         # sample 3 is entry 0's second variant, as in generate
    records = records[:3]
    assert [r["text"] for r in records] == [
        "The woman is holding a pink umbrella with her hand.",
        "The person is holding a knife above the cake.",
        "A woman is holding up her hand with fingers spread out while holding a pair of scissors.",
    ]
    assert [r["hand_words"] for r in records] == [["holding", "hand"], ["holding"],
                                                  ["holding", "hand", "fingers", "holding"]]
    assert records[0]["token_indices"] == [4, 10]
    assert records[2]["token_indices"] == [4, 7, 9, 13]


def test_cli_bad_hands_option(weighted, capsys):
    assert main(["prompts", "--recipe", str(weighted), "--hands", "three", "--no-tokens"]) != 0
    assert "--hands" in capsys.readouterr().err


def test_cli_offline_tokenizer_error(weighted, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["prompts", "--recipe", str(weighted), "--count", "1", "--tokenizer", "no-such-org/no-such-model"])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "--tokenizer" in err and "--no-tokens" in err and "Traceback" not in err


def test_cli_streams_its_output(weighted, monkeypatch, tmp_path):
    """A million prompts are written as they are made: when the reader stops after three lines (a closed
    pipe), only about three prompts were ever sampled, and the command ends quietly (click's exit code 1 for
    a closed pipe)."""
    monkeypatch.chdir(tmp_path)
    sampled = []
    original = PromptSampler.__call__

    def counting(self, index, hands):
        sampled.append(index)
        if len(sampled) > 100:
            raise AssertionError("sampled 100 prompts before writing any: the output is held back")
        return original(self, index, hands)

    class Reader:       # stdout of `handsynth prompts ... | head -3`
        lines: list[str] = []

        def write(self, text):
            if len(self.lines) == 3:
                raise BrokenPipeError(32, "Broken pipe")
            self.lines.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(PromptSampler, "__call__", counting)
    reader = Reader()
    monkeypatch.setattr("sys.stdout", reader)
    code = main(["prompts", "--recipe", str(weighted), "--count", "1000000", "--json", "--no-tokens"])
    assert code == 1 and len(reader.lines) == 3 and sampled == [0, 1, 2, 3]
    assert [json.loads(line)["index"] for line in reader.lines] == [0, 1, 2]


def test_cli_corrupt_tokenizer_folder_is_a_clear_error(weighted, capsys, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text("not json at all")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    code = main(["prompts", "--recipe", str(weighted), "--count", "1", "--hands", "right", "--tokenizer", str(folder)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 3 and f"cannot load the CLIP tokenizer of '{folder}'" in err and "damaged" in err
    assert "Traceback" not in err and "huggingface-cli download " + str(folder) not in err
