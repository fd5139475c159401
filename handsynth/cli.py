"""handsynth command line. Thin: parse arguments, call a stage, report.

Heavy libraries (torch, pyrender, diffusers) are imported inside the stage functions so that
``handsynth --help`` stays fast.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.markup import escape

from handsynth import __version__
from handsynth.console import console
from handsynth.attentionhand.convert_command import convert
from handsynth.augment.command import augment
from handsynth.doctor import doctor
from handsynth.errors import HandsynthError, Terminated
from handsynth.evaluate.command import evaluate
from handsynth.export.command import export
from handsynth.generate.command import generate
from handsynth.prompts.command import prompts
from handsynth.prompts.recipes_command import recipes_app
from handsynth.render.command import render
from handsynth.train.command import train

app = typer.Typer(
    name="handsynth",
    help=(
        "Synthesise in-the-wild 3D hand training data with AttentionHand: render MANO labels "
        "into mesh images, generate images with Stable Diffusion + hand guidance, export "
        "WebDataset shards paired with the original 3D labels."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"handsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors, and libraries' warnings.")] = False,
) -> None:
    """Global options; --debug is read by main() before the app runs."""


# --- commands, in pipeline order; each lives beside the stage it drives -------------------------
app.command("augment")(augment)
app.command("render")(render)
app.add_typer(recipes_app)
app.command("prompts")(prompts)
app.command("generate")(generate)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("export")(export)
app.command("convert")(convert)
app.command("doctor")(doctor)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turn HandsynthError into one clear paragraph."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        with warnings.catch_warnings(), _sigterm_interrupts():
            if not debug:   # libraries' deprecation notes are for developers, not for handsynth's users
                warnings.filterwarnings("ignore", module=r"(?!handsynth(\.|$))")
            app(args=argv, prog_name="handsynth")  # standalone mode: usage errors print and exit 2
    except SystemExit as exc:
        stop = _interruption(exc)       # typer turns Ctrl-C into a silent exit 130
        if stop is not None:
            return _interrupted(stop)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except HandsynthError as exc:
        if debug:
            console.print_exception()
        console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    return 0


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds it like Ctrl-C (see :class:`handsynth.errors.Terminated`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interruption(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(stop: KeyboardInterrupt) -> int:
    what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
    console.print(f"[yellow]{what}: finished items are kept; rerun the same command to resume[/yellow]")
    return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
