"""``handsynth convert``: the public AttentionHand checkpoint -> handsynth's diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import console, print_defaults, stdout
from handsynth.hub import DEFAULT_GUIDANCE

DEFAULT_OUT = Path(DEFAULT_GUIDANCE)


def convert(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="The AttentionHand checkpoint: attentionhand.ckpt (PyTorch "
                                       "Lightning) or a .safetensors state dict with the same keys.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write (default: models/attentionhand, "
                                                "which recipes use as model.guidance).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Also convert the SD1.5 UNet, VAE and text encoder stored in "
                                       "the checkpoint (they are SD1.5's locked weights, so usually not needed).")]
    = False,
    base: Annotated[Optional[str], typer.Option("--base", help="SD1.5 model id or folder: supplies the config "
                                                "fields weights cannot tell and, with --full, the tokenizer and "
                                                "scheduler (default with --full: stable-diffusion-v1-5).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder (only once "
                                            "the new one is complete).")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Convert even when weights are missing; "
                                                "they keep their initial values and are listed in the report.")]
    = False,
) -> None:
    """Convert the public AttentionHand checkpoint into a diffusers guidance module (safetensors).

    Writes OUT/controlnet (the guidance module, a diffusers ControlNetModel) and
    OUT/conversion_report.json (every source key: converted, ignored with reason, or unused).
    """
    from handsynth.attentionhand.convert import REPORT, convert_checkpoint
    from handsynth.hub import DEFAULT_BASE_MODEL

    defaults: dict[str, object] = {}
    if out is None:
        out = defaults["--out"] = DEFAULT_OUT
    if full and base is None:
        base = defaults["--base"] = DEFAULT_BASE_MODEL
    print_defaults(defaults)
    with console.status(f"converting {ckpt}"):
        report = convert_checkpoint(ckpt, out, full=full, base=base, overwrite=overwrite,
                                    allow_missing=allow_missing)
    print_summary(report.to_json())
    stdout.print(f"wrote {out} ({', '.join(report.parts)}; report in {out / REPORT})")


def print_summary(report: dict) -> None:
    """A table of converted, ignored and unused keys, and a warning listing unused ones."""
    from rich.table import Table

    table = Table(title=f"conversion of {Path(report['source']).name} ({report['source_keys']} keys)")
    table.add_column("keys")
    table.add_column("count", justify="right")
    table.add_column("note")
    for name, part in report["parts"].items():
        note = f"{len(part['missing'])} MISSING (initial values kept)" if part["missing"] else "complete"
        table.add_row(f"converted: {name}", str(part["converted"]), f"{part['expected']} weights expected, {note}")
    for entry in report["ignored"].values():
        table.add_row("ignored", str(entry["count"]), entry["reason"])
    table.add_row("unused", str(report["unused_keys"]), "not understood by the converter" if report["unused"] else "")
    stdout.print(table)
    if report["top_level_entries_ignored"]:
        stdout.print("[dim]training state not converted: " + ", ".join(report["top_level_entries_ignored"]) + "[/dim]")
    if report["unused"]:
        shown = ", ".join(report["unused"][:10]) + (", ..." if len(report["unused"]) > 10 else "")
        console.print(f"[yellow]warning:[/yellow] {len(report['unused'])} key(s) of the checkpoint were not used: "
                      f"{shown}", soft_wrap=True)
