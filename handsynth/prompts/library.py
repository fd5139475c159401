"""The recipes shipped inside the package (``handsynth/recipes/*.yaml``): list them, find one by its bare
name, copy one out for editing.

A ``--recipe`` value that names an existing file is that file. A bare name without a folder
(``outdoor.yaml``, ``outdoor``) that names no file in the working directory is the shipped recipe of
that name, so the design card's ``handsynth generate --recipe outdoor.yaml`` works in any folder.
"""

from __future__ import annotations

from pathlib import Path

from handsynth import io
from handsynth.errors import InputError, OutputError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "recipes"
SUFFIXES = (".yaml", ".yml")


def shipped_recipes() -> dict[str, Path]:
    """{name: file} of the recipes shipped with handsynth, sorted by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def shipped_names() -> str:
    return ", ".join(shipped_recipes()) or "(none)"


def describe(path: Path) -> str:
    """The first line of a recipe's header comment, without the 'handsynth recipe:' lead-in."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().lstrip("#").strip()
    return first.removeprefix("handsynth recipe:").strip()


def shipped_recipe(name: str | Path) -> Path | None:
    """The shipped recipe a bare name (``outdoor``, ``outdoor.yaml``) means, else None."""
    path = Path(name)
    if len(path.parts) != 1:
        return None
    stem = path.stem if path.suffix.lower() in SUFFIXES else path.name
    return shipped_recipes().get(stem)


def find_recipe(value: str | Path) -> tuple[Path, bool]:
    """(recipe file, whether it is a shipped recipe) for a ``--recipe`` value: an existing file wins,
    then a shipped recipe of that bare name; otherwise the path as given (the loader reports it missing)."""
    path = Path(value).expanduser()
    if path.exists():
        return path, False
    shipped = shipped_recipe(path)
    return (shipped, True) if shipped is not None else (path, False)


def copy_recipe(name: str, dest: Path | None = None, *, force: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (default ./<name>.yaml; a folder gets <name>.yaml
    inside it). An existing file is kept unless ``force``. Returns the written path."""
    source = shipped_recipe(name)
    if source is None:
        raise InputError(f"there is no shipped recipe named '{name}'", where=name,
                         fix=f"use one of: {shipped_names()} (`handsynth recipes` lists them)")
    target = Path(dest).expanduser() if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise OutputError(f"'{target}' already exists", where=target,
                          fix="choose another destination, or pass --force to replace it")
    io.write_bytes_atomic(target, source.read_bytes())
    return target
