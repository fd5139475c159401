"""handsynth JSON Lines: our own label format, one frame per line (documented in the README).

    {"id": "cap1-000123",                        required, string or integer, unique
     "image": "images/000123.jpg",               optional: relative to the JSONL file's folder,
                                                 absolute, or null
     "width": 1280, "height": 720,               required, pixels
     "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], pixels; or instead "focal": [fx, fy],
                                                 "princpt": [cx, cy]
     "R": [[...], [...], [...]],                 optional world->camera rotation (default identity)
     "t": [tx, ty, tz],                          optional world->camera translation, metres (default 0)
     "hands": [{"side": "right" | "left",
                "pose": [48],                    axis-angle radians, [0:3] global orientation,
                                                 [3:48] 15 finger joints (MANO, flat_hand_mean=False)
                "shape": [10],                   MANO betas
                "trans": [3],                    metres, world frame
                "valid": true,                   optional (default true)
                "bbox": [x, y, w, h]}]}          optional source box, pixels

X_cam = R X + t; u = fx X/Z + cx, v = fy Y/Z + cy. Blank lines are ignored; other fields are kept
in ``original``. The frame key is the id in the key alphabet (handsynth.keys.frame_key).

A render run's own ``labels.jsonl`` (lines with ``key``, ``camera`` and ``hands[i].mano`` instead of ``id``)
is read too: each frame keeps its key, source format, source ids and original annotation, so rendering
it again gives the same labels and images as rendering the source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handsynth.errors import InputError
from handsynth.keys import frame_key
from handsynth.labels.base import LabelSet, Skips
from handsynth.labels.schema import Camera, Frame
from handsynth.labels.validate import (Where, image_size, make_camera, make_hand, numbers, record_id,
                                       require, require_list)

FORMAT = "handsynth-jsonl"


def read(path: Path, *, limit: int | None = None) -> LabelSet:
    skips = Skips()
    frames: list[Frame] = []
    seen: dict[str, tuple[int, Any]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if limit is not None and len(frames) >= limit:
                    break
                if not line.strip():
                    continue
                frame = _frame(path, number, line, skips)
                if frame is None:
                    continue
                frame_id = frame.source_id.get("id", frame.key)
                if frame.key in seen:
                    first_line, first_id = seen[frame.key]
                    raise InputError(
                        f"line {number}: id {frame_id!r} gives the same frame key "
                        f"'{frame.key}' as id {first_id!r} on line {first_line}",
                        where=f"{path}, line {number}, field 'id'",
                        fix="give every frame a distinct id (keys keep only a-z, 0-9, '_' and '-')")
                seen[frame.key] = (number, frame_id)
                frames.append(frame)
    except UnicodeDecodeError:
        raise InputError("the label file is not UTF-8 text", where=path,
                         fix="save the JSON Lines file as UTF-8") from None
    return LabelSet(FORMAT, frames, [path], skips.as_dict())


def _frame(path: Path, number: int, line: str, skips: Skips) -> Frame | None:
    where = Where(path, f"line {number}")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"line {number} is not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}",
                         where=f"{path}, line {number}",
                         fix="write one complete JSON object per line") from None
    if not isinstance(rec, Mapping):
        raise InputError(f"line {number} should be a JSON object, got {type(rec).__name__}",
                         where=f"{path}, line {number}", fix="write one JSON object per line")
    if "id" not in rec and "key" in rec and "camera" in rec:
        return _render_label_frame(path, rec, where)
    frame_id = record_id(rec, "id", where, holds="the frame's unique id")
    size = image_size(require(rec, "width", where), require(rec, "height", where), where)
    camera = _camera(rec, where)

    hands_raw = require_list(rec, "hands", where, holds="a list of hands")
    hands = []
    for i, h in enumerate(hands_raw):
        side = require(h, "side", where, field=f"hands[{i}].side")
        valid = h.get("valid", True)
        if not isinstance(valid, bool):
            raise where.error(f"hands[{i}].valid", f"must be true or false, got {valid!r}",
                              "use a JSON boolean")
        hands.append(make_hand(side, h, where, prefix=f"hands[{i}]", valid=valid, bbox=h.get("bbox")))
    sides = [h.side for h in hands]
    if len(set(sides)) != len(sides):
        raise where.error("hands", f"lists the same side twice ({sides})",
                          "give at most one right and one left hand per frame")
    if not any(h.valid for h in hands):
        skips["no_valid_hand"] += 1
        return None
    return Frame(key=frame_key(frame_id), source_format=FORMAT, image_size=size, camera=camera,
                 hands=hands, image_path=_image(rec, path, where),
                 source_id={"id": frame_id, "line": number}, original=dict(rec))


def _render_label_frame(path: Path, rec: Mapping, where: Where) -> Frame:
    """A line of a render run's ``labels.jsonl`` (see handsynth.render.layout) as the frame it was made from."""
    key = record_id(rec, "key", where, holds="the frame key render wrote")
    if not isinstance(key, str) or frame_key(key) != key:
        raise where.error("key", f"is not a frame key, got {key!r}",
                          "pass the labels.jsonl of a render run unchanged, or write handsynth JSON Lines with 'id'")
    size = require_list(rec, "image_size", where, holds="[width, height] in pixels")
    if len(size) != 2:
        raise where.error("image_size", f"must be [width, height], got {size!r}", "give two whole numbers of pixels")
    size = image_size(*size, where, fields=("image_size[0]", "image_size[1]"))
    cam = require(rec, "camera", where, holds="focal, princpt, R, t")
    get = lambda name: require(cam, name, where, field=f"camera.{name}")  # noqa: E731
    camera = make_camera(get("focal"), get("princpt"), get("R"), get("t"), where,
                         fields=("camera.focal", "camera.princpt", "camera.R", "camera.t"))
    hands = []
    for i, h in enumerate(require_list(rec, "hands", where, holds="a list of hands")):
        prefix = f"hands[{i}]"
        hands.append(make_hand(require(h, "side", where, field=f"{prefix}.side"),
                               require(h, "mano", where, field=f"{prefix}.mano"), where,
                               prefix=f"{prefix}.mano", bbox=h.get("source_bbox")))
    if not hands:
        raise where.error("hands", "is empty", "pass the labels.jsonl of a render run unchanged")
    source_id = rec.get("source_id") if isinstance(rec.get("source_id"), Mapping) else {}
    original = rec.get("original") if isinstance(rec.get("original"), Mapping) else {}
    return Frame(key=key, source_format=str(rec.get("source_format") or FORMAT), image_size=size, camera=camera,
                 hands=hands, image_path=_render_label_image(rec.get("image_path"), path),
                 source_id=dict(source_id), original=dict(original))


def _render_label_image(value: Any, path: Path) -> Path | None:
    """The source image a render label names: absolute, or relative to where render ran (tried from the
    working directory, then from the run folder's parent); None when it is not there."""
    if not isinstance(value, str) or not value:
        return None
    image = Path(value)
    for candidate in (image,) if image.is_absolute() else (image, path.parent.parent / image):
        if candidate.is_file():
            return candidate
    return None


def _camera(rec: Mapping, where: Where) -> Camera:
    if "K" in rec and ("focal" in rec or "princpt" in rec):
        raise where.error("K", "is given together with 'focal'/'princpt'",
                          "give the intrinsics once: either K or focal + princpt")
    if "K" in rec:
        K = numbers(rec["K"], 9, where, "K", unit="3x3 intrinsics in pixels").reshape(3, 3)
        if K[0, 1] != 0 or K[1, 0] != 0 or list(K[2]) != [0.0, 0.0, 1.0]:
            raise where.error("K", f"must look like [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}",
                              "give a pinhole matrix without skew")
        focal, princpt, fields = (K[0, 0], K[1, 1]), (K[0, 2], K[1, 2]), ("K", "K")
    else:
        focal = require(rec, "focal", where, holds="[fx, fy] in pixels, or give K instead")
        princpt = require(rec, "princpt", where, holds="[cx, cy] in pixels")
        fields = ("focal", "princpt")
    return make_camera(focal, princpt, rec.get("R"), rec.get("t"), where, fields=(*fields, "R", "t"))


def _image(rec: Mapping, path: Path, where: Where) -> Path | None:
    image = rec.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise where.error("image", f"must be a path string or null, got {image!r}",
                          "give the image path relative to the JSONL file, or null")
    full = path.parent / image
    return full if full.is_file() else None
