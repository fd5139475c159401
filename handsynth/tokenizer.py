"""The CLIP tokenizer Stable Diffusion 1.5 uses, loaded the way a pipeline loads it.

Normally it comes from the base model (``<model>/tokenizer``). For machines without the model,
:func:`build_clip_tokenizer` turns OpenAI's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``, which
ships inside the ``open_clip_torch`` and ``clip-anytorch`` wheels) into the same tokenizer: the
vocabulary is the 256 byte symbols, the same with the end-of-word marker, one entry per merge, then
the start and end tokens - 49,408 ids in OpenAI's order.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from handsynth.errors import MissingResourceError

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map from byte values to printable unicode characters, in vocabulary order.

    Printable bytes map to themselves and come first; the remaining bytes follow, mapped to 256, 257, ...
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def build_clip_tokenizer(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs for CLIPTokenizer into ``out_dir``."""
    bpe_gz, out_dir = Path(bpe_gz), Path(out_dir)
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_clip_tokenizer(model: str | Path, subfolder: str | None = "tokenizer"):
    """Load the CLIP tokenizer of a Stable Diffusion model id or folder (or a tokenizer folder itself).

    Raises MissingResourceError when it cannot be found, or when what loads is not CLIP's
    49,408-token vocabulary (transformers can return a near-empty tokenizer instead of failing).
    """
    from transformers import CLIPTokenizer

    from handsynth.hub import local_files_only, looks_like_path

    path = Path(model).expanduser()
    if path.is_dir() and (path / "vocab.json").exists():
        subfolder = None
    offline = ("offline, build the tokenizer from open_clip's BPE file with "
               "`python -m handsynth.tokenizer bpe_simple_vocab_16e6.txt.gz OUT_DIR` and pass OUT_DIR")
    fix = ("pass a local Stable Diffusion folder (diffusers layout) or download the model once with "
           f"`huggingface-cli download {model}`; " + offline)
    if not path.exists() and looks_like_path(str(model)):
        raise MissingResourceError(f"the tokenizer folder '{model}' does not exist", where=model,
                                   fix="check the path (a folder with vocab.json and merges.txt, or a Stable "
                                       "Diffusion folder with tokenizer/); " + offline)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    # the local folder or Hugging Face cache first: no network round trips (or minutes of retries offline)
    attempts = [True] if local_files_only(model) else [True, False]
    for local_only in attempts:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(model), local_files_only=local_only, **kwargs)
        except Exception as exc:  # noqa: BLE001 - corrupt files fail inside the tokenizers library with a bare Exception
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problem = f"cannot load the CLIP tokenizer of '{model}': {reason}"
            if path.exists():
                problem += " (its vocab.json / merges.txt are damaged or not a CLIP tokenizer's)"
            continue
        if len(tokenizer) == CLIP_VOCAB_SIZE:
            tokenizer.model_max_length = CLIP_MAX_LENGTH
            return tokenizer
        # transformers can return a near-empty tokenizer instead of failing
        problem = f"'{model}' did not give CLIP's tokenizer ({len(tokenizer)} tokens instead of {CLIP_VOCAB_SIZE})"
    if attempts == [True] and not path.exists():
        problem = (f"the tokenizer of '{model}' is not in the Hugging Face cache and the hub cannot be reached "
                   "(no network, or HF_HUB_OFFLINE=1)")
    if path.exists():
        fix = ("copy the model's tokenizer/ folder (vocab.json, merges.txt) again, or pass another folder; "
               + offline)
    raise MissingResourceError(problem, where=model, fix=fix)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m handsynth.tokenizer BPE_SIMPLE_VOCAB_16E6_TXT_GZ OUT_DIR")
    print(build_clip_tokenizer(sys.argv[1], sys.argv[2]))
