"""MediaPipe's hand landmarker, run offline from a locally built ``.task`` model file.

mediapipe 1.2.x (the ``[eval]`` extra; it installs beside numpy 2) ships no hand models. The models
are inside the mediapipe 0.10.21 wheel: ``palm_detection_full.tflite`` and ``hand_landmark_full.tflite``.
Zipped as ``hand_detector.tflite`` + ``hand_landmarks_detector.tflite`` they form the ``.task`` file
that 1.2.x's Tasks ``HandLandmarker`` loads. :func:`build_hand_model` fetches that wheel with
``pip download --no-deps`` (the package registry only; the wheel is never installed) and writes the file.

Handedness: MediaPipe labels hands as if the image were mirrored (a selfie camera), so a right hand
in an ordinary photo comes out "Left". Generated and source images are not mirrored: the label is
swapped back before it is compared with the labels' side.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from handsynth import io
from handsynth.errors import MissingResourceError, OutputError
from handsynth.evaluate.hands import Detection

MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
TASK_MEMBERS = {   # .task member name -> file inside the 0.10.21 wheel
    "hand_detector.tflite": "mediapipe/modules/palm_detection/palm_detection_full.tflite",
    "hand_landmarks_detector.tflite": "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
}
TASK_FILE = "hand_landmarker.task"
MAX_HANDS = 4
MIN_CONFIDENCE = 0.5        # MediaPipe's defaults for detection and presence confidence
UNMIRROR = {"Left": "right", "Right": "left"}
ALIGN = 64                  # .task members start on 64-byte boundaries, so TFLite maps them without copying


def default_task_path() -> Path:
    """Where the hand model is looked for and built by default: $HANDSYNTH_CACHE or ~/.cache/handsynth."""
    root = Path(os.environ.get("HANDSYNTH_CACHE", Path.home() / ".cache" / "handsynth"))
    return root / TASK_FILE


def build_hint(path: Path | None = None) -> str:
    target = f" --hand-model {path}" if path is not None and path != default_task_path() else ""
    return (f"install the extra (pip install 'handsynth[eval]'), then run `handsynth evaluate --build-hand-model"
            f"{target}` once (it fetches the {MEDIAPIPE_WHEEL} wheel from the package registry with pip download "
            f"and writes {path or default_task_path()})")


def task_from_wheel(wheel: Path, out: Path) -> Path:
    """Write the ``.task`` file ``out`` from the two models inside a mediapipe 0.10.21 wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = {name: zf.read(member) for name, member in TASK_MEMBERS.items()}
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise MissingResourceError(f"cannot read the hand models from the wheel: {exc}", where=wheel,
                                   fix=f"pass a {MEDIAPIPE_WHEEL} wheel (pip download --no-deps {MEDIAPIPE_WHEEL})"
                                   ) from None
    with io.atomic_path(out) as tmp:
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0))
                start = fh.tell() + 30 + len(name.encode()) + 4      # local header, name, padding field header
                info.extra = b"\xff\xff" + (pad := -start % ALIGN).to_bytes(2, "little") + b"\0" * pad
                zf.writestr(info, data)
    return out


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what MediaPipe's C++ side prints straight to file descriptor 2 (TFLite/LiteRT start-up notes)
    while a landmarker is created, first run and closed; Python-level errors are raised as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps mediapipe==0.10.21`` for this Python into ``folder``; the wheel's path."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob("mediapipe-0.10.21-*.whl"))
    if not found:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                               "-d", str(folder), MEDIAPIPE_WHEEL], capture_output=True, text=True)
        found = sorted(folder.glob("mediapipe-0.10.21-*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MissingResourceError(
                f"pip could not download {MEDIAPIPE_WHEEL} for Python {sys.version.split()[0]}: {last}",
                where="the package registry",
                fix=f"on a machine with the registry run `pip download --no-deps {MEDIAPIPE_WHEEL}` for this Python "
                    "(the wheel exists for Python 3.9-3.12) and pass it with --hand-wheel")
    return found[0]


def build_hand_model(out: Path | None = None, wheel: Path | None = None) -> Path:
    """Build the ``.task`` file at ``out`` (default :func:`default_task_path`) from ``wheel`` or a downloaded one."""
    out = Path(out) if out is not None else default_task_path()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder for the hand model: {exc.strerror or exc}", where=out.parent,
                          fix="pass a writable --hand-model path") from None
    if wheel is not None:
        return task_from_wheel(Path(wheel), out)
    with tempfile.TemporaryDirectory(prefix="handsynth-mediapipe-") as tmp:
        return task_from_wheel(download_wheel(Path(tmp)), out)


def find_hand_model(path: Path | None = None) -> Path | None:
    """The ``.task`` file to use: ``path`` (must exist), else the default location's, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingResourceError(f"the hand model file {path} does not exist", where="--hand-model",
                                       fix=build_hint(Path(path)))
        return Path(path)
    default = default_task_path()
    return default if default.is_file() else None


def mediapipe_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mediapipe")
    except PackageNotFoundError:
        return None


def _blank():
    import mediapipe as mp

    return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.zeros((64, 64, 3), np.uint8))


class HandLandmarker:
    """MediaPipe's HandLandmarker (image mode) on uint8 RGB arrays; use as a context manager."""

    def __init__(self, task: Path, *, max_hands: int = MAX_HANDS, min_confidence: float = MIN_CONFIDENCE):
        try:
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError:
            raise MissingResourceError("MediaPipe is not installed, so hand confidence and keypoint errors cannot "
                                       "be computed", where="the Python environment",
                                       fix="pip install 'handsynth[eval]' (mediapipe 1.2)") from None
        self.settings = {"max_hands": max_hands, "min_hand_detection_confidence": min_confidence,
                         "min_hand_presence_confidence": min_confidence, "running_mode": "IMAGE"}
        options = vision.HandLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task)), running_mode=vision.RunningMode.IMAGE,
            num_hands=max_hands, min_hand_detection_confidence=min_confidence,
            min_hand_presence_confidence=min_confidence)
        try:
            with _quiet_native_stderr():
                self._landmarker = vision.HandLandmarker.create_from_options(options)
                self._landmarker.detect(_blank())      # its first run prints notes too
        except (RuntimeError, ValueError) as exc:
            raise MissingResourceError(f"MediaPipe cannot load the hand model: {exc}", where=task,
                                       fix=build_hint(task)) from None

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Hands in a uint8 RGB image (H, W, 3): side (unmirrored), handedness score, joints in pixels
        (pixel centres at integers) and world landmarks in metres."""
        import mediapipe as mp

        h, w = image.shape[:2]
        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
        found = []
        for cls, marks, world in zip(result.handedness, result.hand_landmarks, result.hand_world_landmarks):
            joints = np.array([[p.x * w - 0.5, p.y * h - 0.5] for p in marks], dtype=np.float64)
            found.append(Detection(side=UNMIRROR.get(cls[0].category_name, "unknown"), score=float(cls[0].score),
                                   joints_2d=joints, world=np.array([[p.x, p.y, p.z] for p in world])))
        return found

    def close(self) -> None:
        if self._landmarker is not None:
            with _quiet_native_stderr():
                self._landmarker.close()
            self._landmarker = None

    def __enter__(self) -> "HandLandmarker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
