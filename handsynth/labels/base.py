"""What a label reader returns, and the file-finding helpers the readers share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from handsynth.labels.schema import Frame


@dataclass
class LabelSet:
    """The frames read from one label source.

    ``sources`` lists every file read (for the manifest's hashes); ``skipped`` counts frames and
    hands dropped, by reason (e.g. ``{"missing_camera": 2, "null_hand": 1}``).
    """

    format: str
    frames: list[Frame]
    sources: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)


class Skips(Counter):
    """A counter of skip reasons; ``as_dict`` drops zero counts and sorts by reason."""

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}


def find_file_ci(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it exists, else the one entry of ``folder`` equal to ``name`` ignoring case."""
    exact = folder / name
    if exact.is_file():
        return exact
    lower = name.lower()
    try:
        matches = sorted(p for p in folder.iterdir() if p.name.lower() == lower and p.is_file())
    except OSError:
        return None
    return matches[0] if matches else None


def first_existing(candidates: Iterable[Path]) -> Path | None:
    for path in candidates:
        if path.is_file():
            return path
    return None


def image_roots(folder: Path, subdirs: Iterable[str], levels: int = 2) -> list[Path]:
    """Folders where a label file's images may live: ``<d>/images/<sub>`` and ``<d>/images`` for
    ``d`` = the label file's folder and up to ``levels`` parents (datasets usually keep the
    annotations in ``<root>/annotations/<split>/`` and the images in ``<root>/images/<split>/``),
    then the label file's folder itself. Only folders that exist are returned (the label file's
    own folder always comes last)."""
    roots: list[Path] = []
    base = folder
    for _ in range(levels + 1):
        roots.extend(base / "images" / sub for sub in subdirs)
        roots.append(base / "images")
        if base.parent == base:
            break
        base = base.parent
    existing = [r for r in dict.fromkeys(roots) if r.is_dir()]
    return existing + [folder]


def locate_image(roots: list[Path], file_name: str) -> Path | None:
    """The first ``root/file_name`` that exists, else ``folder/basename`` in the last root (the
    flat layout of small excerpts), else None."""
    rel = Path(file_name)
    found = first_existing(root / rel for root in roots)
    if found is None and len(rel.parts) > 1:
        found = first_existing([roots[-1] / rel.name])
    return found
