"""``handsynth prompts``: show a recipe's prompts with their hand words and CLIP token positions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.errors import InputError, MissingResourceError


def _tokenizer(source: str, from_recipe: bool):
    from handsynth.tokenizer import load_clip_tokenizer

    try:
        return load_clip_tokenizer(source)
    except MissingResourceError as exc:
        raise MissingResourceError(
            exc.what, where=exc.where,
            fix=("pass --tokenizer with a local CLIP tokenizer folder or Stable Diffusion folder (a folder holding "
                 "vocab.json and merges.txt, or model/tokenizer/), or --no-tokens to skip token positions"
                 + ("" if not from_recipe else "; the default is the tokenizer of the recipe's model.base")
                 + (f". Or {exc.fix}" if exc.fix else "")),
        ) from None


def _prompt_source(recipe, hands: str):
    """A function index -> Prompt, and the number of available indices (None = unbounded)."""
    from handsynth.prompts.modalities import read_modalities
    from handsynth.prompts.spans import free_text_prompt
    from handsynth.prompts.templates import HAND_CONFIGS, PromptSampler

    if recipe.prompts is None:  # a modalities recipe: its own prompts, hand words from the lexicon
        entries = read_modalities(recipe.inputs.modalities, recipe.inputs.root)
        return (lambda i: free_text_prompt(entries[i].text)), len(entries)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    if hands == "all":
        return (lambda i: sampler(i, HAND_CONFIGS[i % len(HAND_CONFIGS)])), None
    return (lambda i: sampler(i, hands)), None


def _print_stats(recipe, prompts, token_lists) -> None:
    from rich.table import Table

    from handsynth.console import stdout

    n = len(prompts)
    stdout.print(f"{n} prompts, {len(set(p.text for p in prompts))} distinct")
    if token_lists is not None:
        empty = sum(1 for t in token_lists if not t)
        mean = sum(len(t) for t in token_lists) / max(n, 1)
        stdout.print(f"hand tokens per prompt: mean {mean:.2f}; prompts without hand tokens: {empty}")
    if recipe.prompts is None:
        return
    counts: dict[str, Counter] = {name: Counter() for name in recipe.prompts.slots}
    for p in prompts:
        for slot, k in p.choices:
            counts[slot][k] += 1
    for name, slot in recipe.prompts.slots.items():
        drawn = sum(counts[name].values())
        total = sum(v.weight for v in slot.values)
        covered = sum(1 for k in range(len(slot.values)) if counts[name][k])
        table = Table(title=f"slot '{name}': drawn {drawn} times, {covered}/{len(slot.values)} values seen",
                      title_justify="left")
        for column in ("value", "count", "observed", "expected"):
            table.add_column(column, justify="left" if column == "value" else "right")
        for k, value in enumerate(slot.values):
            observed = counts[name][k] / drawn if drawn else 0.0
            table.add_row(value.text or '""', str(counts[name][k]), f"{observed:.3%}", f"{value.weight / total:.3%}")
        stdout.print(table)


def prompts(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file, e.g. recipes/outdoor.yaml.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of prompts.")] = 20,
    start: Annotated[int, typer.Option("--start", min=0, help="First sample index.")] = 0,
    hands: Annotated[str, typer.Option(
        "--hands", help="Hand configuration: right, left, both, or all (cycles right/left/both by index).")] = "all",
    stats: Annotated[bool, typer.Option(
        "--stats", help="Print per-slot value coverage over the prompts against the expected weights instead of "
                        "the prompts themselves.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="CLIP tokenizer folder or model id (default: the recipe's model.base).")] = None,
    no_tokens: Annotated[bool, typer.Option("--no-tokens", help="Do not compute CLIP token positions.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Write one JSON object per prompt to stdout.")] = False,
) -> None:
    """Show the prompts a recipe gives for sample indices START..START+COUNT-1, hand words highlighted.

    Each line: the sample index, the hand configuration, the prompt with its hand words highlighted
    and the CLIP token positions of those words (0 = start token) that the Text Attention Stage
    attends to. The prompts are exactly those `handsynth generate` uses for the same indices.
    """
    from rich.text import Text

    from handsynth.console import progress, stdout
    from handsynth.prompts.recipe import load_recipe
    from handsynth.prompts.spans import hand_token_indices
    from handsynth.prompts.templates import HAND_CONFIGS

    if hands not in (*HAND_CONFIGS, "all"):
        raise InputError(f"--hands is '{hands}'", where="--hands", fix="use right, left, both or all")
    loaded = load_recipe(recipe)
    source, available = _prompt_source(loaded, hands)
    if available is not None:
        count = max(0, min(count, available - start))
    tok = None if no_tokens else _tokenizer(tokenizer or loaded.model.base, from_recipe=tokenizer is None)

    indices = range(start, start + count)
    results, token_lists = [], ([] if tok is not None else None)
    with progress("prompts") as bar:
        task = bar.add_task("sampling", total=count, visible=stats and count >= 1000)
        for i in indices:
            p = source(i)
            results.append(p)
            if tok is not None:
                token_lists.append(hand_token_indices(tok, p.text, p.hand_spans))
            bar.advance(task)

    if stats:
        _print_stats(loaded, results, token_lists)
        return
    for n, (i, p) in enumerate(zip(indices, results)):
        tokens = token_lists[n] if token_lists is not None else None
        if as_json:
            record = {"index": i, "hands": p.hands, "text": p.text, "hand_words": p.hand_words,
                      "hand_spans": [list(s) for s in p.hand_spans]}
            if tokens is not None:
                record["token_indices"] = tokens
            stdout.print(json.dumps(record), markup=False, highlight=False, soft_wrap=True)
            continue
        line = Text(f"{i:>6}  {p.hands or '-':<5}  ", style="dim")
        text = Text(p.text)
        for a, b in p.hand_spans:
            text.stylize("bold magenta underline", a, b)
        line.append(text)
        if tokens is not None:
            line.append(f"  {tokens}", style="cyan")
        stdout.print(line, soft_wrap=True)
