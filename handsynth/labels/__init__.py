"""Label readers: every supported source format -> one in-memory schema (handsynth.labels.schema).

    read_labels(path, format=None, *, limit=None) -> LabelSet(format, frames, sources, skipped)

The format is judged from the file's content (``detect_format``); ``format`` overrides it.
"""

from __future__ import annotations

from pathlib import Path

from handsynth.errors import InputError
from handsynth.labels.base import LabelSet
from handsynth.labels.detect import FORMATS, IMAGE_LIST, Sniffed, check_format, sniff, undetectable
from handsynth.labels.schema import Camera, Frame, Hand

__all__ = ["FORMATS", "Camera", "Frame", "Hand", "LabelSet", "detect_format", "read_labels"]


def read_labels(path: str | Path, format: str | None = None, *,
                limit: int | None = None, companions: dict[str, Path] | None = None) -> LabelSet:
    """Read the labels at ``path`` (any file of a multi-file set) into Frames, in source order.

    ``limit`` keeps the first ``limit`` usable frames. ``companions`` ({"camera" | "mano" | "joint_3d":
    file}) names the other files of an InterHand2.6M set when their names do not follow the set's.
    Raises InputError on unreadable, malformed or inconsistent input, naming the file, record and field.
    """
    path = Path(path)
    if format is not None:
        check_format(format)
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}", where="--limit",
                         fix="pass a non-negative number of frames")
    if path.is_dir():
        raise InputError("--labels names a folder, not a label file", where=path,
                         fix="name a label file (for InterHand2.6M any file of the set)")
    found = _sniff(path)
    fmt = format or found.format
    if fmt is None:
        raise undetectable(path)
    role = found.role if found.format == fmt else None
    companions = {r: Path(p) for r, p in (companions or {}).items() if p is not None}
    if companions and fmt != "interhand26m":
        from handsynth.labels.interhand import OPTIONS
        raise InputError(f"{', '.join(OPTIONS[r] for r in companions)} only apply to InterHand2.6M file sets, "
                         f"and the labels are {fmt}", where=path, fix="leave those options out")
    if fmt == "interhand26m":
        from handsynth.labels import interhand
        return interhand.read(path, found.doc, role, limit=limit, companions=companions)
    if fmt == "coco-neuralannot":
        from handsynth.labels import coco
        return coco.read(path, found.doc, role, limit=limit)
    from handsynth.labels import jsonl
    return jsonl.read(path, limit=limit)


def detect_format(path: str | Path) -> str:
    """The label format of ``path``, one of FORMATS, judged from the file's content."""
    found = _sniff(Path(path))
    if found.format is None:
        raise undetectable(Path(path))
    return found.format


def _sniff(path: Path) -> Sniffed:
    """:func:`~handsynth.labels.detect.sniff`, with a plain COCO-style data file recognised as an
    InterHand2.6M data file when the set's camera file lies beside it."""
    found = sniff(path)
    if found.format is None and found.role == IMAGE_LIST:
        from handsynth.labels import interhand

        if interhand.has_sibling_camera(path):
            return Sniffed(interhand.FORMAT, "data", found.doc)
    return found
