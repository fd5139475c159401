"""``handsynth recipes``: list the recipes shipped with handsynth, copy one out for editing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import stdout

recipes_app = typer.Typer(
    name="recipes", no_args_is_help=False, add_completion=False, pretty_exceptions_enable=False,
    help="List the recipes shipped with handsynth (no subcommand), or copy one out for editing.")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes. `--recipe NAME` (e.g. outdoor.yaml or outdoor) uses one directly when no file
    of that name is in the working directory; `handsynth recipes copy NAME` copies one out to edit."""
    if ctx.invoked_subcommand is not None:
        return
    from handsynth.prompts.library import SHIPPED_DIR, describe, shipped_recipes

    stdout.print(f"recipes shipped with handsynth (in {SHIPPED_DIR}):", soft_wrap=True)
    for name, path in shipped_recipes().items():
        stdout.print(f"  {name:<18} {describe(path)}", soft_wrap=True, markup=False)
    stdout.print("use one with `handsynth generate --recipe NAME.yaml`; copy one out to edit with "
                 "`handsynth recipes copy NAME [DEST]`", soft_wrap=True, markup=False)


@recipes_app.command("copy")
def copy(
    name: Annotated[str, typer.Argument(help="Shipped recipe name, e.g. outdoor (or outdoor.yaml).",
                                        show_default=False)],
    dest: Annotated[Optional[Path], typer.Argument(
        help="File or folder to write (default: ./NAME.yaml).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.")] = False,
) -> None:
    """Copy a shipped recipe to DEST so that you can edit it (an existing file is kept unless --force)."""
    from handsynth.prompts.library import copy_recipe

    target = copy_recipe(name, dest, force=force)
    stdout.print(f"copied recipe '{Path(name).stem}' to {target}; edit it, then pass --recipe {target}",
                 soft_wrap=True, markup=False)
