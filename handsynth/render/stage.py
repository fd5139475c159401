"""The render stage: labels -> a run directory of mesh images, local crops and derived labels.

The run directory's layout is :mod:`handsynth.render.layout`; :mod:`handsynth.rundir` locks it, checks
that a rerun resumes the same run and records how the run ended. Every file is written atomically
(temporary name + rename). A rerun of the same command keeps complete frames (label parses, every
image matches the sha256 its label recorded) and renders the rest, a damaged frame included;
finished files are never rewritten. PNGs are encoded with fixed options and no metadata
(:mod:`handsynth.render.png`), so reruns give byte-identical files. :meth:`FrameRenderer.render` is a
pipeline: while the GL driver draws a frame, the previous frame's files are written and the next frame's MANO
runs; each frame's files are still exactly those of the frame rendered alone (tested).

``styles`` (``--style mesh,depth``) chooses which image sets one pass writes: all come from the same
render of the same meshes, and the label (one per frame) lists each image under ``images``
(``layout.STYLE_IMAGES``: ``global`` / ``local`` for mesh, ``depth_global`` / ``depth_local`` for depth).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from handsynth import io, rundir
from handsynth.console import console, progress
from handsynth.errors import InputError
from handsynth.labels.schema import Frame, Hand
from handsynth.render import geometry, layout
from handsynth.render.png import encode_png
from handsynth.render.renderer import (BASE_COLOR, DEPTH_FAR_LEVEL, LIGHTS, STYLES, ZFAR, ZNEAR, GLMesh,
                                       HandRenderer, PendingRender, View, depth_image)

if TYPE_CHECKING:
    from handsynth.hand_model import HandModel

STAGE = layout.STAGE
LOCAL_SIZE = 512
# Frames a worker process (--workers N) takes at a time: its own pipeline (FrameRenderer.render) runs over them.
CHUNK = 8
JPEG_QUALITY = 95
UNITS = {"length": "metres", "image": "pixels, pixel centres at integers (OpenCV)",
         "pose": "axis-angle radians", "box": "x0, y0, x1, y1 pixels"}
NO_VALID_HAND = "no_valid_hand"
MIXED_REASONS = "no_renderable_hand"
SHOWN_WARNINGS = 10
DEPTH_CONVENTION = (f"MiDaS-style relative inverse depth: grey = rint({DEPTH_FAR_LEVEL} + {255 - DEPTH_FAR_LEVEL} * "
                    "(1/Z - min 1/Z) / (max 1/Z - min 1/Z)) over the image's mesh pixels (nearest 255, farthest "
                    f"{DEPTH_FAR_LEVEL}), 0 where there is no mesh")


@dataclass(frozen=True)
class Settings:
    """Everything besides the labels and MANO files that decides a run's output. ``styles``: the image
    sets to write, in :data:`STYLES` order (recorded as "mesh", "depth" or "mesh,depth")."""

    styles: tuple[str, ...] = ("mesh",)
    local_size: int = LOCAL_SIZE
    crop_scale: float = geometry.DEFAULT_CROP_SCALE

    def as_dict(self) -> dict[str, Any]:
        return {"style": ",".join(self.styles), "local_size": self.local_size, "crop_scale": self.crop_scale}


@dataclass
class FrameResult:
    """Outcome of one frame: ``rendered`` or ``skipped`` (with ``reason``); hand-level skips counted."""

    key: str
    status: str
    reason: str | None = None
    hand_skips: Counter = field(default_factory=Counter)
    rgb: bool = False
    jsonl_line: str | None = None       # the label as its line in labels.jsonl (rendered frames)


@dataclass
class RunSummary:
    out: Path
    frames: int
    rendered: int
    already_done: int
    skipped: dict[str, int]
    skipped_hands: dict[str, int]
    elapsed_s: float


# --- one frame -----------------------------------------------------------------------------

@dataclass
class Prepared:
    """A frame on its way through FrameRenderer: prepared (hands, crop) and then drawn (views)."""

    frame: Frame
    result: FrameResult
    hands: list[dict[str, Any]] = field(default_factory=list)
    crop: np.ndarray | None = None
    K_local: np.ndarray | None = None
    views: list | None = None


class FrameRenderer:
    """Turns frames into their files in ``out`` with a (loaded) HandModel and its own HandRenderer."""

    def __init__(self, out: Path, model: HandModel, settings: Settings):
        from handsynth.hand_model import JOINT_NAMES, JOINT_ORDER

        self.out = Path(out)
        self.settings = settings
        self.model = model
        self.renderer = HandRenderer()
        self.joint_names, self.joint_order = list(JOINT_NAMES), JOINT_ORDER

    def render(self, frames: list[Frame]) -> Iterator[FrameResult]:
        """Render ``frames``, yielding each one's result, in order, once its files are written.

        A pipeline that keeps the GL driver drawing while Python works: each frame's render is started
        (:meth:`HandRenderer.start`), and while the driver draws it (llvmpipe: in its own threads; a GPU: on its
        own) the previous frame's files are written and the next frame's MANO and geometry computed; then it is
        read back.
        """
        ahead = self.prepare(frames[0]) if frames else None
        drawn = None
        for i in range(len(frames)):
            prep = ahead
            pending = self._start(prep)
            if drawn is not None:
                yield self.finish(drawn)
            ahead = self.prepare(frames[i + 1]) if i + 1 < len(frames) else None
            if pending is not None:
                prep.views = pending.wait()
            drawn = prep
        if drawn is not None:
            yield self.finish(drawn)

    def prepare(self, frame: Frame) -> Prepared:
        """MANO and geometry of the frame's hands, the local crop and camera (no GL)."""
        prep = Prepared(frame, FrameResult(frame.key, "skipped"))
        prep.hands = self._hands_in_camera(frame, prep.result.hand_skips)
        if not prep.hands:
            reasons = set(prep.result.hand_skips)
            prep.result.reason = reasons.pop() if len(reasons) == 1 else (MIXED_REASONS if reasons else NO_VALID_HAND)
            return prep
        prep.crop = geometry.square_crop_box([h["box"] for h in prep.hands], self.settings.crop_scale)
        prep.K_local = geometry.crop_intrinsics(frame.camera.K, prep.crop, self.settings.local_size)
        return prep

    def _start(self, prep: Prepared) -> PendingRender | None:
        """Start the GL render of the prepared frame's global and local view (None when it has no hands)."""
        if not prep.hands:
            return None
        size = self.settings.local_size
        return self.renderer.start(
            [h["mesh"] for h in prep.hands],
            [View(prep.frame.camera.K, tuple(prep.frame.image_size)), View(prep.K_local, (size, size))],
            depth="depth" in self.settings.styles)

    def finish(self, prep: Prepared) -> FrameResult:
        """Encode and write the drawn frame's images and its label (no GL)."""
        frame, result, hands = prep.frame, prep.result, prep.hands
        if not hands:
            return result
        global_view, local_view = prep.views
        crop, size = prep.crop, self.settings.local_size
        encoded = {}
        for style in self.settings.styles:
            for name, view in zip(layout.STYLE_IMAGES[style], (global_view, local_view)):
                encoded[name] = encode_png(view.color if style == "mesh" else depth_image(view.depth))
        rgb = load_rgb(frame)
        if rgb is not None:
            encoded["rgb_local"] = encode_jpeg(crop_image(rgb, crop, size))
        images = {name: layout.image_ref(name, frame.key) for name in encoded}
        for name, data in encoded.items():
            io.write_bytes_atomic(self.out / images[name], data)
        label = self._label(frame, hands, result.hand_skips, crop, prep.K_local, images)
        label["images_sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in encoded.items()}
        io.write_json_atomic(layout.label_path(self.out, frame.key), label)
        result.status, result.rgb, result.jsonl_line = "rendered", rgb is not None, json.dumps(label, allow_nan=False)
        return result

    def _hands_in_camera(self, frame: Frame, skips: Counter) -> list[dict[str, Any]]:
        """MANO (batched per side) -> camera space -> pixels for the frame's valid hands, in label order."""
        import torch

        valid = [(i, h) for i, h in enumerate(frame.hands) if h.valid]
        if len(valid) < len(frame.hands):
            skips["invalid_hand"] += len(frame.hands) - len(valid)
        placed: dict[int, dict[str, Any]] = {}
        for side in ("right", "left"):
            group = [(i, h) for i, h in valid if h.side == side]
            if not group:
                continue
            with torch.inference_mode():          # no autograd records: 20% faster on one frame's hands
                output = self.model.forward(
                    side, *(np.stack([getattr(h, name) for _, h in group]) for name in ("pose", "shape", "trans")))
            vertices, joints = _numpy(output.vertices), _numpy(output.joints)
            faces = np.asarray(self.model.faces(side))
            for b, (i, hand) in enumerate(group):
                v_cam = geometry.to_camera(frame.camera, vertices[b])
                j_cam = geometry.to_camera(frame.camera, joints[b])
                reason = geometry.visibility(v_cam, None, frame.image_size)
                box = None if reason else geometry.tight_box(geometry.project(v_cam, frame.camera.K))
                reason = reason or geometry.visibility(v_cam, box, frame.image_size)
                if reason:
                    skips[reason] += 1
                    continue
                # the mesh as the renderer draws it, built here, while the driver draws the previous frame
                placed[i] = {"hand": hand, "mesh": GLMesh.of(v_cam, faces), "joints": j_cam, "box": box,
                             "joints_2d": geometry.project(j_cam, frame.camera.K)}
        return [placed[i] for i in sorted(placed)]

    def _label(self, frame: Frame, hands: list[dict[str, Any]], skips: Counter, crop: np.ndarray,
               K_local: np.ndarray, images: dict[str, str]) -> dict[str, Any]:
        cam = frame.camera
        return {
            "key": frame.key,
            "source_format": frame.source_format,
            "source_id": frame.source_id,
            "image_size": [int(v) for v in frame.image_size],
            "image_path": str(frame.image_path) if frame.image_path else None,
            "units": UNITS,
            "joint_order": self.joint_order,
            "joint_names": self.joint_names,
            "camera": {"focal": list(cam.focal), "princpt": list(cam.princpt),
                       "R": np.asarray(cam.R).tolist(), "t": np.asarray(cam.t).tolist()},
            "hands": [_hand_label(h) for h in hands],
            "skipped_hands": dict(sorted(skips.items())),
            "crop_box": crop.tolist(),
            "local_camera": {"size": [self.settings.local_size] * 2,
                             "focal": [K_local[0, 0], K_local[1, 1]], "princpt": [K_local[0, 2], K_local[1, 2]]},
            "images": images,
            "original": frame.original,
        }


def _hand_label(h: dict[str, Any]) -> dict[str, Any]:
    hand: Hand = h["hand"]
    return {
        "side": hand.side,
        "mano": {"pose": np.asarray(hand.pose).tolist(), "shape": np.asarray(hand.shape).tolist(),
                 "trans": np.asarray(hand.trans).tolist()},
        "source_bbox": list(hand.bbox) if hand.bbox is not None else None,
        "joints_cam": h["joints"].tolist(),
        "joints_2d": h["joints_2d"].tolist(),
        "box": h["box"].tolist(),
        "vertices_sha256": hashlib.sha256(h["mesh"].vertices.astype("<f8").tobytes()).hexdigest(),
        "vertices_encoding": "camera-space vertices (778, 3) metres as little-endian float64, C order",
    }


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# --- images --------------------------------------------------------------------------------

def encode_jpeg(image) -> bytes:
    buf = _io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def load_rgb(frame: Frame):
    """The frame's source image as RGB (PIL), or None when unknown, missing, unreadable or of another size."""
    if frame.image_path is None or not Path(frame.image_path).is_file():
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(frame.image_path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        console.print(f"[yellow]warning:[/yellow] cannot read image {frame.image_path}; no rgb_local crop",
                      soft_wrap=True)
        return None
    if rgb.size != tuple(frame.image_size):
        console.print(f"[yellow]warning:[/yellow] {frame.image_path} is {rgb.size[0]}x{rgb.size[1]}, labels say "
                      f"{frame.image_size[0]}x{frame.image_size[1]}; no rgb_local crop", soft_wrap=True)
        return None
    return rgb


def crop_image(image, box: np.ndarray, size: int):
    """The square ``box`` (pixel-centre coordinates) of a PIL image resized to ``size`` x ``size``; black outside."""
    from PIL import Image

    edges = np.asarray(box, dtype=np.float64) + 0.5          # PIL measures from pixel edges
    x0, y0 = math.floor(edges[0]), math.floor(edges[1])
    region = image.crop((x0, y0, math.ceil(edges[2]), math.ceil(edges[3])))
    sub = (edges[0] - x0, edges[1] - y0, edges[2] - x0, edges[3] - y0)
    return region.resize((size, size), Image.Resampling.BICUBIC, box=sub)


# --- the run -------------------------------------------------------------------------------

def render_run(labels_path: str | Path, out: str | Path, *, format: str | None = None,
               mano_dir: str | Path | None = None, limit: int | None = None, workers: int = 1,
               style: str = "mesh", local_size: int = LOCAL_SIZE,
               crop_scale: float = geometry.DEFAULT_CROP_SCALE, command: list[str] | None = None,
               companions: dict[str, Path] | None = None) -> RunSummary:
    """Render every frame of ``labels_path`` into the run directory ``out``; resume where a run stopped.

    ``style``: "mesh", "depth" or both comma-separated ("mesh,depth": both image sets from one render).
    Raises InputError on bad labels or settings or an ``out`` holding something else than this run,
    MissingResourceError when MANO files are missing, OutputError when ``out`` cannot be written or
    another process is writing to it. Hands behind the camera or outside the image are skipped and
    counted; frames without a renderable hand are skipped and counted.
    """
    from handsynth.hand_model import HandModel, resolve_mano_dir
    from handsynth.labels import read_labels
    from handsynth.render.backend import configure_platform

    started = time.perf_counter()
    settings = _check_settings(style, local_size, crop_scale, workers)
    label_set = read_labels(Path(labels_path), format, limit=limit, companions=companions)
    _check_render_size(label_set.frames, Path(labels_path))
    _check_unique_keys(label_set.frames, Path(labels_path))
    mano_root = resolve_mano_dir(Path(mano_dir) if mano_dir else None)
    model = HandModel(mano_root)
    for side in sorted({h.side for f in label_set.frames for h in f.hands if h.valid}):
        model.faces(side)           # loads and checks the side's file before the run directory is touched
    mano_hashes = model.file_hashes()
    manifest = {
        "inputs": {"labels": [{"path": str(p), "sha256": io.sha256_file(p)} for p in label_set.sources],
                   "format": label_set.format, "limit": limit},
        "mano": {"dir": str(mano_root), "files": mano_hashes},
        "settings": settings.as_dict(),
        "renderer": {"platform": configure_platform(), "znear_m": ZNEAR, "zfar_m": ZFAR,
                     "base_color": list(BASE_COLOR), "lights": [list(d) + [i] for d, i in LIGHTS]},
        "units": UNITS, "layout": {**{name: layout.image_ref(name, "<key>") for name in layout.IMAGE_NAMES
                                      if name == "rgb_local" or any(name in layout.STYLE_IMAGES[s]
                                                                    for s in settings.styles)},
                                   "labels": "labels/<key>.json", "all_labels": layout.JSONL},
        **({"depth_images": DEPTH_CONVENTION} if "depth" in settings.styles else {}),
    }
    fingerprint = {"settings": manifest["settings"], "MANO files": mano_hashes,
                   "label files": [e["sha256"] for e in manifest["inputs"]["labels"]]}
    run = rundir.RunDir(out, STAGE, fingerprint=fingerprint, command=command, subdirs=layout.SUBDIRS)
    with run.open(**manifest):
        out = run.out
        frames = label_set.frames
        pending = [f for f in frames if not layout.frame_complete(out, f.key)]
        results = _render_frames(pending, out, model, settings, workers)

        skipped = Counter(r.reason for r in results if r.status == "skipped")
        hand_skips = sum((r.hand_skips for r in results), Counter())
        _warn_skips(results)
        done = [f for f in frames if layout.label_path(out, f.key).exists()]
        _write_jsonl(out, done, {r.key: r.jsonl_line for r in results if r.jsonl_line})
        elapsed = time.perf_counter() - started
        counts = {
            "frames": len(frames), "rendered": len(done),
            "rendered_this_run": sum(r.status == "rendered" for r in results),
            "already_done": len(frames) - len(pending), "rgb_local": sum(r.rgb for r in results),
            "skipped": dict(sorted(skipped.items())), "skipped_hands": dict(sorted(hand_skips.items())),
            "reader_skipped": dict(label_set.skipped), "stray_temporaries_removed": run.stray_temporaries,
        }
        run.finish(counts=counts, elapsed_s=round(elapsed, 3), workers=workers)
    return RunSummary(out=out, frames=len(frames), rendered=len(done), already_done=counts["already_done"],
                      skipped=counts["skipped"], skipped_hands=counts["skipped_hands"], elapsed_s=elapsed)


def _check_render_size(frames: list[Frame], source: Path) -> None:
    """InputError when a frame's image is larger than the GL renderer can draw (checked before any output)."""
    from handsynth.render.backend import configure_platform
    from handsynth.render.renderer import max_render_size

    if not frames:
        return
    limit = max_render_size()
    big = next((f for f in frames if max(f.image_size) > limit), None)
    if big is not None:
        w, h = (int(v) for v in big.image_size)
        raise InputError(
            f"frame {big.key} is {w}x{h} pixels, larger than the {limit}-pixel side this OpenGL renderer "
            f"({configure_platform()}) can draw", where=source,
            fix="check the frame's image size in the labels; for truly larger images, crop them (shifting the "
                "principal point) or render on a machine whose driver allows larger images (NVIDIA EGL: 32768)")


def _check_settings(style: str, local_size: int, crop_scale: float, workers: int) -> Settings:
    asked = {s.strip() for s in str(style).split(",")}
    unknown = sorted(asked - set(STYLES))
    if unknown:
        raise InputError(f"unknown render style '{unknown[0]}'", where="--style",
                         fix=f"use one of {', '.join(STYLES)}, or several comma-separated (mesh,depth)")
    if not 16 <= int(local_size) <= 4096:
        raise InputError(f"local image size {local_size} is out of range", where="--local-size",
                         fix="use a size between 16 and 4096 pixels (AttentionHand uses 512)")
    if not (math.isfinite(crop_scale) and 1.0 <= crop_scale <= 10.0):
        raise InputError(f"crop scale {crop_scale} is out of range", where="crop_scale",
                         fix="use a factor between 1.0 and 10.0 (default 1.5)")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}", where="--workers", fix="pass 1 or more")
    return Settings(styles=tuple(s for s in STYLES if s in asked), local_size=int(local_size),
                    crop_scale=float(crop_scale))


def _check_unique_keys(frames: list[Frame], source: Path) -> None:
    counts = Counter(f.key for f in frames)
    dup = [k for k, n in counts.items() if n > 1]
    if dup:
        raise InputError(f"{len(dup)} frame key(s) occur more than once, e.g. '{dup[0]}'", where=source,
                         fix="give every frame a unique id in the label file")


def _render_frames(frames: list[Frame], out: Path, model: HandModel, settings: Settings,
                   workers: int) -> list[FrameResult]:
    import torch

    results: list[FrameResult] = []
    if not frames:
        return results
    with progress("frames") as bar:
        task = bar.add_task("render", total=len(frames))
        if workers == 1 or len(frames) == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)        # see _init_worker
            try:
                for result in FrameRenderer(out, model, settings).render(frames):
                    results.append(result)
                    bar.advance(task)
            finally:
                torch.set_num_threads(threads)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            # spawn: EGL contexts do not survive fork. An executor, not multiprocessing.Pool: a worker that dies
            # (killed, out of memory, a crash in the GL driver) breaks it and ends the run with an error, where a
            # Pool would wait forever for that worker's chunk
            executor = ProcessPoolExecutor(min(workers, len(frames)), mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(out, model.root, settings, os.getpid()))
            try:
                for future in as_completed([executor.submit(_work, chunk) for chunk in _chunks(frames, workers)]):
                    chunk_results = future.result()
                    results.extend(chunk_results)
                    bar.advance(task, len(chunk_results))
            except BrokenProcessPool:
                raise RuntimeError("a render worker process stopped abruptly (killed? out of memory? a crash in the "
                                   "GL driver?); the frames written so far are kept: rerun the same command to "
                                   "render the rest") from None
            finally:
                executor.shutdown(wait=True, cancel_futures=True)     # chunks under way finish (a few frames)
    return results


_WORKER: FrameRenderer | None = None
_PARENT: int | None = None
_INIT_ERROR: Exception | None = None


def _init_worker(out: Path, mano_dir: Path, settings: Settings, parent: int) -> None:
    """Set up a worker process. MANO on a frame's one or two hands is tiny: torch's thread pool
    costs far more than it saves there (65 ms vs 1.5 ms per forward on a busy 2-core machine). An error
    is kept and raised by the worker's first chunk, so that the run stops with its message."""
    global _WORKER, _PARENT, _INIT_ERROR
    import torch

    from handsynth.hand_model import HandModel

    torch.set_num_threads(1)
    _PARENT = parent
    try:
        _WORKER = FrameRenderer(out, HandModel(mano_dir), settings)
    except Exception as exc:  # noqa: BLE001 - any error: the parent shows it
        _INIT_ERROR = exc


def _work(frames: list[Frame]) -> list[FrameResult]:
    if os.getppid() != _PARENT:     # the run was killed: stop, the folder may belong to a resumed run now
        os._exit(1)
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    assert _WORKER is not None
    return list(_WORKER.render(frames))


def _chunks(frames: list[Frame], workers: int) -> list[list[Frame]]:
    """``frames`` in chunks of :data:`CHUNK`, smaller when that leaves a worker without one."""
    size = max(1, min(CHUNK, math.ceil(len(frames) / workers)))
    return [frames[i:i + size] for i in range(0, len(frames), size)]


def _warn_skips(results: list[FrameResult]) -> None:
    skipped = [r for r in results if r.status == "skipped"]
    for r in skipped[:SHOWN_WARNINGS]:
        console.print(f"[yellow]warning:[/yellow] frame {r.key} skipped: {r.reason}")
    if len(skipped) > SHOWN_WARNINGS:
        console.print(f"[yellow]warning:[/yellow] ... and {len(skipped) - SHOWN_WARNINGS} more skipped frames "
                      "(counts by reason in manifest.json)")


def _write_jsonl(out: Path, frames: list[Frame], lines_known: dict[str, str]) -> None:
    """labels.jsonl: the label of every frame in ``frames``, one line each, from ``lines_known`` (the frames
    rendered by this run) or read from its label file (those rendered before)."""
    lines = [lines_known.get(f.key) or json.dumps(io.read_json(layout.label_path(out, f.key), what="frame label"),
                                                  allow_nan=False) for f in frames]
    io.write_bytes_atomic(layout.jsonl_path(out), ("\n".join(lines) + "\n" if lines else "").encode())
