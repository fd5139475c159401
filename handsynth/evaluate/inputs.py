"""What an evaluation reads: the generated set (a generate run) and the real set (a render run or a folder).

Each image becomes an :class:`Item` holding its labelled hands in ITS OWN pixel frame.

Generated images: a sample file's ``image`` block (``size``, ``K``, ``from_source``, ``hands`` with
``side`` / ``joints_2d`` / ``box``) gives the hands in the generated image's frame; ``joints_cam`` comes
from the render run's label of the sample's frame (hands in the same order). A sample file without that
block (runs made before it existed) is taken to show the whole source frame resized to the generated
image's size, the mapping export uses for such runs.

Real images (the default real set: the render run the generate run was made from): each frame's source
image (``image_path`` in its label) with the label's hands, already in the source image's frame. A
plain folder of images gives whole images only (no labels, so no hand crops or keypoint scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handsynth import io, rundir
from handsynth.errors import InputError
from handsynth.evaluate.hands import N_JOINTS, LabelledHand
from handsynth.render import layout as render_layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Item:
    """One image to evaluate."""

    key: str
    image: Path
    hands: list[LabelledHand] = field(default_factory=list)
    mesh: Path | None = None                     # its mesh image (for the report)
    info: dict[str, Any] = field(default_factory=dict)   # index, frame: copied to samples.jsonl


@dataclass
class GeneratedSet:
    run: Path
    render_run: Path
    items: list[Item]
    manifest: dict[str, Any] = field(default_factory=dict)


def _array(value: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != shape or not np.all(np.isfinite(arr)):
        raise InputError(f"field must hold finite numbers shaped {list(shape)}", where=where,
                         fix="rerun the stage that wrote the file into a new --out")
    return arr


def label_hands(label: dict[str, Any], where: Path) -> list[LabelledHand]:
    """The hands of a render label, in the source image's frame."""
    hands = label.get("hands")
    if not isinstance(hands, list):
        raise InputError("the render label has no 'hands' list", where=f"{where}, field 'hands'",
                         fix="rerun `handsynth render` into a new --out")
    out = []
    for i, hand in enumerate(hands):
        at = f"{where}, field 'hands[{i}]"
        if not isinstance(hand, dict) or hand.get("side") not in ("right", "left"):
            raise InputError("the hand has no side 'right' or 'left'", where=at + ".side'",
                             fix="rerun `handsynth render` into a new --out")
        out.append(LabelledHand(hand["side"], _array(hand.get("joints_2d"), (N_JOINTS, 2), at + ".joints_2d'"),
                                _array(hand.get("box"), (4,), at + ".box'"),
                                _array(hand.get("joints_cam"), (N_JOINTS, 3), at + ".joints_cam'")))
    return out


def _resized(hands: list[LabelledHand], source: tuple[int, int], size: tuple[int, int]) -> list[LabelledHand]:
    """Hands of a source frame resized whole to ``size``: p' = (p + 0.5) * size / source - 0.5 per axis
    (pixel centres at integers)."""
    scale = np.asarray(size, dtype=np.float64) / np.asarray(source, dtype=np.float64)
    offset = 0.5 * scale - 0.5
    return [LabelledHand(h.side, h.joints_2d * scale + offset, (h.box.reshape(2, 2) * scale + offset).ravel(),
                         h.joints_cam) for h in hands]


def _sample_hands(record: dict[str, Any], label_hands_: list[LabelledHand], label: dict[str, Any],
                  image: Path, where: Path) -> list[LabelledHand]:
    block = record.get("image")
    if block is None:
        from PIL import Image

        with Image.open(image) as img:
            size = img.size
        return _resized(label_hands_, tuple(label["image_size"]), size)
    hands = block.get("hands") if isinstance(block, dict) else None
    if not isinstance(hands, list) or len(hands) != len(label_hands_):
        raise InputError(f"the sample file's image.hands does not list the {len(label_hands_)} hand(s) of its "
                         "frame's render label", where=f"{where}, field 'image.hands'",
                         fix="rerun `handsynth generate` into a new --out")
    out = []
    for i, (hand, ref) in enumerate(zip(hands, label_hands_)):
        at = f"{where}, field 'image.hands[{i}]"
        if not isinstance(hand, dict) or hand.get("side") != ref.side:
            raise InputError(f"the hand's side is not the render label's '{ref.side}'", where=at + ".side'",
                             fix="rerun `handsynth generate` into a new --out")
        out.append(LabelledHand(ref.side, _array(hand.get("joints_2d"), (N_JOINTS, 2), at + ".joints_2d'"),
                                _array(hand.get("box"), (4,), at + ".box'"), ref.joints_cam))
    return out


def generated_set(run: Path) -> GeneratedSet:
    """Every complete sample of a generate run, in sample-index order, with its hands in its image's frame."""
    from handsynth.generate.layout import read_run

    source = read_run(Path(run))
    labels: dict[str, tuple[dict[str, Any], list[LabelledHand]]] = {}
    items = []
    for sample in source.samples:
        if sample.frame not in labels:
            label = render_layout.read_label(source.render_run, sample.frame, needed_by=f"sample {sample.key}")
            labels[sample.frame] = (label, label_hands(label, render_layout.label_path(source.render_run,
                                                                                       sample.frame)))
        label, hands = labels[sample.frame]
        record = io.read_json(sample.record_path, what="sample file")
        mesh = (label.get("images") or {}).get("global")
        items.append(Item(sample.key, sample.image,
                          _sample_hands(record, hands, label, sample.image, sample.record_path),
                          source.render_run / mesh if mesh else None,
                          {"index": sample.index, "frame": sample.frame}))
    return GeneratedSet(source.path, source.render_run, items, source.manifest)


def real_set(real: Path) -> tuple[list[Item], str]:
    """The real set: (items, kind) with kind 'render run' or 'image folder'; InputError when it has no image."""
    real = Path(real)
    if (real / rundir.MANIFEST).is_file():
        render_layout.read_manifest(real)
        items = []
        for path in sorted((real / "labels").glob("*.json")):
            label = io.read_json(path, what="render label")
            source = label.get("image_path")
            if source and Path(source).is_file():
                mesh = (label.get("images") or {}).get("global")
                items.append(Item(path.stem, Path(source), label_hands(label, path),
                                  real / mesh if mesh else None, {"frame": path.stem}))
        if not items:
            raise InputError("the render run's labels point to no source image that exists, so there is no real "
                             "set", where=real, fix="pass --real with a folder of real images, or render from "
                                                    "labels whose images are present")
        return items, "render run"
    if real.is_dir():
        files = sorted(p for p in real.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError("the real-image folder holds no jpg/png/webp/bmp image", where=real,
                             fix="pass --real with a render run or a folder of images")
        return [Item(str(p.relative_to(real)), p) for p in files], "image folder"
    raise InputError("the real set does not exist", where=real, fix="pass --real with a render run or image folder")
