"""Tell a label file's format (and its role within a file set) from its content, not its name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from handsynth.errors import InputError
from handsynth.io import read_json

FORMATS = ("interhand26m", "coco-neuralannot", "handsynth-jsonl")

FORMAT_HELP = {
    "interhand26m": "InterHand2.6M file set: *_data.json + *_camera.json + *_MANO_NeuralAnnot.json "
                    "(+ optional *_joint_3d.json); name any one of them",
    "coco-neuralannot": "MSCOCO_{split}_MANO_NeuralAnnot.json with coco_wholebody_{split}_v1.0.json "
                        "beside it",
    "handsynth-jsonl": "handsynth JSON Lines, one frame per line (see the README)",
}

_SCAN = 50   # entries looked at when a file's first entries are null


@dataclass(frozen=True)
class Sniffed:
    """A label file's format, its role in the file set and its parsed JSON (None for JSONL).

    Roles: interhand26m -> "data" | "camera" | "joint_3d" | "mano"; coco-neuralannot ->
    "mano" | "wholebody"; handsynth-jsonl -> "lines"; None when the content did not say.
    """

    format: str | None
    role: str | None
    doc: Any


def formats_fix() -> str:
    listed = "; ".join(f"'{name}' ({text})" for name, text in FORMAT_HELP.items())
    return f"pass --format with one of: {listed}"


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise InputError(f"unknown label format '{name}'", where="--format", fix=formats_fix())
    return name


# Role of a file whose content alone does not tell: a COCO-style "images" list, which is an InterHand2.6M
# data file when the set's camera file lies beside it (the caller, who knows the readers, decides).
IMAGE_LIST = "image_list"


def sniff(path: Path) -> Sniffed:
    """Parse ``path`` (JSON or JSON Lines) and classify its content."""
    kind, doc = _load(path)
    if kind == "jsonl":
        return Sniffed("handsynth-jsonl", "lines", None)
    fmt, role = classify(doc)
    if fmt is None and isinstance(doc, Mapping) and "images" in doc:
        role = IMAGE_LIST
    return Sniffed(fmt, role, doc)


def undetectable(path: Path) -> InputError:
    return InputError("cannot tell the label format from the file's content", where=path,
                      fix=formats_fix())


def classify(doc: Any) -> tuple[str | None, str | None]:
    """(format, role) of a parsed JSON document, or (None, None)."""
    if not isinstance(doc, Mapping) or not doc:
        return None, None
    if "hands" in doc and ("id" in doc or {"key", "camera"} <= set(doc)):   # ours, or a render run's label
        return "handsynth-jsonl", "lines"
    if "images" in doc or "annotations" in doc:
        anns, imgs = doc.get("annotations"), doc.get("images")
        ann = anns[0] if isinstance(anns, list) and anns and isinstance(anns[0], Mapping) else {}
        img = imgs[0] if isinstance(imgs, list) and imgs and isinstance(imgs[0], Mapping) else {}
        if {"lefthand_box", "righthand_box", "lefthand_valid", "righthand_valid"} & set(ann):
            return "coco-neuralannot", "wholebody"
        if {"capture", "frame_idx", "camera"} <= set(img):
            return "interhand26m", "data"
        return None, None
    for value in islice(doc.values(), _SCAN):
        if not isinstance(value, Mapping) or not value:
            continue
        if {"campos", "camrot"} & set(value):
            return "interhand26m", "camera"
        if {"right", "left"} & set(value):
            if any(isinstance(h, Mapping) and "mano_param" in h
                   for h in (value.get("right"), value.get("left"))):
                return "coco-neuralannot", "mano"
            continue   # both hands null: look at the next entry
        inner = next(iter(value.values()))
        if isinstance(inner, Mapping):
            if "world_coord" in inner:
                return "interhand26m", "joint_3d"
            if {"right", "left"} & set(inner):
                return "interhand26m", "mano"
        return None, None
    return None, None


def _load(path: Path) -> tuple[str, Any]:
    """("jsonl", None) for JSON Lines (judged from the first two non-empty lines), else
    ("json", parsed document); a single-line file is parsed once."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
            more = any(line.strip() for line in fh)
    except FileNotFoundError:
        raise InputError("the label file does not exist", where=path,
                         fix="check the --labels path") from None
    except UnicodeDecodeError:
        raise InputError("the label file is not UTF-8 text (JSON or JSON Lines)", where=path,
                         fix="point --labels at a JSON or JSON Lines label file") from None
    except OSError as exc:
        raise InputError(f"cannot read the label file: {exc.strerror or exc}", where=path,
                         fix="check the --labels path and its permissions") from None
    if not first:
        raise InputError("the label file is empty", where=path,
                         fix="point --labels at a non-empty label file")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and more:
        return "jsonl", None
    if obj is not None and not more:
        return "json", obj
    return "json", read_json(path, what="label file")
