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


def _prompt_source(recipe, run: Optional[Path], hands: Optional[str]):
    """A function index -> Prompt giving generate's prompts, and a note on the default inputs used (or None).

    Without --hands: the real plan, as ``handsynth generate`` builds it from --run, else the recipe's inputs,
    else the newest render run under ./runs/ (each frame's own hand configuration, a modalities file's own
    texts). Without any render run, and with --hands: the recipe's templates for the given configuration
    ("all" cycles right/left/both by index).
    """
    from handsynth.generate.plan import Plan, find_inputs
    from handsynth.render import layout as render_layout
    from handsynth.rundir import newest_run
    from handsynth.prompts.templates import HAND_CONFIGS, PromptSampler

    if hands is None and run is None and recipe.inputs is None and newest_run(render_layout.STAGE) is None:
        hands = "all"
        note = ("no render run under ./runs/ and none given: cycling right/left/both by index; pass --run <render "
                "run> to preview the prompts generate will use for its frames")
    elif hands is None:
        inputs, default = find_inputs(recipe, run)
        if inputs.kind == "run" and recipe.prompts is None:
            raise InputError("the recipe has no 'prompts' section, which render-run inputs need", where=recipe.path,
                             fix="add prompts.templates and prompts.slots (`handsynth recipes copy outdoor` shows "
                                 "them)")
        return Plan(recipe, inputs.frames, None).prompt, default
    else:
        note = None
    if recipe.prompts is None:
        raise InputError("--hands applies to a recipe's templates, and this recipe has none (its prompts come from "
                         "its modalities file)", where="--hands", fix="leave --hands out")
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    if hands == "all":
        return (lambda i: sampler(i, HAND_CONFIGS[i % len(HAND_CONFIGS)])), note
    return (lambda i: sampler(i, hands)), note


class _Stats:
    """Running per-slot counts, distinct prompts and hand-token counts (nothing per prompt is kept but a hash)."""

    def __init__(self, recipe):
        self.recipe, self.n, self.seen = recipe, 0, set()
        self.slots: dict[str, Counter] = {name: Counter() for name in (recipe.prompts.slots if recipe.prompts
                                                                        else {})}
        self.empty = self.tokens = 0

    def add(self, prompt, tokens) -> None:
        self.n += 1
        self.seen.add(hash(prompt.text))
        for slot, k in prompt.choices:
            if slot in self.slots:
                self.slots[slot][k] += 1
        if tokens is not None:
            self.empty += not tokens
            self.tokens += len(tokens)

    def print(self, with_tokens: bool) -> None:
        from rich.table import Table

        from handsynth.console import stdout

        stdout.print(f"{self.n} prompts, {len(self.seen)} distinct")
        if with_tokens:
            stdout.print(f"hand tokens per prompt: mean {self.tokens / max(self.n, 1):.2f}; prompts without hand "
                         f"tokens: {self.empty}")
        if self.recipe.prompts is None:
            return
        for name, slot in self.recipe.prompts.slots.items():
            counts = self.slots[name]
            drawn, total = sum(counts.values()), sum(v.weight for v in slot.values)
            covered = sum(1 for k in range(len(slot.values)) if counts[k])
            table = Table(title=f"slot '{name}': drawn {drawn} times, {covered}/{len(slot.values)} values seen",
                          title_justify="left")
            for column in ("value", "count", "observed", "expected"):
                table.add_column(column, justify="left" if column == "value" else "right")
            for k, value in enumerate(slot.values):
                observed = counts[k] / drawn if drawn else 0.0
                table.add_row(value.text or '""', str(counts[k]), f"{observed:.3%}", f"{value.weight / total:.3%}")
            stdout.print(table)


def prompts(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file, or a shipped recipe's name "
                                                                "(e.g. outdoor.yaml; see `handsynth recipes`).")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of prompts.")] = 20,
    start: Annotated[int, typer.Option("--start", min=0, help="First sample index.")] = 0,
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="Render run whose frames decide each sample's hand configuration, as for generate "
                      "(default: the recipe's inputs, else the newest render run under ./runs/).")] = None,
    hands: Annotated[Optional[str], typer.Option(
        "--hands", help="Preview one hand configuration instead of the run's: right, left, both, or all (cycles "
                        "right/left/both by index).", show_default=False)] = None,
    stats: Annotated[bool, typer.Option(
        "--stats", help="Print per-slot value coverage over the prompts against the expected weights instead of "
                        "the prompts themselves.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="CLIP tokenizer folder or model id (default: the recipe's model.base).")] = None,
    no_tokens: Annotated[bool, typer.Option("--no-tokens", help="Do not compute CLIP token positions.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Write one JSON object per prompt to stdout.")] = False,
) -> None:
    """Show the prompts of sample indices START..START+COUNT-1, hand words highlighted, as generate will use them.

    Each line: the sample index, the hand configuration, the prompt with its hand words highlighted
    and the CLIP token positions of those words (0 = start token) that the Text Attention Stage
    attends to. Sample i's hand configuration is that of the frame generate gives it (frame i mod
    n_frames of --run / the recipe's inputs / the newest render run), so the prompts are exactly those
    `handsynth generate` uses for the same indices. Lines are written as they are made.
    """
    from rich.text import Text

    from handsynth.console import console, print_defaults, progress, stdout
    from handsynth.prompts.recipe import load_recipe
    from handsynth.prompts.spans import hand_token_indices
    from handsynth.prompts.templates import HAND_CONFIGS

    if hands is not None and hands not in (*HAND_CONFIGS, "all"):
        raise InputError(f"--hands is '{hands}'", where="--hands", fix="use right, left, both or all")
    if hands is not None and run is not None:
        raise InputError("--hands and --run both choose the hand configurations", where="--hands",
                         fix="pass one of them: --run to preview a render run's frames, --hands for one configuration")
    loaded = load_recipe(recipe)
    source, note = _prompt_source(loaded, run, hands)
    if note and note.startswith("no render run"):
        console.print(f"[dim]note: {note}[/dim]", soft_wrap=True)
    elif note:
        print_defaults({"--run": note})
    tok = None if no_tokens else _tokenizer(tokenizer or loaded.model.base, from_recipe=tokenizer is None)

    summary = _Stats(loaded) if stats else None
    out = stdout.file
    with progress("prompts") as bar:
        task = bar.add_task("sampling", total=count, visible=stats and count >= 1000)
        for i in range(start, start + count):
            p = source(i)
            tokens = hand_token_indices(tok, p.text, p.hand_spans) if tok is not None else None
            if summary is not None:
                summary.add(p, tokens)
                bar.advance(task)
            elif as_json:
                record = {"index": i, "hands": p.hands, "text": p.text, "hand_words": p.hand_words,
                          "hand_spans": [list(s) for s in p.hand_spans]}
                if tokens is not None:
                    record["token_indices"] = tokens
                out.write(json.dumps(record) + "\n")
            else:
                line = Text(f"{i:>6}  {p.hands or '-':<5}  ", style="dim")
                text = Text(p.text)
                for a, b in p.hand_spans:
                    text.stylize("bold magenta underline", a, b)
                line.append(text)
                if tokens is not None:
                    line.append(f"  {tokens}", style="cyan")
                stdout.print(line, soft_wrap=True)
    if summary is not None:
        summary.print(tok is not None)
