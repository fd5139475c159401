"""MSCOCO NeuralAnnot reader: InterWild's ``MSCOCO_{split}_MANO_NeuralAnnot.json`` fits with
image sizes, file names and hand boxes from ``coco_wholebody_{split}_v1.0.json`` beside it.

The fit file maps a COCO-WholeBody annotation id (one person) to
``{"right" | "left": {"mano_param": {pose, shape, trans}, "cam_param": {focal, princpt, [R, t]}} | null}``.
Conventions follow InterWild (``common/utils/preprocessing.py: get_mano_data``): the MANO mesh is
computed in metres from the parameters, then brought into the camera by X_cam = R X + t when
``R`` and ``t`` are given (``t`` in metres, added to metre-scale MANO output), else the parameters
are already camera coordinates (R = identity, t = 0); pixels by u = fx X/Z + cx, v = fy Y/Z + cy.

One Frame per annotation id; when the person's two hands come with different cameras (the fits
are per hand), one Frame per hand, keyed ``coco_<aid>_<side>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from handsynth.errors import InputError
from handsynth.io import read_json
from handsynth.keys import frame_key
from handsynth.labels.base import LabelSet, Skips, find_file_ci, image_roots, locate_image
from handsynth.labels.detect import classify
from handsynth.labels.schema import SIDES, Camera, Frame, Hand
from handsynth.labels.validate import (Where, image_size, make_camera, make_hand, numbers, record_id,
                                       require, require_list)

FORMAT = "coco-neuralannot"
MANO_NAME = re.compile(r"^mscoco_(?P<split>.+)_mano_neuralannot\.json$", re.IGNORECASE)
WHOLEBODY_NAME = re.compile(r"^coco_wholebody_(?P<split>.+)_v1\.0\.json$", re.IGNORECASE)
PATTERNS = {"mano": (MANO_NAME, "MSCOCO_{split}_MANO_NeuralAnnot.json"),
            "wholebody": (WHOLEBODY_NAME, "coco_wholebody_{split}_v1.0.json")}


def read(path: Path, doc: Any, role: str | None, *, limit: int | None = None) -> LabelSet:
    """Read the fit + WholeBody pair ``path`` belongs to (either file may be named)."""
    if role is None:
        fmt, content_role = classify(doc)
        role = content_role if fmt == FORMAT else _role_from_name(path)
    if role not in PATTERNS:
        raise InputError("cannot tell whether this is a MSCOCO NeuralAnnot MANO file or a "
                         "COCO-WholeBody file", where=path,
                         fix="name MSCOCO_{split}_MANO_NeuralAnnot.json with --labels")
    other = "wholebody" if role == "mano" else "mano"
    other_path = _sibling(path, role, other)
    docs = {role: doc, other: read_json(other_path, what=f"COCO {other} file")}
    files = {role: path, other: other_path}
    return _frames(files["mano"], docs["mano"], files["wholebody"], docs["wholebody"], limit)


def _role_from_name(path: Path) -> str | None:
    return next((role for role, (rx, _) in PATTERNS.items() if rx.match(path.name)), None)


def _sibling(path: Path, role: str, other: str) -> Path:
    """The other file of the pair: same split by name, else the only candidate in the folder."""
    m = PATTERNS[role][0].match(path.name)
    rx, template = PATTERNS[other]
    if m:
        expected = path.parent / template.format(split=m["split"])
        found = find_file_ci(path.parent, expected.name)
    else:
        expected = path.parent / template
        candidates = sorted(p for p in path.parent.iterdir() if rx.match(p.name) and p.is_file())
        found = candidates[0] if len(candidates) == 1 else None
    if found is None:
        holds = ("image sizes, file names and hand boxes (required)" if other == "wholebody"
                 else "the NeuralAnnot MANO fits")
        where_from = ("github.com/jin-s13/COCO-WholeBody" if other == "wholebody"
                      else "the InterWild release (github.com/facebookresearch/InterWild)")
        raise InputError(f"the {template.format(split='{split}')} file, which holds {holds}, is "
                         f"missing: expected {expected}", where=path,
                         fix=f"download it from {where_from} and put it beside {path.name}")
    return found


def _frames(mano_path: Path, fits: Any, wb_path: Path, wholebody: Any,
            limit: int | None) -> LabelSet:
    if not isinstance(fits, Mapping):
        raise InputError("the MSCOCO NeuralAnnot file should hold a JSON object keyed by "
                         f"annotation id, got {type(fits).__name__}", where=mano_path,
                         fix="check that --labels names an MSCOCO_*_MANO_NeuralAnnot.json file")
    top = Where(wb_path, "top level")
    anns = {str(record_id(a, "id", Where(wb_path, f"annotations[{i}]"))): a
            for i, a in enumerate(require_list(wholebody, "annotations", top))}
    images = {record_id(m, "id", Where(wb_path, f"images[{i}]")): m
              for i, m in enumerate(require_list(wholebody, "images", top))}
    split = (MANO_NAME.match(mano_path.name) or WHOLEBODY_NAME.match(wb_path.name))
    split_name = split["split"] if split else None
    roots = image_roots(mano_path.parent, [f"{split_name}2017", split_name] if split_name else [])

    skips = Skips()
    frames: list[Frame] = []
    for aid, entry in fits.items():
        if limit is not None and len(frames) >= limit:
            break
        frames.extend(_person(str(aid), entry, anns, images, mano_path, wb_path, roots, skips))
    if limit is not None:
        frames = frames[:limit]
    return LabelSet(FORMAT, frames, [mano_path, wb_path], skips.as_dict())


def _person(aid: str, entry: Any, anns: dict, images: dict, mano_path: Path, wb_path: Path,
            roots: list[Path], skips: Skips) -> list[Frame]:
    where = Where(mano_path, f"annotation id {aid}")
    if entry is not None and not isinstance(entry, Mapping):
        raise where.error("(entry)", "should be an object with 'right' and 'left' (or null)",
                          "check that the file is an MSCOCO NeuralAnnot MANO file")
    ann = anns.get(aid)
    if ann is None:
        skips["missing_wholebody_annotation"] += 1
        return []
    ann_where = Where(wb_path, f"annotation id {aid}")
    image_id = record_id(ann, "image_id", ann_where)
    img = images.get(image_id)
    if img is None:
        raise ann_where.error("image_id", f"refers to image id {image_id}, which the file's "
                                          "'images' list lacks",
                              "use a complete COCO-WholeBody file")
    img_where = Where(wb_path, f"image id {image_id}")
    size = image_size(require(img, "width", img_where), require(img, "height", img_where), img_where)

    per_hand: list[tuple[Hand, Camera]] = []
    for side in SIDES:
        params = entry.get(side) if entry is not None else None
        claimed = bool(ann.get(f"{side}hand_valid", False))
        if params is None:
            if claimed:
                skips["null_hand"] += 1
            continue
        mano = require(params, "mano_param", where, field=f"{side}.mano_param")
        cam = require(params, "cam_param", where, field=f"{side}.cam_param")
        box = ann.get(f"{side}hand_box") if claimed else None
        if box is not None:     # checked against the WholeBody file, where it comes from
            box = numbers(box, 4, ann_where, f"{side}hand_box", unit="x, y, w, h in pixels")
        hand = make_hand(side, mano, where, prefix=f"{side}.mano_param", valid=claimed, bbox=box)
        per_hand.append((hand, _camera(side, cam, where)))
    if not any(hand.valid for hand, _ in per_hand):
        skips["no_valid_hand"] += 1
        return []

    base = dict(source_format=FORMAT, image_size=size,
                image_path=locate_image(roots, str(require(img, "file_name", img_where))),
                original={"mano": entry, "annotation": ann, "image": img})
    ids = {"annotation_id": aid, "image_id": image_id}
    cams = [cam for _, cam in per_hand]
    if all(_same(cams[0], c) for c in cams[1:]):
        return [Frame(key=frame_key("coco", aid), camera=cams[0], hands=[h for h, _ in per_hand],
                      source_id=ids, **base)]
    return [Frame(key=frame_key("coco", aid, hand.side), camera=cam, hands=[hand],
                  source_id={**ids, "side": hand.side}, **base)
            for hand, cam in per_hand]


def _camera(side: str, cam: Any, where: Where) -> Camera:
    prefix = f"{side}.cam_param"
    focal = require(cam, "focal", where, field=f"{prefix}.focal")
    princpt = require(cam, "princpt", where, field=f"{prefix}.princpt")
    R, t = cam.get("R"), cam.get("t")
    if (R is None) != (t is None):
        given, absent = ("R", "t") if t is None else ("t", "R")
        raise where.error(f"{prefix}.{absent}", f"is missing while '{given}' is given",
                          "give both R (3x3) and t (metres) for a world-to-camera transform, or "
                          "neither when the MANO parameters are already in camera coordinates")
    return make_camera(focal, princpt, R, t, where,
                       fields=tuple(f"{prefix}.{k}" for k in ("focal", "princpt", "R", "t")))


def _same(a: Camera, b: Camera) -> bool:
    return (a.focal == b.focal and a.princpt == b.princpt and np.array_equal(a.R, b.R)
            and np.array_equal(a.t, b.t))
