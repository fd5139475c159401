"""The render run directory: where render writes each file, and how later stages read them.

Run directory::

    <run>/manifest.json        stage "render": command, inputs + sha256, MANO hashes, settings, counts, status
    <run>/global/<key>.png     mesh image at the source image size
    <run>/local/<key>.png      local_size x local_size mesh image through the crop box's intrinsics
    <run>/depth_global/<key>.png, depth_local/<key>.png   the same two views as depth images
                               (``--style depth`` or ``mesh,depth``; a depth-only run has no global/, local/)
    <run>/rgb_local/<key>.jpg  the same crop of the source RGB (only when the source image exists)
    <run>/labels/<key>.json    per frame, written LAST: lists the frame's images (``images``) and their
                               sha256 (``images_sha256``); a frame is complete when its label parses and
                               every listed image matches its hash
    <run>/labels.jsonl         every complete frame's label in source order, rewritten at the end

Other stages read a render run only through these functions (generate: :func:`jsonl_path`,
:func:`label_path`; export: :func:`read_label`, :func:`read_image`, :func:`mano_files`), never by
knowing the file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from handsynth import io, rundir
from handsynth.errors import InputError

STAGE = "render"
SUBDIRS = ("global", "local", "depth_global", "depth_local", "rgb_local", "labels")
JSONL = "labels.jsonl"
IMAGE_NAMES = {"global": "global/{key}.png", "local": "local/{key}.png", "depth_global": "depth_global/{key}.png",
               "depth_local": "depth_local/{key}.png", "rgb_local": "rgb_local/{key}.jpg"}
#: The images of each render style (= ``model.condition``): (global view, local view).
STYLE_IMAGES = {"mesh": ("global", "local"), "depth": ("depth_global", "depth_local")}
REDO = "rerun the same `handsynth render` command: it redoes frames whose files are damaged or missing"


def label_path(run: Path, key: str) -> Path:
    return Path(run) / "labels" / f"{key}.json"


def image_ref(name: str, key: str) -> str:
    """The run-relative path of a frame's image ``name`` (a key of :data:`IMAGE_NAMES`)."""
    return IMAGE_NAMES[name].format(key=key)


def jsonl_path(run: Path) -> Path:
    return Path(run) / JSONL


def read_manifest(run: Path) -> dict[str, Any]:
    """The render run's manifest; InputError when ``run`` is no render run."""
    return rundir.read_manifest(run, stage=STAGE)


def frame_complete(run: Path, key: str) -> bool:
    """Whether frame ``key`` is finished in ``run``: its label parses and every image it lists decodes and
    matches its recorded sha256."""
    try:
        label = json.loads(label_path(run, key).read_text(encoding="utf-8"))
        images, digests = label["images"], label.get("images_sha256", {})
        return all(rundir.intact(Path(run) / rel, digests.get(name)) for name, rel in images.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_label(run: Path, key: str, *, needed_by: str = "", data: bytes | None = None) -> dict[str, Any]:
    """The label of frame ``key`` (parsed from ``data`` when the caller has read the file); InputError when it
    is missing or malformed."""
    path = label_path(run, key)
    if data is None and not path.is_file():
        raise InputError(f"{needed_by + ' needs ' if needed_by else ''}the label of frame {key}, which the render "
                         "run does not have", where=path,
                         fix="use the render run the later stage was made from, complete (" + REDO + ")")
    label = io.read_json(path, what="render label") if data is None else io.parse_json(data, path, what="render label")
    if not isinstance(label, dict):
        raise InputError("the render label is not a JSON object", where=path, fix=REDO)
    return label


def label_bytes(run: Path, key: str) -> bytes:
    """The label file of frame ``key`` as stored (for fingerprints of what a later stage made from it)."""
    path = label_path(run, key)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"the render run has no label of frame {key}", where=path,
                         fix="use the generate run together with the render run it was made from") from None


def read_image(run: Path, label: dict[str, Any], name: str) -> bytes | None:
    """The bytes of the frame's image ``name`` (None when the frame has none), checked against the sha256
    the label recorded; InputError when the file is missing or damaged."""
    rel = label["images"].get(name)
    if rel is None:
        return None
    path = Path(run) / str(rel)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"the render run's {name} image of frame {label.get('key')} cannot be read: "
                         f"{exc.strerror or exc}", where=path, fix=REDO) from None
    return rundir.check_digest(path, data, (label.get("images_sha256") or {}).get(name), fix=REDO)


def mano_files(run: Path) -> tuple[Path, dict[str, str]]:
    """The MANO folder the render run used and the sha256 of each of its files (from the manifest)."""
    mano = read_manifest(run).get("mano") or {}
    return Path(mano.get("dir", "")), dict(mano.get("files") or {})
