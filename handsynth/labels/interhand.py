"""InterHand2.6M reader: the ``_data`` + ``_camera`` + ``_MANO_NeuralAnnot`` (+ ``_joint_3d``) file set.

Conventions (InterHand2.6M's own tools): ``campos`` is the camera centre in world millimetres and
``camrot`` the world-to-camera rotation, so X_cam = R (X_world - campos); in the schema's metres
R = camrot and t = -R @ campos / 1000. MANO NeuralAnnot parameters are in world coordinates and
MANO outputs metres. One Frame per image record (one capture, frame and camera).

The user may name any file of the set; the others are found beside it by name, for both the
official naming ``InterHand2.6M_{split}_{kind}.json`` and excerpts such as
``test_interhand2.6m_{kind}.json`` (the prefix is the file name without its ``_{kind}.json``
suffix, compared case-insensitively). A data file without the ``_data`` suffix, ``X.json``, is the
set ``X`` too: ``X_camera.json``, ``X_MANO_NeuralAnnot.json`` and ``X_joint_3d.json`` are found
beside it (and ``X.json`` is the data file of a set named through one of those). Any other naming
is given file by file (``companions``: the render command's ``--camera``, ``--mano-params``,
``--joints-3d``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handsynth.errors import InputError
from handsynth.io import read_json
from handsynth.keys import frame_key
from handsynth.labels.base import LabelSet, Skips, find_file_ci, image_roots, locate_image
from handsynth.labels.detect import classify
from handsynth.labels.schema import SIDES, Camera, Frame
from handsynth.labels.validate import (Where, image_size, make_camera, make_hand, numbers, record_id,
                                       require, require_list, rotation)

FORMAT = "interhand26m"

# role -> (file-name suffix, what the file holds, required for rendering)
KINDS: dict[str, tuple[str, str, bool]] = {
    "data": ("_data.json", "image records (file name, size, capture, camera, frame) and hand-type "
                           "annotations", True),
    "camera": ("_camera.json", "per-capture camera positions (mm), rotations, focal lengths and "
                               "principal points", True),
    "mano": ("_MANO_NeuralAnnot.json", "the NeuralAnnot MANO fits (pose, shape, trans per hand)", True),
    "joint_3d": ("_joint_3d.json", "world joint coordinates (mm), optional", False),
}
HAND_TYPES = {"right": ("right",), "left": ("left",), "interacting": ("right", "left")}
_SPLITS = ("train", "val", "test")


def split_name(path: Path) -> tuple[str | None, str | None]:
    """(prefix, role) from a file name with a known ``_{kind}.json`` suffix, else (None, None)."""
    lower = path.name.lower()
    for role, (suffix, _, _) in KINDS.items():
        if lower.endswith(suffix.lower()) and len(lower) > len(suffix):
            return path.name[: -len(suffix)], role
    return None, None


# role -> the render command's option that names that file explicitly
OPTIONS = {"camera": "--camera", "mano": "--mano-params", "joint_3d": "--joints-3d"}


def set_prefix(path: Path, role: str | None = None) -> str | None:
    """The set's name prefix: the file name less its ``_{kind}.json`` suffix, or, for the data file
    (``role`` "data") without one, its stem (``interhand.json`` -> ``interhand``)."""
    prefix, _ = split_name(path)
    if prefix is None and role == "data":
        return path.stem
    return prefix


def sibling(path: Path, role: str, own_role: str | None = None) -> Path | None:
    """The file of ``role`` in the same set as ``path`` (whose own role is ``own_role`` when known),
    found by name (None when absent). The data file may also be ``<prefix>.json``."""
    prefix = set_prefix(path, own_role)
    if prefix is None:
        return None
    names = [prefix + KINDS[role][0]] + ([prefix + ".json"] if role == "data" else [])
    return next((found for name in names if (found := find_file_ci(path.parent, name)) is not None), None)


def has_sibling_camera(path: Path) -> bool:
    return sibling(path, "camera", "data") is not None


def read(path: Path, doc: Any, role: str | None, *, limit: int | None = None,
         companions: dict[str, Path] | None = None) -> LabelSet:
    """Read the file set ``path`` belongs to; ``doc`` is ``path``'s parsed JSON, ``role`` its
    role when the content told it (else the file name decides). ``companions`` ({role: file}) names
    other files of the set explicitly, for any naming."""
    if role is None:
        fmt, content_role = classify(doc)
        role = content_role if fmt == FORMAT else split_name(path)[1]
    if role not in KINDS:
        raise InputError(
            "cannot tell which InterHand2.6M file this is (data, camera, joint_3d or MANO)",
            where=path,
            fix="name one of the set's files (..._data.json, ..._camera.json, ..._joint_3d.json, "
                "..._MANO_NeuralAnnot.json) with its original name")
    files = {role: path}
    docs = {role: doc}
    for other, found in (companions or {}).items():
        files[other], docs[other] = found, _read_companion(found, other)
    for other, (_, _, required) in KINDS.items():
        if other in files:
            continue
        found = sibling(path, other, role)
        if found is None and required:
            raise _missing_sibling(path, role, other)
        if found is not None:
            files[other] = found
            docs[other] = read_json(found, what=f"InterHand2.6M {other} file")
    return _frames(files, docs, limit)


def _read_companion(path: Path, role: str) -> Any:
    """The parsed file given for ``role`` by its option; InputError when its content is another file of the set."""
    option = OPTIONS[role]
    if not path.is_file():
        raise InputError(f"the file given with {option} does not exist", where=path, fix=f"check the {option} path")
    doc = read_json(path, what=f"InterHand2.6M {role} file")
    fmt, found = classify(doc)
    if fmt == FORMAT and found is not None and found != role:
        raise InputError(f"the file given with {option} holds InterHand2.6M {found} records, not {role} records",
                         where=path, fix=f"pass the set's {KINDS[role][0].removeprefix('_')} file with {option}")
    return doc


def _missing_sibling(path: Path, role: str, missing: str) -> InputError:
    suffix, holds, _ = KINDS[missing]
    prefix = set_prefix(path, role)
    option = OPTIONS.get(missing)
    name_it = f" or name it with {option} FILE" if option else " or pass the set's data file as --labels"
    if prefix is None:
        expected = f"a file named <prefix>{suffix} next to {path.name}"
        fix = ("keep the set's original file names (e.g. InterHand2.6M_train_data.json, "
               f"InterHand2.6M_train_camera.json, ...) so that the {missing} file is found,{name_it}")
    else:
        expected = str(path.parent / (prefix + suffix))
        fix = f"put the set's {suffix} file there (InterHand2.6M ships it with the annotations),{name_it}"
    return InputError(f"the InterHand2.6M {missing} file, which holds {holds}, is missing: "
                      f"expected {expected}", where=path, fix=fix)


def _frames(files: dict[str, Path], docs: dict[str, Any], limit: int | None) -> LabelSet:
    data_path, cam_path, mano_path = files["data"], files["camera"], files["mano"]
    data, cameras, manos = docs["data"], docs["camera"], docs["mano"]
    joints = docs.get("joint_3d")
    top = Where(data_path, "top level")
    images = require_list(data, "images", top, holds="the image records")
    annotations = require_list(data, "annotations", top, holds="the hand annotations")
    for name, value, p in (("camera", cameras, cam_path), ("MANO", manos, mano_path),
                           ("joint_3d", joints, files.get("joint_3d"))):
        if value is not None and not isinstance(value, Mapping):
            raise InputError(f"the InterHand2.6M {name} file should hold a JSON object keyed by "
                             f"capture id, got {type(value).__name__}", where=p,
                             fix="check that the file is the one you meant")

    by_image: dict[Any, list[dict]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        by_image[record_id(ann, "image_id", Where(data_path, f"annotations[{i}]"))].append(ann)

    roots = image_roots(data_path.parent, _split_dirs(data_path))
    camera_table = _Cameras(cameras, cam_path)
    skips = Skips()
    frames: list[Frame] = []
    for i, img in enumerate(images):
        if limit is not None and len(frames) >= limit:
            break
        frame = _frame(img, i, by_image, camera_table, manos, joints, files, roots, skips)
        if frame is not None:
            frames.append(frame)
    sources = [files[r] for r in KINDS if r in files]
    return LabelSet(FORMAT, frames, sources, skips.as_dict())


def _frame(img: Any, index: int, by_image: dict, cameras: _Cameras, manos: Mapping,
           joints: Mapping | None, files: dict[str, Path], roots: list[Path],
           skips: Skips) -> Frame | None:
    data_path = files["data"]
    where = Where(data_path, f"images[{index}]")
    image_id = record_id(img, "id", where)
    where = Where(data_path, f"image id {image_id}")
    capture, cam, frame_idx = (require(img, k, where) for k in ("capture", "camera", "frame_idx"))
    size = image_size(require(img, "width", where), require(img, "height", where), where)
    file_name = require(img, "file_name", where)

    anns = by_image.get(image_id, [])
    if not anns:
        skips["no_annotation"] += 1
        return None
    sides = _valid_sides(anns, where)

    cam_entry, camera = cameras(str(capture), str(cam))
    if camera is None:
        skips["missing_camera"] += 1
        return None

    mano_entry = _nested(manos, str(capture), str(frame_idx))
    if mano_entry is None:
        skips["missing_mano"] += 1
        return None
    mano_where = Where(files["mano"], f"capture {capture} frame {frame_idx}")
    if not isinstance(mano_entry, Mapping):
        raise mano_where.error("(entry)", "should be an object with 'right' and 'left'",
                               "check that the file is an InterHand2.6M MANO_NeuralAnnot file")
    single_box = anns[0].get("bbox") if len(anns) == 1 and len(sides) == 1 else None
    hands = []
    for side in SIDES:
        params = mano_entry.get(side)
        if params is None:
            if side in sides:
                skips["null_hand"] += 1
            continue
        hands.append(make_hand(side, params, mano_where, prefix=side, valid=side in sides,
                               bbox=single_box if side in sides else None,
                               bbox_field="bbox (data file)"))
    if not any(h.valid for h in hands):
        skips["no_valid_hand"] += 1
        return None

    original = {"image": img, "annotations": anns, "camera": cam_entry, "mano": mano_entry}
    joint_entry = _nested(joints, str(capture), str(frame_idx)) if joints is not None else None
    if joint_entry is not None:
        original["joint_3d"] = joint_entry
    return Frame(
        key=frame_key("ih", capture, cam, frame_idx),
        source_format=FORMAT,
        image_size=size,
        camera=camera,
        hands=hands,
        image_path=locate_image(roots, str(file_name)),
        source_id={"image_id": image_id, "capture": capture, "seq_name": img.get("seq_name"),
                   "camera": str(cam), "frame_idx": frame_idx,
                   "annotation_ids": [a.get("id") for a in anns]},
        original=original,
    )


def _valid_sides(anns: list, where: Where) -> set[str]:
    """Sides the annotations vouch for: hand_type ("interacting" -> both) when hand_type_valid."""
    sides: set[str] = set()
    for ann in anns:
        hand_type = require(ann, "hand_type", where, field="hand_type (annotation)")
        if not isinstance(hand_type, str) or hand_type not in HAND_TYPES:
            raise where.error("hand_type (annotation)",
                              f"must be one of {sorted(HAND_TYPES)}, got {hand_type!r}",
                              "fix the annotation's hand_type")
        if ann.get("hand_type_valid", 1):
            sides.update(HAND_TYPES[hand_type])
    return sides


class _Cameras:
    """The camera file's cameras, each validated and converted once:
    ``(capture, cam) -> (entry {campos, camrot, focal, princpt}, Camera)``, (None, None) if absent."""

    def __init__(self, doc: Mapping, path: Path):
        self.doc, self.path = doc, path
        self.cache: dict[tuple[str, str], tuple[dict | None, Camera | None]] = {}

    def __call__(self, capture: str, cam: str) -> tuple[dict | None, Camera | None]:
        if (capture, cam) not in self.cache:
            where = Where(self.path, f"capture {capture} camera {cam}")
            entry = _camera_entry(self.doc, capture, cam, where)
            camera = None
            if entry is not None:
                R = rotation(entry["camrot"], where, "camrot")
                campos = numbers(entry["campos"], 3, where, "campos", unit="mm")
                camera = make_camera(entry["focal"], entry["princpt"], R, -(R @ campos), where,
                                     fields=("focal", "princpt", "camrot", "campos"), t_scale=1e-3)
            self.cache[capture, cam] = entry, camera
        return self.cache[capture, cam]


def _camera_entry(cameras: Mapping, capture: str, cam: str, where: Where) -> dict | None:
    """{campos, camrot, focal, princpt} of one camera; None when the camera file does not know
    the camera at all, an InputError when it lists the camera under some fields only."""
    per_capture = cameras.get(capture)
    if not isinstance(per_capture, Mapping):
        return None
    fields = ("campos", "camrot", "focal", "princpt")
    entry = {f: per_capture[f][cam] for f in fields
             if isinstance(per_capture.get(f), Mapping) and cam in per_capture[f]}
    if not entry:
        return None
    for field in fields:
        if field not in entry:
            raise where.error(field, "is missing for this camera",
                              f"add camera {cam} to the capture's '{field}' table, or remove the "
                              "camera from the file")
    return entry


def _nested(doc: Mapping | None, capture: str, frame: str) -> Any:
    per_capture = doc.get(capture) if isinstance(doc, Mapping) else None
    return per_capture.get(frame) if isinstance(per_capture, Mapping) else None


def _split_dirs(data_path: Path) -> list[str]:
    """Split names (train/val/test) mentioned in the set's prefix, for images/<split>/."""
    prefix, _ = split_name(data_path)
    words = re.split(r"[_\-.]", (prefix or data_path.stem).lower())
    return [w for w in _SPLITS if w in words]
