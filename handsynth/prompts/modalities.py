"""AttentionHand-style ``modalities.json`` inputs: JSON Lines of ``{"mesh", "text"[, "rgb"]}``.

The paths inside are relative to the root of the repository the file came from (the public sample's
start with ``samples/``), not to the file itself. Each path is looked up under ``root`` (default: the
modalities file's folder); if it is not there, leading components are dropped one at a time until
the file exists - so ``samples/mesh/x.jpg`` is found as ``<root>/mesh/x.jpg`` when the file sits in a
copy of the ``samples`` folder. Absolute paths are used as they are. The prompt is the first line of
the text file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from handsynth.errors import InputError
from handsynth.keys import sanitize


@dataclass(frozen=True)
class ModalitiesEntry:
    """One input: sample key (from the mesh file's stem), mesh image, prompt text, optional RGB image."""

    key: str
    mesh: Path
    text: str
    rgb: Path | None = None


def _find(root: Path, value: str) -> Path | None:
    path = Path(value)
    if path.is_absolute():
        return path if path.exists() else None
    for k in range(len(path.parts)):
        candidate = root.joinpath(*path.parts[k:])
        if candidate.exists():
            return candidate
    return None


def read_modalities(path: str | Path, root: str | Path | None = None) -> list[ModalitiesEntry]:
    """Read every line of a modalities file, resolving its paths (see the module docstring)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the modalities file: {exc}", where=path,
                         fix="pass a readable UTF-8 JSON Lines file") from None
    entries: list[ModalitiesEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line is not valid JSON ({exc.msg})", where=where,
                             fix='write one JSON object per line: {"mesh": PATH, "text": PATH}') from None
        if not isinstance(record, dict) or not isinstance(record.get("mesh"), str) \
                or not isinstance(record.get("text"), str):
            raise InputError("each line needs string fields 'mesh' and 'text'", where=where,
                             fix='write one JSON object per line: {"mesh": PATH, "text": PATH}')
        found = {}
        for field in ("mesh", "text", "rgb"):
            if record.get(field) is None:
                continue
            found[field] = _find(root, str(record[field]))
            if found[field] is None:
                raise InputError(f"{field} file '{record[field]}' not found under {root} (nor with leading "
                                 "folders dropped)", where=f"{where}, field {field}",
                                 fix="set inputs.root in the recipe to the folder the paths are relative to")
        try:
            text = found["text"].read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the text file: {exc}", where=found["text"],
                             fix="the text file must be UTF-8 with the prompt on its first line") from None
        if not text or not text[0].strip():
            raise InputError("the text file is empty", where=found["text"], fix="put the prompt on its first line")
        key = sanitize(Path(record["mesh"]).stem)
        if key in seen:
            raise InputError(f"two entries have the sample key '{key}' (lines {seen[key]} and {number})",
                             where=where, fix="give the mesh images distinct file names")
        seen[key] = number
        entries.append(ModalitiesEntry(key, found["mesh"], text[0].strip(), found.get("rgb")))
    if not entries:
        raise InputError("the modalities file has no entries", where=path, fix='add lines {"mesh": ..., "text": ...}')
    return entries
