"""The offline-built CLIP tokenizer must give OpenAI CLIP's ids."""


def test_known_ids(clip_tokenizer):
    # Ids produced by OpenAI CLIP's own SimpleTokenizer (clip/simple_tokenizer.py) on the same text.
    ids = clip_tokenizer("The woman is holding a pink umbrella with her hand. Thumbs-up!").input_ids
    assert ids == [49406, 518, 2308, 533, 5050, 320, 3360, 17143, 593, 899, 2463, 269, 17599, 268, 705, 256, 49407]
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.model_max_length == 77


def test_roundtrip_and_truncation(clip_tokenizer):
    text = "the woman is holding a pink umbrella with her hand."
    ids = clip_tokenizer(text).input_ids
    assert clip_tokenizer.decode(ids, skip_special_tokens=True).replace(" .", ".").strip() == text
    long = clip_tokenizer(" ".join(["hand"] * 200), truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_missing_or_wrong_tokenizer_is_a_clear_error(tmp_path):
    import json

    import pytest

    from handsynth.errors import MissingResourceError
    from handsynth.tokenizer import load_clip_tokenizer

    with pytest.raises(MissingResourceError, match="bpe_simple_vocab_16e6") as err:
        load_clip_tokenizer(tmp_path / "nothing-here")
    assert f"folder '{tmp_path / 'nothing-here'}' does not exist" in err.value.message
    assert "huggingface-cli" not in err.value.message  # a path is not a model id to download
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(MissingResourceError, match=r"4 tokens instead of 49408"):
        load_clip_tokenizer(tmp_path)
